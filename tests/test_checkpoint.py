"""Checkpoints: planted pickles never run, damage is found and skipped, a wrong model stops.

Most tests save a tiny model with the real torch.distributed.checkpoint in this process; one runs
``python -m shardloader.train`` under torchrun (2 ranks) and resumes past a damaged checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from shardloader import CheckpointDamagedError, ResumeError
from shardloader.train.checkpoint import load_checkpoint, resume_checkpoint, save_checkpoint
from shardloader.train.safe_load import CHECKSUMS_FILE, describe_file
from tests.test_train import read_jsonl, run_torchrun

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def make_model(seed: int, hidden: int = 8) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A tiny model and an AdamW that has taken one step (so it has state)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3 * (seed + 1))
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def save(root: Path, step: int) -> tuple[Path, nn.Module, torch.optim.Optimizer]:
    model, optimizer = make_model(step)
    path = save_checkpoint(root, step, model, optimizer, {"step": step}, keep=0)
    return path, model, optimizer


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    buf_a, buf_b = io.BytesIO(), io.BytesIO()
    torch.save(a, buf_a)
    torch.save(b, buf_b)
    return buf_a.getvalue() == buf_b.getvalue()


def rehash(path: Path) -> None:
    """Record a planted file's new sha256, as an attacker who can write the directory would."""
    file = path / CHECKSUMS_FILE
    listing = json.loads(file.read_text())
    for name in listing["files"]:
        listing["files"][name] = describe_file(path / name)
    file.write_text(json.dumps(listing))


