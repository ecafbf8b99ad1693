"""Training frameworks on shardloader's loaders, exact across ranks, epochs and restarts.

- `shardloader.integrations.transformers`: ``ShardTrainer``, a Hugging Face ``Trainer``.
- `shardloader.integrations.lightning`: ``ShardDataModule``, a Lightning ``LightningDataModule``.
- `shardloader.integrations.stream`: ``LoopStream``, what both hand their framework to iterate.

Each is imported on its own (``from shardloader.integrations.transformers import ShardTrainer``),
so importing this package imports neither framework.
"""
