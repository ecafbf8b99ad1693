"""LoRA fine-tuning (peft) and the eval set: adapters only, small checkpoints, exact resume.

In-process runs on the tiny preset check what a run writes (adapter, base, merged model), that
only the adapters train, and the eval loss against an independent recomputation; torchrun runs
(2 gloo processes on CPU) check kill-and-resume with eval on under DDP, and FSDP2.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import peft  # noqa: F401  (a dev dependency: missing, the module fails rather than skips)
import pytest
import torch
import torch.nn.functional as F

from shardloader import ConfigError, ConvertConfig, ResumeError, convert, read_manifest
from shardloader.train import TrainConfig, TrainResult, train
from shardloader.train.model import build_model
from shardloader.verify import iter_samples
from tests.conftest import make_docs, write_jsonl
from tests.test_train import (
    kill_at_checkpoint,
    losses,
    read_jsonl,
    run_torchrun,
    small_run,
    torchrun_cmd,
)

# peft 0.21 asks transformers 5 an old question; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

VOCAB = 580  # the test tokenizer's (tests/conftest.py: trained with vocab_size=600)


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One intra-op thread, as torchrun's ranks get (see tests/test_train.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def short_docs(n: int, seed: int, tokenizer_dir: Path, max_tokens: int) -> list[dict[str, Any]]:
    """``n`` test documents of at most ``max_tokens`` tokens (EOS included)."""
    from shardloader import TextTokenizer

    tokenizer = TextTokenizer(str(tokenizer_dir))
    docs = make_docs(4 * n, seed=seed)
    lengths = [len(ids) for ids in tokenizer.encode_batch([d["text"] for d in docs])]
    kept = [d for d, length in zip(docs, lengths, strict=True) if length + 1 <= max_tokens]
    assert len(kept) >= n
    return kept[:n]


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """40 held-out tokenized documents, each shorter than a row of 64 tokens."""
    root = tmp_path_factory.mktemp("eval")
    corpus = write_jsonl(root / "corpus" / "eval.jsonl", short_docs(40, 99, tokenizer_dir, 64))
    out = root / "eval-set"
    convert([str(corpus)], ConvertConfig(output=str(out), num_proc=1, tokenizer=str(tokenizer_dir)))
    return out


def lora_run(data: Path, out: Path, **overrides: Any) -> TrainConfig:
    """`tests.test_train.small_run` with LoRA (rank 8) at a higher learning rate."""
    return small_run(data, out, **{"lr": 1e-2, "lora_rank": 8, "log_samples": False, **overrides})


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora_rank": -1}, "lora_rank must be >= 0"),
        ({"merge_lora": True}, "merge_lora needs LoRA"),
        ({"lora_rank": 4, "lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"lora_rank": 4, "lora_targets": ("all-linear", "q_proj")}, "all-linear alone"),
        ({"eval_every": 5}, "need eval_data"),
        ({"eval_data": "x", "eval_max_batches": 0}, "eval_max_batches must be >= 1"),
    ],
)
def test_bad_lora_and_eval_settings_are_named(
    overrides: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(data="d", output_dir=str(tmp_path), **overrides)


def test_without_peft_lora_says_what_to_install(
    token_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'shardloader\[lora\]'"):
        train(lora_run(token_dir, tmp_path / "out", max_steps=2))
    assert not (tmp_path / "out").exists()


def test_unknown_target_modules_are_named(token_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot add LoRA adapters to wq,wk"):
        train(lora_run(token_dir, tmp_path / "out", max_steps=2, lora_targets=("wq", "wk")))


def test_eval_data_of_another_tokenizer_is_refused(
    token_dir: Path, tmp_path: Path, tokenizer_dir: Path
) -> None:
    import shardloader

    other = tmp_path / "other-tokenizer"
    shardloader.train_bpe_tokenizer(
        [d["text"] for d in make_docs(500, seed=5)], str(other), vocab_size=300
    )
    corpus = write_jsonl(tmp_path / "corpus" / "e.jsonl", make_docs(10, seed=3))
    foreign = tmp_path / "foreign"
    convert([str(corpus)], ConvertConfig(output=str(foreign), num_proc=1, tokenizer=str(other)))
    mine = read_manifest(str(token_dir)).tokenizer["fingerprint"]  # type: ignore[index]
    theirs = read_manifest(str(foreign)).tokenizer["fingerprint"]  # type: ignore[index]
    with pytest.raises(ConfigError, match=f"{foreign}: eval shards .* {theirs}, .* {mine}"):
        train(lora_run(token_dir, tmp_path / "out", max_steps=2, eval_data=str(foreign)))


def test_eval_max_batches_bounds_each_eval(token_dir: Path, eval_dir: Path, tmp_path: Path) -> None:
    run = lora_run(token_dir, tmp_path / "out", max_steps=2, eval_data=str(eval_dir))
    whole = train(run).history[-1].eval_tokens
    bounded = (
        train(
            lora_run(
                token_dir, tmp_path / "b", max_steps=2, eval_data=str(eval_dir), eval_max_batches=1
            )
        )
        .history[-1]
        .eval_tokens
    )
    assert whole is not None
    assert bounded is not None
    assert 0 < bounded <= 4 * 63 < whole  # one batch of 4 rows of 64 tokens


# --- one LoRA run, examined ------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged_run(
    token_dir: Path, eval_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, TrainResult]:
    """40 LoRA steps with an eval every 20 and the adapter merged at the end (pad packing:
    one document per row, so the eval loss can be recomputed document by document)."""
    assert read_manifest(str(token_dir)).vocab_size == VOCAB
    out = tmp_path_factory.mktemp("lora") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(
            lora_run(
                token_dir,
                out,
                max_steps=40,
                pack_mode="pad",
                merge_lora=True,
                eval_data=str(eval_dir),
                eval_every=20,
                log_every=7,
            )
        )
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_lora_loss_falls(merged_run: tuple[Path, TrainResult]) -> None:
    _, result = merged_run
    first = sum(m.loss for m in result.history[:5]) / 5
    last = sum(m.loss for m in result.history[-5:]) / 5
    assert math.log(VOCAB) - 0.5 < first
    assert last < first - 0.5, (first, last)  # a frozen random base: the adapters alone learn


def test_only_the_adapters_train(merged_run: tuple[Path, TrainResult]) -> None:
    from transformers import AutoModelForCausalLM

    out, _ = merged_run
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((out / "base").resolve())
    assert adapter["r"] == 8
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # The base written at the end is the frozen weights after training: byte for byte the
    # weights the preset was built with.
    base = AutoModelForCausalLM.from_pretrained(str(out / "base"))
    fresh = build_model("tiny", vocab_size=VOCAB, max_positions=64, seed=0)
    fresh_params = dict(fresh.named_parameters())
    names = [name for name, _ in base.named_parameters()]
    assert len(names) == len(fresh_params)
    for name, param in base.named_parameters():
        assert torch.equal(param, fresh_params[name]), name
    merged = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, fresh_params[n])]
    assert any("q_proj" in n for n in changed)
    assert not any("embed" in n or "norm" in n for n in changed)  # not adapted


def test_merged_model_gives_the_lora_models_logits(merged_run: tuple[Path, TrainResult]) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out, _ = merged_run
    with_adapter = AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    assert not hasattr(merged, "peft_config")  # a plain transformers model
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = with_adapter(input_ids=ids).logits
        b = merged(input_ids=ids).logits
        with with_adapter.disable_adapter():
            base = with_adapter(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert (a - base).abs().max() > 0.1  # the adapter does change the model


def test_eval_loss_equals_an_independent_recomputation(
    merged_run: tuple[Path, TrainResult], eval_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out, result = merged_run
    rows = read_jsonl(out / "metrics.jsonl")
    evals = [(r["step"], r["eval_loss"], r["eval_tokens"]) for r in rows if "eval_loss" in r]
    assert [s for s, _, _ in evals] == [20, 40]  # steps 20 and 40 had no row due (log_every 7)
    assert all("loss" in r for r in rows)  # every row is still a training step's row
    assert evals[1][1] < evals[0][1]
    assert result.eval_loss == evals[1][1]
    # Cross-entropy over each eval document alone (every token after the first is trained).
    model = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in iter_samples(str(eval_dir)):
            ids = torch.as_tensor(sample["input_ids"], dtype=torch.int64)[None]
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert evals[1][2] == count
    assert evals[1][1] == pytest.approx(total / count, rel=1e-5)


def test_a_lora_checkpoint_is_much_smaller_than_a_full_one(token_dir: Path, tmp_path: Path) -> None:
    # The small preset (4.6M parameters): on the tiny one DCP's per-tensor overhead dominates.
    sizes = {}
    for rank in (0, 8):
        run = lora_run(
            token_dir, tmp_path / str(rank), model="small", max_steps=1, lora_rank=rank,
            save_model=False,
        )  # fmt: skip
        checkpoint = train(run).checkpoint
        assert checkpoint is not None
        sizes[rank] = dir_bytes(Path(checkpoint))
    assert sizes[8] < sizes[0] / 10, sizes


def test_resume_refuses_another_base_or_rank(token_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    train(lora_run(token_dir, out, max_steps=2, save_model=False))
    with pytest.raises(
        ResumeError, match=r"preset tiny \(seed 0.*this run's base is preset tiny \(seed 3"
    ):
        train(lora_run(token_dir, out, max_steps=3, seed=3, resume=True))
    with pytest.raises(ResumeError, match="lora_rank=8, this run has lora_rank=4"):
        train(lora_run(token_dir, out, max_steps=3, lora_rank=4, resume=True))
    with pytest.raises(ResumeError, match="holds LoRA adapters, this run trains a fully"):
        train(lora_run(token_dir, out, max_steps=3, lora_rank=0, resume=True))


def test_a_local_base_directory_is_pointed_to_and_checked(token_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base-model"
    build_model("tiny", vocab_size=VOCAB, max_positions=64, seed=4).save_pretrained(str(base))
    out = tmp_path / "out"
    train(lora_run(token_dir, out, max_steps=2, model=str(base)))
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base.resolve())
    assert not (out / "base").exists()
    build_model("tiny", vocab_size=VOCAB, max_positions=64, seed=5).save_pretrained(str(base))
    with pytest.raises(ResumeError, match="model.safetensors"):
        train(lora_run(token_dir, out, max_steps=3, model=str(base), resume=True))


# --- torchrun ----------------------------------------------------------------------------------


def lora_flags(eval_dir: Path, *more: str) -> tuple[str, ...]:
    return (
        "--lora-rank", "8", "--lr", "1e-2", "--num-workers", "1",
        "--eval-data", str(eval_dir), "--eval-every", "4", *more,
    )  # fmt: skip


def eval_losses(out: Path) -> list[tuple[int, float, int]]:
    rows = read_jsonl(out / "metrics.jsonl")
    return [(r["step"], r["eval_loss"], r["eval_tokens"]) for r in rows if "eval_loss" in r]


@pytest.mark.slow
@pytest.mark.torchrun
def test_kill_then_resume_with_lora_and_eval_is_exact(
    token_dir: Path, eval_dir: Path, tmp_path: Path
) -> None:
    flags = lora_flags(eval_dir, "--max-steps", "16", "--checkpoint-every", "4")
    full = tmp_path / "full"
    run_torchrun(2, str(token_dir), full, *flags)

    killed = tmp_path / "killed"
    launch = ["--standalone", "--nproc_per_node=2"]
    kill_at_checkpoint(torchrun_cmd(launch, str(token_dir), killed, *flags), killed, 8, 16)
    logs = run_torchrun(2, str(token_dir), killed, *flags, "--resume")
    assert "resumed from" in logs
    assert losses(killed) == losses(full)
    assert eval_losses(killed) == eval_losses(full)
    assert [s for s, _, _ in eval_losses(full)] == [4, 8, 12, 16]
    assert eval_losses(full)[-1][1] < eval_losses(full)[0][1]


@pytest.mark.slow
@pytest.mark.torchrun
def test_lora_under_fsdp_matches_ddp_and_resumes(
    token_dir: Path, eval_dir: Path, tmp_path: Path
) -> None:
    from peft import AutoPeftModelForCausalLM

    flags = lora_flags(eval_dir, "--schedule-steps", "8", "--merge-lora")
    run_torchrun(2, str(token_dir), tmp_path / "ddp", *flags, "--max-steps", "8")
    fsdp = tmp_path / "fsdp"
    run_torchrun(2, str(token_dir), fsdp, *flags, "--max-steps", "4", "--parallel", "fsdp")
    shards = sorted(p.name for p in (fsdp / "checkpoints" / "step-00000004").iterdir())
    assert "__0_0.distcp" in shards
    assert "__1_0.distcp" in shards
    run_torchrun(
        2, str(token_dir), fsdp, *flags, "--max-steps", "8", "--parallel", "fsdp", "--resume"
    )
    ddp_losses, fsdp_losses = losses(tmp_path / "ddp"), losses(fsdp)
    assert [s for s, _ in fsdp_losses] == list(range(1, 9))
    assert [v for _, v in fsdp_losses] == pytest.approx([v for _, v in ddp_losses], rel=1e-4)
    ddp_evals, fsdp_evals = eval_losses(tmp_path / "ddp"), eval_losses(fsdp)
    assert [(s, t) for s, _, t in fsdp_evals] == [(s, t) for s, _, t in ddp_evals]
    assert [v for _, v, _ in fsdp_evals] == pytest.approx([v for _, v, _ in ddp_evals], rel=1e-4)
    # The export gathered from the shards: the same adapter as DDP's, merged alike.
    a = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "ddp" / "adapter"))
    b = AutoPeftModelForCausalLM.from_pretrained(str(fsdp / "adapter"))
    a_params = dict(a.named_parameters())
    for name, param in b.named_parameters():
        torch.testing.assert_close(param, a_params[name], rtol=1e-3, atol=1e-4)
    assert (fsdp / "model" / "config.json").is_file()