class Planted:
    """Unpickling this creates the marker file: what a planted pickle would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def plant_in_metadata(path: Path, marker: Path) -> str:
    metadata = pickle.loads((path / ".metadata").read_bytes())  # our own file, in the test
    metadata.storage_meta = Planted(marker)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    return ".metadata"


def plant_in_trainer_state(path: Path, marker: Path) -> str:
    state = torch.load(path / "trainer.pt", weights_only=True)
    torch.save({**state, "extra": Planted(marker)}, path / "trainer.pt")
    return "trainer.pt"


def plant_in_distcp_value(path: Path, marker: Path) -> str:
    """Point the optimizer's learning rate (a non-tensor value DCP stores as torch.save bytes)
    at a pickle appended to the .distcp file."""
    metadata = pickle.loads((path / ".metadata").read_bytes())
    blob = io.BytesIO()
    torch.save(Planted(marker), blob)
    for index, info in metadata.storage_data.items():
        if index.fqn == "optim.param_groups.0.lr":
            data = path / info.relative_path
            info.offset, info.length = data.stat().st_size, len(blob.getvalue())
            with open(data, "ab") as f:
                f.write(blob.getvalue())
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    return "__0_0.distcp"


@pytest.mark.parametrize(
    "plant", [plant_in_metadata, plant_in_trainer_state, plant_in_distcp_value]
)
def test_a_planted_pickle_never_runs_and_resume_stops_naming_the_file(
    tmp_path: Path, plant: Any
) -> None:
    root = tmp_path / "checkpoints"
    save(root, 1)  # an older intact checkpoint: tampering must not fall back to it silently
    path, _, _ = save(root, 2)
    marker = tmp_path / "marker"
    name = plant(path, marker)
    rehash(path)
    with pytest.raises(ResumeError, match=re.escape(str(path / name)) + ": refused") as info:
        resume_checkpoint(root, *make_model(9))
    assert not isinstance(info.value, CheckpointDamagedError)
    assert not marker.exists()
    # The planted pickle is real: plain pickle or torch.load would have run it.
    if name != "__0_0.distcp":
        with open(path / name, "rb") as f:
            torch.load(f, weights_only=False) if name == "trainer.pt" else pickle.load(f)
        assert marker.exists()


def test_save_then_resume_restores_model_and_optimizer_exactly(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    path, model, optimizer = save(root, 3)
    listed = json.loads((path / CHECKSUMS_FILE).read_text())["files"]
    assert sorted(listed) == [".metadata", "__0_0.distcp", "trainer.pt"]
    fresh, fresh_optimizer = make_model(7)
    assert not same_state(fresh.state_dict(), model.state_dict())
    found = resume_checkpoint(root, fresh, fresh_optimizer)
    assert found is not None
    assert found[0] == path
    assert found[1]["step"] == 3
    assert same_state(fresh.state_dict(), model.state_dict())
    assert same_state(fresh_optimizer.state_dict(), optimizer.state_dict())
    assert resume_checkpoint(tmp_path / "none", fresh, fresh_optimizer) is None


def flip_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10
    file.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("__0_0.distcp", flip_bit),
        ("__0_0.distcp", lambda f: f.write_bytes(f.read_bytes()[:-100])),
        ("__0_0.distcp", lambda f: f.write_bytes(b"")),
        (".metadata", flip_bit),
        ("trainer.pt", lambda f: f.write_bytes(f.read_bytes()[:200])),
        ("trainer.pt", lambda f: f.unlink()),
        (CHECKSUMS_FILE, lambda f: f.write_text(f.read_text()[:50])),
    ],
)
def test_damage_is_refused_naming_the_file(tmp_path: Path, name: str, damage: Any) -> None:
    path, _, _ = save(tmp_path, 1)
    damage(path / name)
    with pytest.raises(CheckpointDamagedError, match=re.escape(str(path / name))):
        load_checkpoint(path, *make_model(9))
    with pytest.raises(ResumeError, match=f"{tmp_path}: no intact checkpoint.*{re.escape(name)}"):
        resume_checkpoint(tmp_path, *make_model(9))


def test_resume_falls_back_past_a_damaged_checkpoint_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, older, older_optimizer = save(tmp_path, 1)
    newer, _, _ = save(tmp_path, 2)
    flip_bit(newer / "__0_0.distcp")
    model, optimizer = make_model(9)
    with caplog.at_level(logging.WARNING, logger="shardloader.train.checkpoint"):
        found = resume_checkpoint(tmp_path, model, optimizer)
    assert found is not None
    assert found[0] == tmp_path / "step-00000001"
    assert found[1]["step"] == 1
    assert same_state(model.state_dict(), older.state_dict())
    assert same_state(optimizer.state_dict(), older_optimizer.state_dict())
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(newer / "__0_0.distcp") in warned
    assert "step-00000001, older than the damaged" in warned


def test_a_different_model_stops_and_never_falls_back(tmp_path: Path) -> None:
    save(tmp_path, 1)
    newer, _, _ = save(tmp_path, 2)
    wider = make_model(9, hidden=16)
    with pytest.raises(ResumeError, match=f"{newer}: cannot load the model and optimizer") as info:
        resume_checkpoint(tmp_path, *wider)
    assert not isinstance(info.value, CheckpointDamagedError)
    assert "model settings the checkpoint was written with" in str(info.value)


def test_listed_names_outside_the_directory_are_refused(tmp_path: Path) -> None:
    path, _, _ = save(tmp_path, 1)
    listing = json.loads((path / CHECKSUMS_FILE).read_text())
    listing["files"]["../../secret"] = listing["files"]["trainer.pt"]
    (path / CHECKSUMS_FILE).write_text(json.dumps(listing))
    with pytest.raises(CheckpointDamagedError, match="'../../secret', not a file of this"):
        load_checkpoint(path, *make_model(9))


def steps_under(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def save_keeping_two(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    caplog: pytest.LogCaptureFixture,
) -> list[str]:
    """Save ``step`` with ``keep=2``; the log lines of the checkpoints pruning removed."""
    with caplog.at_level(logging.INFO, logger="shardloader.train.checkpoint"):
        save_checkpoint(root, step, model, optimizer, {"step": step}, keep=2)
    return [r.getMessage() for r in caplog.records if ": removed, " in r.getMessage()]


def test_pruning_after_a_fallback_keeps_intact_checkpoints_not_the_damaged_newer_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for step in (1, 2, 4):
        save(tmp_path, step)
    flip_bit(tmp_path / "step-00000004" / "__0_0.distcp")
    model, optimizer = make_model(9)
    found = resume_checkpoint(tmp_path, model, optimizer)
    assert found is not None
    assert found[0].name == "step-00000002"
    (tmp_path / "step-00000009.partial").mkdir()  # a save killed half-way
    removed = save_keeping_two(tmp_path, 3, model, optimizer, caplog)
    # Two intact checkpoints are kept (counting step 4 would have kept only step 3); the damaged
    # step 4 is newer than both, so it stays for its files to be restored or step 4 saved again.
    assert steps_under(tmp_path) == ["step-00000002", "step-00000003", "step-00000004"]
    assert removed == [
        f"{tmp_path / 'step-00000009.partial'}: removed, a save that never finished",
        f"{tmp_path / 'step-00000001'}: removed, older than the 2 newest intact checkpoints "
        "(keep=2)",
    ]
    found = resume_checkpoint(tmp_path, *make_model(9))
    assert found is not None
    assert found[0].name == "step-00000003"


def test_pruning_removes_damaged_checkpoints_older_than_the_newest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for step in (1, 2, 3):
        save(tmp_path, step)
    flip_bit(tmp_path / "step-00000002" / "__0_0.distcp")
    (tmp_path / "step-00000003" / "trainer.pt").unlink()
    model, optimizer = make_model(4)
    removed = save_keeping_two(tmp_path, 4, model, optimizer, caplog)
    # The damaged steps 2 and 3 take no keep slot: the intact step 1 is the second one kept.
    assert steps_under(tmp_path) == ["step-00000001", "step-00000004"]
    assert len(removed) == 2
    for message, step, file in zip(removed, (3, 2), ("trainer.pt", "__0_0.distcp"), strict=True):
        path = tmp_path / f"step-{step:08d}"
        assert message.startswith(f"{path}: removed, damaged ({path / file}: ")
        assert message.endswith(f"older than the intact {tmp_path / 'step-00000004'}")


# --- torchrun --------------------------------------------------------------------------------


def torchrun(data: Path, out: Path, *flags: str) -> str:
    return run_torchrun(2, str(data), out, "--num-workers", "1", *flags)


@pytest.mark.slow
@pytest.mark.torchrun
def test_torchrun_resume_skips_a_damaged_checkpoint(token_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    flags = ("--schedule-steps", "8", "--checkpoint-every", "3")
    torchrun(token_dir, out, *flags, "--max-steps", "6")
    first = {m["step"]: m["loss"] for m in read_jsonl(out / "metrics.jsonl")}
    damaged = out / "checkpoints" / "step-00000006" / "__1_0.distcp"  # rank 1's share
    flip_bit(damaged)
    logs = torchrun(token_dir, out, *flags, "--max-steps", "8", "--resume")
    assert f"{damaged}: " in logs
    assert "skipping the damaged checkpoint" in logs
    assert re.search(r"resumed from \S*step-00000003 \(step 3\)", logs)
    again = {m["step"]: m["loss"] for m in read_jsonl(out / "metrics.jsonl")}
    assert sorted(again) == list(range(1, 9))
    # Steps 4-6 were trained again from step 3's weights: the same losses (deterministic run).
    assert [again[s] for s in (4, 5, 6)] == pytest.approx([first[s] for s in (4, 5, 6)])
