"""Training: schedule, checkpoints, learning, exact resume, and real torchrun runs (2 nodes x 2).

The torchrun tests launch ``python -m shardloader.train`` as a user would, with ``--log-samples``:
every rank writes the sample ids of each step, and the tests check exact sets across ranks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from shardloader import ConfigError, ConvertConfig, ResumeError, convert, read_manifest
from shardloader.options import add_options, config_from_args
from shardloader.pack import PackConfig, empty_batch
from shardloader.testing import S3Server
from shardloader.train import TrainConfig, lr_at, train
from shardloader.train.checkpoint import latest_checkpoint, list_checkpoints
from shardloader.train.loop import check_not_empty
from shardloader.train.model import build_model, forward_loss_sum
from shardloader.train.safe_load import read_trainer_state
from tests.conftest import ROOT, make_docs, write_jsonl
from tests.streaming import NUM_SAMPLES, make_dataset


@pytest.fixture(scope="module")
def token_data(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """1,003 tokenized documents in 7 uneven shards (vocabulary 600)."""
    return make_dataset(tmp_path_factory.mktemp("train"), tokenizer=str(tokenizer_dir))


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One intra-op thread, as torchrun's ranks get (OMP_NUM_THREADS=1): on a 2-core machine
    shared with other processes, spinning OpenMP threads slow a step down 100-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_run(data: Path, out: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = dict(
        data=str(data),
        output_dir=str(out),
        model="tiny",
        seq_len=64,
        batch_size=4,
        lr=3e-3,
        warmup_steps=3,
        num_workers=0,
        log_samples=True,
        deterministic=True,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def samples_by_rank(out: Path) -> dict[int, list[dict[str, Any]]]:
    files = sorted((out / "samples").glob("rank-*.jsonl"))
    return {int(f.stem.split("-")[1]): read_jsonl(f) for f in files}


def losses(out: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_jsonl(out / "metrics.jsonl")]


# --- pure parts ------------------------------------------------------------------------------


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor() -> None:
    rates = [lr_at(s, lr=1.0, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(0, 25)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert rates[4] == 1.0
    assert all(a >= b for a, b in zip(rates[4:], rates[5:], strict=False))
    assert rates[12] == pytest.approx(0.1 + 0.9 * 0.5)
    assert rates[20] == pytest.approx(0.1)
    assert rates[24] == pytest.approx(0.1)


def test_flags_mirror_the_config_fields() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_options(parser, TrainConfig)
    args = parser.parse_args(
        ["data/", "--output-dir", "o", "--max-steps", "7", "--no-shuffle", "--lr", "0.01"]
    )
    config = config_from_args(TrainConfig, args)
    assert (config.data, config.output_dir, config.max_steps) == ("data/", "o", 7)
    assert config.shuffle is False
    assert config.lr == 0.01
    assert config.tokenizer is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"parallel": "zero3"}, "parallel must be one of ddp, fsdp"),
        ({"pack_mode": "tight"}, "mode must be one of"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"shuffle_unit": "row"}, "shuffle_unit must be one of auto, shard, block"),
        ({"long_docs": "fold"}, "long_docs must be"),
        ({"shuffle_window": 0}, "shuffle_window must be >= 1"),
    ],
)
def test_bad_settings_are_named(overrides: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        small_run(tmp_path, tmp_path / "out", **overrides)


def test_a_mixture_is_packed_end_to_end_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a mixture packs documents end to end"):
        TrainConfig(mix="m.yaml", output_dir=str(tmp_path), pack_mode="bfd")
    assert TrainConfig(mix="m.yaml", output_dir=str(tmp_path)).pack_config().mode == "concat"
    chat = TrainConfig(data="d", output_dir=str(tmp_path)).pack_config(chat=True)
    assert (chat.mode, chat.long_docs) == ("bfd", "auto")
    assert TrainConfig(data="d", output_dir=str(tmp_path)).pack_config().mode == "concat"


def test_a_missing_model_path_is_named(token_data: Path, tmp_path: Path) -> None:
    import multiprocessing

    # The loader starts before the model is built: its workers end when the model fails.
    config = small_run(
        token_data, tmp_path / "out", model=str(tmp_path / "no-such-model"), num_workers=2
    )
    before = set(multiprocessing.active_children())
    with pytest.raises(ConfigError, match="no-such-model: no such model directory") as caught:
        train(config)
    assert caught.traceback  # (the failed trainer stays reachable from it)
    assert set(multiprocessing.active_children()) <= before


def convert_docs(root: Path, docs: list[dict[str, Any]], **settings: Any) -> Path:
    corpus = write_jsonl(root / "corpus" / "part.jsonl", docs)
    out = root / "dataset"
    convert([str(corpus)], ConvertConfig(output=str(out), num_proc=1, **settings))
    return out


@pytest.mark.parametrize("settings", [{"epochs": 1}, {"max_steps": 3}])
def test_an_empty_dataset_is_refused_before_any_step(
    tmp_path: Path, tokenizer_dir: Path, settings: dict[str, Any]
) -> None:
    # Hardening: with --max-steps this spun for ever; with --epochs it blamed the token count.
    empty = convert_docs(tmp_path, [], tokenizer=str(tokenizer_dir))
    assert read_manifest(str(empty)).num_samples == 0
    with pytest.raises(ConfigError, match=f"{empty}: the dataset holds no samples"):
        check_not_empty(read_manifest(str(empty)), str(empty))
    with pytest.raises(ConfigError, match=f"{empty}: the dataset holds no samples"):
        train(small_run(empty, tmp_path / "out", **settings))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_tokenized_shards_without_tokens_are_refused() -> None:
    # convert refuses empty documents, so only a hand-made manifest holds samples of no tokens.
    manifest = SimpleNamespace(num_samples=3, tokenized=True, num_tokens=0, shards=[1])
    with pytest.raises(ConfigError, match="data/: the dataset holds 3 samples but no tokens"):
        check_not_empty(manifest, "data/")  # type: ignore[arg-type]
    check_not_empty(SimpleNamespace(num_samples=3, tokenized=False, num_tokens=0), "text/")  # type: ignore[arg-type]


def test_cli_on_an_empty_dataset_fails_fast_and_names_it(tmp_path: Path) -> None:
    empty = convert_docs(tmp_path, [])
    result = subprocess.run(
        [sys.executable, "-m", "shardloader.train", str(empty), "--output-dir", str(tmp_path)]
        + ["--max-steps", "3", "--num-workers", "0"],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=120,  # the bug this guards against was an endless loop
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"{empty}: the dataset holds no samples" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", ["concat", "bfd", "pad"])
def test_the_empty_batch_of_an_idle_rank_trains_nothing(mode: str) -> None:
    model = build_model("tiny", vocab_size=50, max_positions=16, seed=0)
    batch = empty_batch(PackConfig(seq_len=16, mode=mode), 2)
    summed = forward_loss_sum(
        model, batch, device=torch.device("cpu"), autocast=None, attn_implementation="sdpa"
    )
    summed.backward()
    assert float(summed.detach()) == 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no gradient reached the parameters"
    assert all(torch.isfinite(g).all() and not g.any() for g in grads)


# --- in-process training ---------------------------------------------------------------------


def test_loss_falls_on_a_memorizable_corpus(token_data: Path, tmp_path: Path) -> None:
    # The documents are made of 12 fixed phrases: a model that learns predicts them well.
    result = train(small_run(token_data, tmp_path / "out", max_steps=60))
    first = sum(m.loss for m in result.history[:5]) / 5
    last = sum(m.loss for m in result.history[-5:]) / 5
    assert math.log(600) - 0.5 < first  # starts near uniform over the vocabulary
    assert last < 0.5 * first, (first, last)
    assert result.steps == 60
    assert result.tokens > 60 * 4 * 40
    assert [m["step"] for m in read_jsonl(tmp_path / "out" / "metrics.jsonl")] == list(range(1, 61))


def test_the_trained_model_is_written_and_fine_tuned_from(token_data: Path, tmp_path: Path) -> None:
    first = train(small_run(token_data, tmp_path / "a", max_steps=40))
    model_dir = tmp_path / "a" / "model"
    assert (model_dir / "config.json").is_file()
    # Fine-tuning from the written weights starts where the first run ended, not from scratch.
    again = train(small_run(token_data, tmp_path / "b", max_steps=2, model=str(model_dir)))
    fresh = train(small_run(token_data, tmp_path / "c", max_steps=2))
    assert again.history[0].loss < first.history[-1].loss + 0.5
    assert again.history[0].loss < fresh.history[0].loss - 1.0


def test_one_epoch_trains_every_document_once(token_data: Path, tmp_path: Path) -> None:
    result = train(small_run(token_data, tmp_path / "out", epochs=1, shuffle=True))
    steps = samples_by_rank(tmp_path / "out")[0]
    ids = [i for s in steps for i in s["sample_ids"]]
    # A document cut between two rows appears in both steps' lists; nothing else repeats.
    assert set(ids) == set(range(NUM_SAMPLES))
    assert len(ids) - len(set(ids)) < len(steps)
    assert result.steps == len(steps)
    assert result.checkpoint is not None


def test_two_epochs_train_every_document_once_per_epoch(token_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    train(small_run(token_data, out, epochs=2, seq_len=256, batch_size=8))
    epoch_of = {m["step"]: m["epoch"] for m in read_jsonl(out / "metrics.jsonl")}
    per_epoch: dict[int, set[int]] = {0: set(), 1: set()}
    for s in samples_by_rank(out)[0]:
        per_epoch[epoch_of[s["step"]]].update(s["sample_ids"])
    assert per_epoch[0] == per_epoch[1] == set(range(NUM_SAMPLES))


def test_text_shards_are_tokenized_in_the_workers(tmp_path: Path, tokenizer_dir: Path) -> None:
    text = make_dataset(tmp_path / "text")
    with pytest.raises(ConfigError, match="text shards; pass --tokenizer"):
        train(small_run(text, tmp_path / "none", max_steps=2))
    result = train(small_run(text, tmp_path / "out", max_steps=3, tokenizer=str(tokenizer_dir)))
    assert result.steps == 3
    assert all(m.tokens > 0 for m in result.history)


def test_resume_in_process_continues_exactly(token_data: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    train(small_run(token_data, full, max_steps=12, schedule_steps=12, num_workers=2))
    part = tmp_path / "part"
    train(
        small_run(
            token_data, part, max_steps=7, schedule_steps=12, num_workers=2, checkpoint_every=3
        )
    )
    assert [s for s, _ in list_checkpoints(part / "checkpoints")] == [6, 7]
    shutil.rmtree(part / "checkpoints" / "step-00000007")  # as if killed after step 7's save
    resumed = train(
        small_run(token_data, part, max_steps=12, schedule_steps=12, num_workers=2, resume=True)
    )
    assert resumed.history[0].step == 7  # steps 1-6 came from the checkpoint
    assert losses(part) == losses(full)
    assert samples_by_rank(part) == samples_by_rank(full)


def test_gradient_accumulation_matches_one_big_batch(token_data: Path, tmp_path: Path) -> None:
    # The same rows in the same order (no workers): 1 x 4 rows, or 2 micro-batches of 2 rows.
    # The loss is normalized by the step's token count, so the updates agree.
    whole = train(small_run(token_data, tmp_path / "a", max_steps=6, batch_size=4))
    split = train(small_run(token_data, tmp_path / "b", max_steps=6, batch_size=2, grad_accum=2))
    assert [m.tokens for m in split.history] == [m.tokens for m in whole.history]
    for a, b in zip(whole.history, split.history, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
    assert samples_by_rank(tmp_path / "a") == samples_by_rank(tmp_path / "b")


def test_resume_of_a_finished_run_does_nothing(token_data: Path, tmp_path: Path) -> None:
    train(small_run(token_data, tmp_path / "out", max_steps=4))
    again = train(small_run(token_data, tmp_path / "out", max_steps=4, resume=True))
    assert again.steps == 4
    assert again.history == []
    assert [s for s, _ in list_checkpoints(tmp_path / "out" / "checkpoints")] == [4]


def test_partial_and_foreign_checkpoints_are_never_loaded(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    (root / "step-00000009.partial").mkdir(parents=True)  # a save killed half-way
    (root / "step-00000008").mkdir()  # renamed, but without its trainer state
    assert latest_checkpoint(root) is None
    torch.save(
        {"kind": "shardloader.trainer_state", "version": 99}, root / "step-00000008" / "trainer.pt"
    )
    with pytest.raises(ResumeError, match="version 99"):
        read_trainer_state(root / "step-00000008")


# --- torchrun ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_cmd(launch: list[str], data: str, out: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launch,
        "-m",
        "shardloader.train",
        data,
        "--output-dir",
        str(out),
        "--model",
        "tiny",
        "--seq-len",
        "64",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "3",
        "--log-samples",
        "--deterministic",
        *flags,
    ]


def run_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra or {})}


def run_torchrun(nproc: int, data: str, out: Path, *flags: str) -> str:
    """``python -m shardloader.train`` on ``nproc`` local ranks; fails on a non-zero exit.

    Returns:
        Its output (stdout, then stderr).
    """
    launch = ["--standalone", f"--nproc_per_node={nproc}"]
    result = subprocess.run(
        torchrun_cmd(launch, data, out, *flags),
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def check_epoch(by_rank: dict[int, list[dict[str, Any]]], world_size: int) -> list[set[int]]:
    """Each rank's documents: disjoint, equal counts, the epoch less N % world_size."""
    docs = [{i for s in by_rank[r] for i in s["sample_ids"]} for r in range(world_size)]
    assert len({len(d) for d in docs}) == 1, [len(d) for d in docs]
    union = set().union(*docs)
    assert sum(len(d) for d in docs) == len(union)
    assert union <= set(range(NUM_SAMPLES))
    assert len(union) == NUM_SAMPLES - NUM_SAMPLES % world_size
    return docs


