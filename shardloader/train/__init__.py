"""Fine-tune a causal LM on shards: ``torchrun ... -m shardloader.train DATA --output-dir OUT``.

Also ``shardloader train``, or `train` (`TrainConfig`) from Python, on every rank. The modules:

- `shardloader.train.config`: `TrainConfig`, whose fields are the flags, and the schedule `lr_at`;
- `shardloader.train.loop`: the loop (`train`), the process group and the optimizer;
- `shardloader.train.model`: builds the model locally, wraps it in DDP or FSDP2, runs a batch;
- `shardloader.train.lora`: LoRA adapters through ``peft`` (``--lora-rank``, the ``lora`` extra):
  which base they belong to, and the export of ``adapter/``, ``base/`` and the merged ``model/``;
- `shardloader.train.evaluation`: the eval loss on held-out shards (``--eval-data``);
- `shardloader.train.checkpoint`: saves, prunes and resumes checkpoints atomically (model,
  optimizer and the trainer state), falling back past damaged ones; ``--resume`` continues from
  the newest one exactly on the same topology, and without losing or repeating a document on
  another world size;
- `shardloader.train.safe_load`: the trust boundary: ``checksums.json`` and reading a checkpoint
  without unpickling anything outside an allow-list;
- `shardloader.train.metrics`: `StepMetrics`, `TrainResult`, ``metrics.jsonl``, ``samples/``
  (``--log-samples``: the sample ids of each step, per rank) and the progress bar.
"""

from shardloader.train.checkpoint import CHECKPOINTS_DIR
from shardloader.train.config import TrainConfig, lr_at
from shardloader.train.loop import MODEL_DIR, main, train
from shardloader.train.lora import ADAPTER_DIR, BASE_DIR
from shardloader.train.metrics import METRICS_FILE, SAMPLES_DIR, StepMetrics, TrainResult

__all__ = [
    "ADAPTER_DIR",
    "BASE_DIR",
    "CHECKPOINTS_DIR",
    "METRICS_FILE",
    "MODEL_DIR",
    "SAMPLES_DIR",
    "StepMetrics",
    "TrainConfig",
    "TrainResult",
    "lr_at",
    "main",
    "train",
]
