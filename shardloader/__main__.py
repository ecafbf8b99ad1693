"""``python -m shardloader`` runs the command-line interface."""

from shardloader.cli import main

raise SystemExit(main())