@pytest.mark.slow
@pytest.mark.torchrun
@pytest.mark.s3
def test_two_nodes_of_two_processes_train_an_epoch_from_s3(
    token_data: Path, tmp_path: Path
) -> None:
    with S3Server() as s3:
        shutil.copytree(token_data, s3.data_dir / "data" / "set")
        port = free_port()
        out = tmp_path / "out"
        launch = [
            "--nnodes=2",
            "--nproc_per_node=2",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=test-2x2",
        ]
        flags = ("--num-workers", "1", "--cache-dir", str(tmp_path / "cache"))
        nodes = [
            subprocess.Popen(
                torchrun_cmd(launch, "s3://data/set", out, *flags),
                cwd=ROOT,
                env=run_env(s3.env),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            for _ in range(2)
        ]
        try:
            logs = [node.communicate(timeout=400)[0] for node in nodes]
        finally:
            for node in nodes:
                if node.poll() is None:
                    os.killpg(node.pid, signal.SIGKILL)
        assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    by_rank = samples_by_rank(out)
    assert sorted(by_rank) == [0, 1, 2, 3]
    check_epoch(by_rank, 4)
    assert len({len(steps) for steps in by_rank.values()}) == 1  # every rank took every step
    history = read_jsonl(out / "metrics.jsonl")
    assert history[-1]["loss"] < history[0]["loss"] - 1.0
    assert all(0 <= m["data_wait_fraction"] <= 1 and m["tokens_per_s"] > 0 for m in history)


def wait_for(path: Path, proc: subprocess.Popen[str], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended before {path} appeared:\n{proc.stdout.read()[-3000:]}"
            )  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.01)


