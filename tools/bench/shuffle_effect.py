"""What a weak shuffle does to training: a corpus stored sorted by topic, trained with each setting.

Corpora are often stored sorted (by source, date, URL). A loader that serves long runs of one
shard then gives the optimizer batches from few topics at a time, and the loss on a uniform
held-out sample follows the storage order. This script measures that on a tiny Llama:

1. Generate ``--topics`` synthetic topics, each with its own vocabulary of made-up words (plus a
   few shared ones), and documents drawn from them; the training corpus is stored **sorted by
   topic** (one topic per shard), a held-out eval set is drawn uniformly over topics.
2. Train a byte-level BPE tokenizer, convert both (``--shard-samples`` per shard).
3. Train the same model (same seed, steps, learning rate) once per variant, evaluating on the
   held-out set every ``--eval-every`` steps (`shardloader.train`, ``eval_loss``), one process.
   Variants: whole shards (the default before blocks), blocks in windows of 128 KiB, 512 KiB (the
   memory of 4 shards) and the default 64 MiB, and the ideal: the same documents converted in a
   uniformly shuffled order (any loader then serves a good mix).
4. Print the eval loss per step for each variant, write ``.bench/shuffle_effect.json``, and with
   matplotlib installed (``pip install matplotlib``, or the peers venv) a plot
   (``--plot PATH``; ``--plot-only`` redraws from the JSON).

    python -m tools.bench.shuffle_effect                  # about 2 minutes on 2 cores
    python -m tools.bench.shuffle_effect --variant "blocks:shuffle_unit=block" --plot docs/x.png
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VARIANTS = (
    "whole shards, 4 a window (the default before blocks):shuffle_unit=shard",
    "blocks, windows of 128 KiB (about 1 shard):shuffle_bytes=131072",
    "blocks, windows of 512 KiB (about 4 shards, the old default's memory):shuffle_bytes=524288",
    "blocks, defaults (64 MiB windows, the whole 1.2 MB here):",
    "uniform order (ideal):@uniform",
)
SYLLABLES = ("ka", "lo", "mi", "ren", "to", "va", "shi", "gor", "pel", "dun", "ar", "is", "ub")
SHARED = ("the", "of", "and", "a", "in", "is", "to", "it", "that", "was")


def _topic_words(rng: random.Random, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))))
    return sorted(words)


def make_docs(
    topics: int, docs_per_topic: int, words: int, seed: int, vocab_seed: int
) -> list[dict[str, Any]]:
    """Documents of every topic, grouped by topic (topic 0's first): the sorted corpus.

    The topics' vocabularies come from ``vocab_seed`` (the same for training and eval), the
    documents from ``seed``.
    """
    rng = random.Random(seed)
    vocabularies = [_topic_words(random.Random(vocab_seed * 1000 + t), 120) for t in range(topics)]
    docs = []
    for t, vocabulary in enumerate(vocabularies):
        weights = [1.0 / (k + 1) for k in range(len(vocabulary))]  # Zipf-like inside a topic
        for i in range(docs_per_topic):
            body = rng.choices(vocabulary, weights, k=words)
            for k in range(0, words, 6):
                body[k] = rng.choice(SHARED)
            docs.append({"id": f"t{t}-{i}", "text": " ".join(body), "topic": t})
    return docs


def _write_jsonl(path: Path, docs: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"id": doc["id"], "text": doc["text"]}) + "\n")


def prepare(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Corpora, tokenizer and converted shards (sorted, uniform, eval)."""
    import shardloader

    docs = make_docs(args.topics, args.docs_per_topic, args.words, args.seed, args.seed)
    held = make_docs(args.topics, args.eval_docs_per_topic, args.words, args.seed + 1, args.seed)
    shuffled = list(docs)
    random.Random(args.seed).shuffle(shuffled)
    _write_jsonl(work / "sorted.jsonl", docs)
    _write_jsonl(work / "uniform.jsonl", shuffled)
    _write_jsonl(work / "eval.jsonl", held)
    tok = work / "tok"
    shardloader.train_bpe_tokenizer(
        [d["text"] for d in docs[:: max(1, len(docs) // 2000)]],
        str(tok),
        vocab_size=args.vocab_size,
        chat_template=False,
    )
    out = {}
    for name in ("sorted", "uniform", "eval"):
        config = shardloader.ConvertConfig(
            output=str(work / f"{name}-shards"),
            tokenizer=str(tok),
            shard_samples=args.shard_samples,
            batch_bytes=args.batch_bytes,
            num_proc=1,
            progress=False,
        )
        shardloader.convert([str(work / f"{name}.jsonl")], config)
        out[name] = work / f"{name}-shards"
    return out


def parse_variant(text: str) -> tuple[str, dict[str, Any], bool]:
    """``"label:key=value,key=value"`` (``@uniform`` trains on the shuffled copy)."""
    label, _, rest = text.partition(":")
    overrides: dict[str, Any] = {}
    uniform = False
    for item in filter(None, (p.strip() for p in rest.split(","))):
        if item == "@uniform":
            uniform = True
            continue
        key, _, value = item.partition("=")
        overrides[key] = int(value) if value.lstrip("-").isdigit() else value
    return label, overrides, uniform


def run_variant(
    data: dict[str, Path], work: Path, variant: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Train one variant; its eval curve and timing."""
    from shardloader.train import TrainConfig, train

    label, overrides, uniform = parse_variant(variant)
    out = work / "runs" / label.replace(" ", "_").replace("/", "_")
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: metrics.jsonl is appended to
    config = TrainConfig(
        data=str(data["uniform" if uniform else "sorted"]),
        output_dir=str(out),
        model="tiny",
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=10,
        max_steps=args.steps,
        seed=args.seed,
        num_workers=0,
        eval_data=str(data["eval"]),
        eval_every=args.eval_every,
        log_every=args.eval_every,
        save_model=False,
        progress="off",
        **overrides,
    )
    started = time.perf_counter()
    train(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    return {
        "label": label,
        "overrides": overrides,
        "uniform_copy": uniform,
        "eval": curve,
        "train": [(r["step"], r["loss"]) for r in rows],
        "seconds": time.perf_counter() - started,
    }


def plot(results: dict[str, Any], path: Path) -> bool:
    """Draw the eval curves; ``False`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.2))
    for run in results["runs"]:
        steps, losses = zip(*run["eval"], strict=True)
        ax.plot(steps, losses, marker=".", label=run["label"])
    setup = results["setup"]
    ax.set_title(
        f"tiny Llama on a corpus sorted by topic ({setup['topics']} topics, "
        f"{setup['shards']} shards): held-out loss"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (uniform held-out sample)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def report(results: dict[str, Any]) -> None:
    """A table: eval loss at a few steps, and the mean over the run, per variant."""
    runs = results["runs"]
    steps = [s for s, _ in runs[0]["eval"]]
    picks = sorted({steps[len(steps) // 4], steps[len(steps) // 2], steps[-1]})
    head = " | ".join(f"step {s}" for s in picks)
    print(f"\n| variant | {head} | mean over the run | worst after step {picks[0]} |")
    print("|---|" + "---|" * (len(picks) + 2))
    for run in runs:
        curve = dict(run["eval"])
        late = [v for s, v in run["eval"] if s >= picks[0]]
        mean = sum(v for _, v in run["eval"]) / len(run["eval"])
        cells = " | ".join(f"{curve[s]:.3f}" for s in picks)
        print(f"| {run['label']} | {cells} | {mean:.3f} | {max(late):.3f} |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "shuffle_effect")
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "shuffle_effect.json")
    parser.add_argument("--plot", type=Path, default=None, help="write the eval curves here")
    parser.add_argument("--plot-only", action="store_true", help="redraw --plot from --out")
    parser.add_argument("--variant", action="append", help="LABEL:key=value,... (repeatable)")
    parser.add_argument("--topics", type=int, default=8)
    parser.add_argument("--docs-per-topic", type=int, default=600)
    parser.add_argument("--eval-docs-per-topic", type=int, default=25)
    parser.add_argument("--words", type=int, default=120)
    parser.add_argument("--shard-samples", type=int, default=600)
    parser.add_argument("--batch-bytes", type=int, default=16 << 10)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.plot_only:
        results = json.loads(args.out.read_text())
        if args.plot is None or not plot(results, args.plot):
            raise SystemExit("--plot-only needs --plot PATH and matplotlib")
        print(f"plot written to {args.plot}")
        return 0
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare(args.work, args)
    variants = args.variant or list(DEFAULT_VARIANTS)
    runs = []
    for variant in variants:
        run = run_variant(data, args.work, variant, args)
        print(
            f"{run['label']}: final eval loss {run['eval'][-1][1]:.3f} ({run['seconds']:.0f} s)",
            flush=True,
        )
        runs.append(run)
    setup = {k: v for k, v in vars(args).items() if k not in ("work", "out", "plot", "variant")}
    setup["shards"] = -(-args.topics * args.docs_per_topic // args.shard_samples)
    results = {"setup": {**setup, "plot": None}, "runs": runs}
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {args.out}")
    if args.plot is not None:
        if plot(results, args.plot):
            print(f"plot written to {args.plot}")
        else:
            print("matplotlib is not installed: no plot (see --plot-only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
