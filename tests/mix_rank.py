"""One rank of a mixture run, as a real process (``tests/test_mix.py``).

``python tests/mix_rank.py SPEC.json RANK`` reads the mixture, topology and stop point from the
spec, iterates a `ShardLoader` over the mixture and writes ``OUT-rankR.json``: per step, the
``(source, sample_id)`` pairs of a samples mix or the ``(source, sample_id, tokens)`` of a token
mix, and the loader state when it stopped. Rank and world size come from ``RANK`` and
``WORLD_SIZE`` (or torch.distributed under torchrun).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def main(spec_path: str) -> None:
    import torch.distributed as dist

    from shardloader import Mixture, PackConfig, ShardDataset, ShardLoader, StreamConfig

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("gloo"):
        dist.init_process_group("gloo")
    rank = int(os.environ.get("RANK", "0"))
    mix = Mixture.from_dict(spec["mixture"])
    pack = PackConfig(seq_len=spec["seq_len"]) if mix.unit == "tokens" else None
    dataset = ShardDataset(
        mix,
        config=StreamConfig(seed=spec.get("seed", 0)),
        pack=pack,
        storage_options=spec.get("storage_options"),
    )
    collate = None if pack is not None else _ids
    loader = ShardLoader(
        dataset, batch_size=spec["batch_size"], num_workers=spec["num_workers"], collate_fn=collate
    )
    if spec.get("load"):
        loader.load_state_dict(json.loads(Path(spec["load"]).read_text()))
    steps: list[Any] = []
    stop = spec.get("stop")
    for _ in range(spec.get("epochs", 1)):
        for batch in loader:
            if pack is not None:
                batch = _token_pieces(batch)
            steps.append(batch)
            if stop is not None and len(steps) == stop:
                break
        if stop is not None and len(steps) == stop:
            break
    out = {"steps": steps, "state": loader.state_dict(), "counters": loader.mix_counters()}
    Path(f"{spec['out']}-rank{rank}.json").write_text(json.dumps(out))
    if spec.get("gloo"):
        dist.destroy_process_group()


def _ids(samples: list[dict[str, Any]]) -> list[list[Any]]:
    return [[s["source"], s["sample_id"]] for s in samples]


def _token_pieces(batch: dict[str, Any]) -> list[list[Any]]:
    """Each document piece of the step: source, sample id, its tokens."""
    ids = batch["input_ids"].reshape(-1).tolist()
    lengths = batch["cu_seqlens"].diff().tolist()
    out, at = [], 0
    for source, sample, n in zip(
        batch["sample_sources"].tolist(), batch["sample_ids"].tolist(), lengths, strict=True
    ):
        out.append([source, sample, ids[at : at + n]])
        at += n
    return out


if __name__ == "__main__":
    main(sys.argv[1])
