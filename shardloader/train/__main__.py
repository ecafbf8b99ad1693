"""``python -m shardloader.train``: the training command line (`shardloader.train.loop.main`)."""

import sys

from shardloader.train.loop import main

sys.exit(main())
