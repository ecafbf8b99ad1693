"""The README's "Fine-tune on chat data", end to end: JSONL conversations to a LoRA-tuned model.

The three commands run as a user runs them (``train-tokenizer`` with the default chat template,
``convert --tokenizer`` rendering every conversation, then ``python -m shardloader.train`` under
torchrun with 2 processes on CPU, LoRA and an eval set), and the results are checked against
computations that use none of shardloader's rendering or packing: transformers' own
``apply_chat_template(..., return_assistant_tokens_mask=True)`` on the raw JSONL says which
tokens are the assistant's, and plain torch on the merged model gives the loss.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from shardloader.cli import main as cli_main
from shardloader.verify import iter_samples
from tests.conftest import ROOT
from tests.test_train import (
    kill_at_checkpoint,
    read_jsonl,
    run_env,
    run_torchrun,
    samples_by_rank,
)
from tools.make_chat_corpus import main as make_chat_corpus

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

NUM_TRAIN, NUM_EVAL = 600, 80  # an even eval count: 2 ranks evaluate every conversation


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Conversations, a tokenizer with the default template, and both splits converted."""
    root = tmp_path_factory.mktemp("chat")
    assert make_chat_corpus([str(root / "data"), "--train", str(NUM_TRAIN), "--eval",
                             str(NUM_EVAL)]) == 0  # fmt: skip
    tok = root / "tok"
    assert cli_main(["train-tokenizer", str(root / "data" / "train.jsonl"), "-o", str(tok),
                     "--vocab-size", "512"]) == 0  # fmt: skip
    for split in ("train", "eval"):
        assert cli_main(["convert", str(root / "data" / f"{split}.jsonl"), "-o",
                         str(root / split), "--tokenizer", str(tok)]) == 0  # fmt: skip
    return {"root": root, "tok": tok, "train": root / "train", "eval": root / "eval"}


def assistant_tokens(chat: dict[str, Path], split: str) -> dict[str, tuple[list[int], list[int]]]:
    """Per conversation id: its ids and assistant mask, from transformers on the raw JSONL."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(chat["tok"]), local_files_only=True)
    out = {}
    for line in (chat["root"] / "data" / f"{split}.jsonl").read_text().splitlines():
        record = json.loads(line)
        ref = hf.apply_chat_template(
            record["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        out[record["id"]] = (list(ref["input_ids"]), list(ref["assistant_masks"]))
    return out


FLAGS = (
    "--seq-len", "128", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "3",
    "--max-steps", "24", "--num-workers", "1", "--checkpoint-every", "6",
    "--lora-rank", "8", "--lora-alpha", "16", "--merge-lora", "--eval-every", "12",
)  # fmt: skip


def launch(chat: dict[str, Path], out: Path) -> list[str]:
    from tests.test_train import torchrun_cmd

    return torchrun_cmd(
        ["--standalone", "--nproc_per_node=2"], str(chat["train"]), out, *FLAGS,
        "--eval-data", str(chat["eval"]),
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(chat: dict[str, Path]) -> Path:
    out = chat["root"] / "run"
    run_torchrun(2, str(chat["train"]), out, *FLAGS, "--eval-data", str(chat["eval"]))
    return out


@pytest.mark.slow
@pytest.mark.torchrun
def test_the_assistant_token_loss_falls(run: Path) -> None:
    history = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in history] == list(range(1, 25))
    assert history[-1]["loss"] < history[0]["loss"] - 0.3, [m["loss"] for m in history]
    evals = [m["eval_loss"] for m in history if "eval_loss" in m]
    assert len(evals) == 2
    assert evals[1] < evals[0]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.torchrun
def test_prompts_are_never_trained(chat: dict[str, Path], run: Path) -> None:
    """Each step trains exactly the assistant tokens of the conversations it read."""
    ids_of = {s["sample_id"]: s["id"] for s in iter_samples(str(chat["train"]))}
    reference = assistant_tokens(chat, "train")
    history = read_jsonl(run / "metrics.jsonl")
    by_rank = samples_by_rank(run)
    assert sorted(by_rank) == [0, 1]
    for i, metrics in enumerate(history):
        sample_ids = [sid for rank in (0, 1) for sid in by_rank[rank][i]["sample_ids"]]
        assert len(sample_ids) == len(set(sample_ids))  # whole conversations: one piece each
        want = sum(sum(reference[ids_of[sid]][1]) for sid in sample_ids)
        assert metrics["tokens"] == want, (metrics["step"], metrics["tokens"], want)


@pytest.mark.slow
@pytest.mark.torchrun
def test_eval_loss_is_the_cross_entropy_of_the_assistant_tokens_alone(
    chat: dict[str, Path], run: Path
) -> None:
    """The merged model, each eval conversation alone, transformers' assistant mask: same loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(run / "model")).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in assistant_tokens(chat, "eval").values():
            logits = model(torch.tensor([ids])).logits[0].double()
            trained = torch.tensor(mask[1:], dtype=torch.bool)  # token t predicted from t - 1
            losses = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
            total += float(losses[trained].sum())
            count += int(trained.sum())
    final = read_jsonl(run / "metrics.jsonl")[-1]
    assert final["eval_tokens"] == count
    assert final["eval_loss"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
@pytest.mark.torchrun
def test_kill_and_resume_with_lora_is_exact(chat: dict[str, Path], run: Path) -> None:
    killed = chat["root"] / "killed"
    kill_at_checkpoint(launch(chat, killed), killed, 12, 24)
    run_torchrun(2, str(chat["train"]), killed, *FLAGS, "--eval-data", str(chat["eval"]),
                 "--resume")  # fmt: skip

    def steps(out: Path) -> list[tuple[Any, ...]]:
        rows = read_jsonl(out / "metrics.jsonl")
        return [(m["step"], m["loss"], m["tokens"], m.get("eval_loss")) for m in rows]

    assert steps(killed) == steps(run)
    assert samples_by_rank(killed) == samples_by_rank(run)
    adapter = "adapter/adapter_model.safetensors"  # its config names each run's own base/
    assert (killed / adapter).read_bytes() == (run / adapter).read_bytes()


@pytest.mark.slow
@pytest.mark.torchrun
def test_the_example_script_runs(tmp_path: Path) -> None:
    """examples/chat_finetune.sh, as the README shows it (fewer steps)."""
    import sys

    out = tmp_path / "chat-output"
    env = run_env({"OUT": str(out), "STEPS": "4"})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", "examples/chat_finetune.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (out / "run" / "adapter" / "adapter_config.json").is_file()
    assert (out / "run" / "model" / "config.json").is_file()
    rows = read_jsonl(out / "run" / "metrics.jsonl")
    assert rows[-1]["step"] == 4
    assert "eval_loss" in rows[-1]