def kill_at_checkpoint(cmd: list[str], out: Path, step: int, max_steps: int) -> list[int]:
    """Start ``cmd`` (a torchrun training job), ``kill -9`` it once checkpoint ``step`` exists.

    Returns:
        The steps of the checkpoints that survived: at least one, all before ``max_steps`` (the
        run was killed mid-way, so a resume test is not vacuous).
    """
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(out / "checkpoints" / f"step-{step:08d}", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun, its ranks and their DataLoader workers
        proc.wait()
    saved = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert saved, "no checkpoint survived the kill"
    assert max(saved) < max_steps, saved
    return saved


@pytest.mark.slow
@pytest.mark.torchrun
def test_kill_9_then_resume_gives_the_same_losses_and_samples(
    token_data: Path, tmp_path: Path
) -> None:
    steps = ("--max-steps", "40", "--checkpoint-every", "5", "--num-workers", "2")
    full = tmp_path / "full"
    run_torchrun(2, str(token_data), full, *steps)

    killed = tmp_path / "killed"
    launch = ["--standalone", "--nproc_per_node=2"]
    kill_at_checkpoint(torchrun_cmd(launch, str(token_data), killed, *steps), killed, 10, 40)
    run_torchrun(2, str(token_data), killed, *steps, "--resume")
    assert losses(killed) == losses(full)
    assert samples_by_rank(killed) == samples_by_rank(full)


@pytest.mark.slow
@pytest.mark.torchrun
def test_resume_on_fewer_processes_finishes_the_epoch(token_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = str(token_data)
    run_torchrun(4, data, out, "--max-steps", "12", "--schedule-steps", "60", "--num-workers", "1")
    head = samples_by_rank(out)
    head_docs = check_partial(head, 4)
    run_torchrun(2, data, out, "--schedule-steps", "60", "--num-workers", "1", "--resume")
    both = samples_by_rank(out)
    tail = {r: [s for s in steps if s["step"] > 12] for r, steps in both.items()}
    assert all(not tail[r] for r in (2, 3))  # the 2-process run wrote only ranks 0 and 1
    tail_docs = [{i for s in tail[r] for i in s["sample_ids"]} for r in (0, 1)]
    assert len(tail_docs[0] & tail_docs[1]) == 0
    served = head_docs | tail_docs[0] | tail_docs[1]
    # Documents cut at the checkpoint by a row boundary continue on a new rank: at most one
    # per old rank is seen on both sides. Nothing else repeats, and nothing is lost.
    assert len(head_docs & (tail_docs[0] | tail_docs[1])) <= 4
    assert NUM_SAMPLES - len(served) <= (4 - 1) + (2 - 1)


@pytest.mark.slow
@pytest.mark.torchrun
def test_fewer_documents_than_ranks_stops_instead_of_spinning(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    data = convert_docs(tmp_path, make_docs(1), tokenizer=str(tokenizer_dir))
    launch = ["--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        torchrun_cmd(launch, str(data), tmp_path / "out", "--max-steps", "3"),
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,  # the bug this guards against was an endless loop
    )
    assert result.returncode != 0
    assert "gave no batch on any of the 2 ranks" in result.stderr, result.stderr[-3000:]


def check_partial(by_rank: dict[int, list[dict[str, Any]]], world_size: int) -> set[int]:
    docs = [{i for s in by_rank[r] for i in s["sample_ids"]} for r in range(world_size)]
    union = set().union(*docs)
    assert sum(len(d) for d in docs) == len(union)  # disjoint
    return union


@pytest.mark.slow
@pytest.mark.torchrun
def test_fsdp_matches_ddp_and_resumes_from_sharded_checkpoints(
    token_data: Path, tmp_path: Path
) -> None:
    data = str(token_data)
    steps = ("--schedule-steps", "8", "--num-workers", "1")
    run_torchrun(2, data, tmp_path / "ddp", *steps, "--max-steps", "8")
    run_torchrun(2, data, tmp_path / "fsdp", *steps, "--max-steps", "5", "--parallel", "fsdp")
    shards = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints" / "step-00000005").iterdir())
    assert "__0_0.distcp" in shards
    assert "__1_0.distcp" in shards
    run_torchrun(
        2, data, tmp_path / "fsdp", *steps, "--max-steps", "8", "--parallel", "fsdp", "--resume"
    )
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert [s for s, _ in fsdp] == list(range(1, 9))
    # Same data, same math; sharded reductions add in another order, hence approx.
    assert [loss for _, loss in fsdp] == pytest.approx([loss for _, loss in ddp], rel=1e-4)
    assert samples_by_rank(tmp_path / "fsdp") == samples_by_rank(tmp_path / "ddp")
    # The exported weights: gathered from the FSDP shards, they match the DDP run's.
    from transformers import AutoModelForCausalLM

    ddp_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ddp" / "model"))
    fsdp_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fsdp" / "model"))
    ddp_params = dict(ddp_model.named_parameters())
    for name, param in fsdp_model.named_parameters():
        torch.testing.assert_close(param, ddp_params[name], rtol=1e-3, atol=1e-4)
