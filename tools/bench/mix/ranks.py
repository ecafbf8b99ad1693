"""The subprocess side: one rank of one run, its batches' ids and its saved state."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tools.bench.mix import (
    MOSAIC_PREDOWNLOAD,
    SHUFFLE_BUFFER,
)


def collate_ids(samples: list[dict[str, Any]]) -> dict[str, list[str]]:
    """A batch as ``{"id": [ids]}`` (a dict, so that Mosaic's loader counts its samples)."""
    return {"id": [sample["id"] for sample in samples]}


class RankRun:
    """One system's loader on one rank, with the system's own way to save and load its state."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.system = spec["system"]
        self.dataset: Any = None
        self.loader: Any = None
        getattr(self, f"_build_{self.system}")()

    def _build_mosaic(self) -> None:
        from streaming import Stream, StreamingDataLoader, StreamingDataset

        spec = self.spec
        streams = [
            Stream(
                remote=s["paths"]["mosaic"],
                local=os.path.join(spec["cache_dir"], s["name"]),
                proportion=s["weight"],
            )
            for s in spec["sources"]
        ]
        self.dataset = StreamingDataset(
            streams=streams,
            shuffle=True,
            shuffle_seed=spec["seed"],
            batch_size=spec["batch_size"],
            batching_method=spec["variant"],
            predownload=MOSAIC_PREDOWNLOAD,
        )
        self.loader = StreamingDataLoader(
            self.dataset, batch_size=spec["batch_size"], num_workers=0, collate_fn=collate_ids
        )

    def _build_hf(self) -> None:
        import datasets
        from datasets import interleave_datasets
        from datasets.distributed import split_dataset_by_node
        from torch.utils.data import DataLoader

        from tools.bench.peers_stream import make_dataset

        spec = self.spec
        datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # see peers_stream.readers
        parts = [
            make_dataset(
                {
                    "system": "hf",
                    "url": s["paths"]["hf"],
                    "files": s["files"]["hf"],
                    "source": "local",
                    "seed": spec["seed"],
                    "shuffle_buffer": SHUFFLE_BUFFER,
                }
            )
            for s in spec["sources"]
        ]
        mixed = interleave_datasets(
            parts,
            probabilities=[s["weight"] for s in spec["sources"]],
            seed=spec["seed"],
            stopping_strategy=spec["variant"],
        )
        if spec["world_size"] > 1:
            mixed = split_dataset_by_node(mixed, rank=spec["rank"], world_size=spec["world_size"])
        self.dataset = mixed
        self.loader = DataLoader(
            mixed, batch_size=spec["batch_size"], num_workers=0, collate_fn=collate_ids
        )

    def _build_shardloader(self) -> None:
        from shardloader import Mixture, ShardDataset, ShardLoader, Source, StreamConfig

        spec = self.spec
        if spec.get("union"):  # one source of every document: what mixing costs on top
            self.dataset = ShardDataset(spec["union"], config=StreamConfig(seed=spec["seed"]))
        else:
            mixture = Mixture(
                [
                    # max_repetitions None: with a total, a source repeats as often as needed
                    Source(s["paths"]["shardloader"], weight=s["weight"], name=s["name"])
                    for s in spec["sources"]
                ],
                unit="samples",
                total=spec["total"],
            )
            self.dataset = ShardDataset(  # its __new__ makes a MixDataset of a Mixture
                mixture,  # type: ignore[arg-type]
                config=StreamConfig(seed=spec["seed"]),
                rank=spec["rank"],
                world_size=spec["world_size"],
            )
        self.loader = ShardLoader(
            self.dataset, batch_size=spec["batch_size"], num_workers=0, collate_fn=collate_ids
        )

    def state_dict(self) -> Any:
        """The system's state after the batches served so far."""
        return self.dataset.state_dict() if self.system == "hf" else self.loader.state_dict()

    def load_state_dict(self, state: Any) -> None:
        """Continue from ``state``."""
        if self.system == "hf":
            self.dataset.load_state_dict(state)
        else:
            self.loader.load_state_dict(state)


def _import_system(system: str) -> None:
    """Import the system before the clock starts."""
    if system == "mosaic":
        import streaming  # noqa: F401
    elif system == "hf":
        import datasets  # noqa: F401
    else:
        import shardloader.loader  # noqa: F401


def run_rank(spec: dict[str, Any]) -> dict[str, Any]:
    """Serve up to ``num_batches`` batches on this rank; save the state after ``save_after``."""
    import torch

    torch.set_num_threads(1)
    _import_system(spec["system"])
    started = time.perf_counter()
    run = RankRun(spec)
    if spec.get("state_in"):
        run.load_state_dict(json.loads(Path(spec["state_in"]).read_text()))
    batches: list[list[str]] = []
    state = None
    for batch in run.loader:
        batches.append(batch["id"])
        if len(batches) == spec.get("save_after"):
            state = run.state_dict()
        if len(batches) == spec["num_batches"]:
            break
    job_s = time.perf_counter() - started
    if state is not None:
        Path(spec["state_out"]).write_text(json.dumps(state))
    return {"batches": batches, "job_s": job_s}
