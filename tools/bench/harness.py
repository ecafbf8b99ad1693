"""What every benchmark shares: the corpus, the environment of its jobs, tables and verdicts.

- **Corpus**: :func:`ensure_corpus` generates the JSONL corpus once (``tools/make_corpus.py``,
  cached under ``.bench/``), :func:`ensure_tokenizer` trains the byte-level BPE on it once.
- **Environment**: :func:`job_env` (offline, quiet, the torchvision stub for Mosaic),
  :func:`versions` (package versions of the benchmark interpreter), :func:`default_python`,
  :func:`cpu_marks` and :func:`other_cpu_share` (how much CPU other processes took during a
  job, from :func:`machine_busy_s` and :func:`children_cpu_s`).
- **Output**: :func:`format_columns` (a plain-text table), :func:`markdown_table`,
  :func:`fmt_rate` (``median [min-max]``), :func:`verdict` and :func:`target_line` (a ratio
  against its target), :func:`read_measurements` and :func:`write_results` (the results JSON).

Imports only the standard library (and ``tokenizers`` inside :func:`ensure_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
STUBS = TOOLS / "bench_stubs"  # a torchvision stand-in: `import streaming` imports it
BENCH_DIR = ROOT / ".bench"
VOCAB_SIZE = 8192
EOS_TOKEN = "<|endoftext|>"
TOKENIZER_SAMPLE_BYTES = 16_000_000
BUSY_SHARE = 0.1  # flag jobs during which other processes used more than this share of the CPU

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Corpus:
    """A generated JSONL corpus on disk.

    Args:
        path: Folder holding ``part-*.jsonl``.
        files: The input files, sorted.
        num_docs: Number of documents.
        input_bytes: Total size of the JSONL files.
    """

    path: Path
    files: tuple[Path, ...]
    num_docs: int
    input_bytes: int


def ensure_corpus(mb: float, seed: int, num_files: int) -> Corpus:
    """Generate the JSONL corpus once; later runs with the same arguments reuse it."""
    suffix = "" if num_files == 32 else f"-{num_files}files"
    path = BENCH_DIR / f"corpus-{mb:g}mb-{seed}{suffix}"
    stats_path = path / "corpus.json"
    if not stats_path.exists():
        from tools.make_corpus import write_corpus

        staging = path.with_name(path.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        started = time.perf_counter()
        _, num_docs, _ = write_corpus(
            staging, total_mb=mb, num_files=num_files, file_format="jsonl", seed=seed, with_ids=True
        )
        stats = {"num_docs": num_docs, "seed": seed, "mb": mb, "num_files": num_files}
        (staging / "corpus.json").write_text(json.dumps(stats))
        shutil.rmtree(path, ignore_errors=True)
        staging.rename(path)
        print(f"generated {path} in {time.perf_counter() - started:.1f} s")
    stats = json.loads(stats_path.read_text())
    files = tuple(sorted(path.glob("part-*.jsonl")))
    return Corpus(
        path=path,
        files=files,
        num_docs=stats["num_docs"],
        input_bytes=sum(f.stat().st_size for f in files),
    )


def _sample_texts(corpus: Corpus, max_bytes: int) -> Iterator[str]:
    """Texts from every file in turn until ``max_bytes`` of text, so the sample spans the corpus."""
    per_file = max_bytes // len(corpus.files) + 1
    for path in corpus.files:
        taken = 0
        with path.open("rb") as lines:
            for line in lines:
                text = json.loads(line)["text"]
                yield text
                taken += len(text)
                if taken >= per_file:
                    break


def ensure_tokenizer(corpus: Corpus) -> Path:
    """Train a byte-level BPE tokenizer (vocab 8192) on a sample of the corpus, once."""
    path = BENCH_DIR / f"tokenizer-{VOCAB_SIZE}-{corpus.path.name}.json"
    if path.exists():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    started = time.perf_counter()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_sample_texts(corpus, TOKENIZER_SAMPLE_BYTES), trainer=trainer)
    staging = path.with_suffix(".tmp")
    tokenizer.save(str(staging))
    staging.rename(path)
    print(f"trained {path.name} in {time.perf_counter() - started:.1f} s")
    return path


def warm_page_cache(paths: Iterable[Path]) -> None:
    """Read every file once, so that no system pays for the first read from disk."""
    for path in paths:
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used since boot (Linux ``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds used by this process's finished children (and theirs, once waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_marks() -> tuple[float, float]:
    """The machine's and this process's children's CPU seconds now, for `other_cpu_share`."""
    return machine_busy_s(), children_cpu_s()


def other_cpu_share(marks: tuple[float, float], wall_s: float, exclude_s: float = 0.0) -> float:
    """Share of the machine's CPU (all cores over ``wall_s``) other processes used since ``marks``.

    Args:
        marks: `cpu_marks` taken when the job started.
        wall_s: Wall time of the job.
        exclude_s: CPU seconds of processes of ours that are not children (an S3 server), also
            not counted as others'.
    """
    busy_before, own_before = marks
    others_s = (machine_busy_s() - busy_before) - (children_cpu_s() - own_before)
    others_s -= exclude_s
    return max(0.0, others_s) / (wall_s * (os.cpu_count() or 1))


def default_python() -> str:
    """The interpreter for the jobs: .venv-bench's if it exists, else this one."""
    bench_python = ROOT / ".venv-bench" / "bin" / "python"
    return str(bench_python) if bench_python.exists() else sys.executable


def job_env(
    system: str, extra: Mapping[str, str] | None = None, *, drop_aws: bool = False
) -> dict[str, str]:
    """Environment of a job subprocess: quiet tokenizers, no PyPI version check, ``extra``.

    Args:
        system: The system the job runs; Mosaic gets the torchvision stub on ``PYTHONPATH``.
        extra: Variables set last.
        drop_aws: Leave out the user's ``AWS_*``, ``S3_ENDPOINT_URL`` and ``FSSPEC_S3``, so no
            profile or endpoint of theirs leaks into the peers.
    """
    env = dict(os.environ)
    if drop_aws:
        for name in list(env):
            if name.startswith("AWS_") or name in ("S3_ENDPOINT_URL", "FSSPEC_S3"):
                del env[name]
    env.update(
        TOKENIZERS_PARALLELISM="false",
        LITDATA_DISABLE_VERSION_CHECK="1",  # else litdata asks PyPI for its version on import
    )
    if system == "mosaic":  # streaming imports torchvision; see tools/bench_stubs
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(STUBS), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def versions(python: str, names: Sequence[str]) -> dict[str, str | None]:
    """``python``'s version and the installed version of each package (``None`` if absent)."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        f"names = {list(names)!r}\n"
        "out = {'python': sys.version.split()[0]}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def log_tail(log_path: Path, lines: int = 3) -> str:
    """The last lines of a log, joined with `` | ``."""
    tail = log_path.read_text(errors="replace").strip().splitlines()[-lines:]
    return " | ".join(tail)


def fmt_rate(rate: Sequence[float] | None, scale: float = 1.0, digits: int = 1) -> str:
    """``median [min-max]`` of a (median, min, max) rate, ``-`` without one."""
    if rate is None or rate[0] == 0.0:
        return "-"
    median, low, high = (r / scale for r in rate)
    if low == high:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def format_columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: left-aligned columns two spaces apart, a dashed line under the header."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(0, "  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table (``|`` in a cell is escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in rows)])


def verdict(median: float, best: float, target: float) -> str:
    """Whether a ratio meets its target: at the median, only at best-of-N, or not at all."""
    if median >= target:
        return "meets"
    return "meets only at best-of-N" if best >= target else "MISSES"


def target_line(
    who: str,
    median: float,
    best: float,
    num_runs: int,
    target: float,
    *,
    versus: str,
    percent: bool,
) -> str:
    """``WHO: RATIO VERSUS (best-of-N: BEST); VERDICT the TARGET target``.

    Args:
        who: What was measured (``"shardloader text local w0"``).
        median: The ratio at the median.
        best: The ratio at best-of-N.
        num_runs: N.
        target: The target ratio.
        versus: What the ratio is to (``"the fastest peer"``, ``"of the memmap bound"``).
        percent: Show the ratios as ``85%`` (else ``1.23x``, the target as ``2x``).
    """
    if percent:
        shown, best_shown, target_shown = f"{median:.0%}", f"{best:.0%}", f"{target:.0%}"
    else:
        shown, best_shown, target_shown = f"{median:.2f}x", f"{best:.2f}x", f"{target:g}x"
    return (
        f"{who}: {shown} {versus} (best-of-{num_runs}: {best_shown}); "
        f"{verdict(median, best, target)} the {target_shown} target"
    )


def busy_note(other_cpu_shares: Sequence[float], what: str, advice: str) -> str | None:
    """A note when other processes took more than ``BUSY_SHARE`` of the CPU during some runs.

    Args:
        other_cpu_shares: Each run's share of the CPU that other processes used meanwhile.
        what: What a run is called (``"jobs"``, ``"passes"``).
        advice: What to read instead of the medians.
    """
    busy = [share for share in other_cpu_shares if share > BUSY_SHARE]
    if not busy:
        return None
    return (
        f"note: during {len(busy)} of {len(other_cpu_shares)} {what}, other processes used more "
        f"than {BUSY_SHARE:.0%} of the CPU (up to {max(busy):.0%}): {advice}"
    )


def read_measurements(report: Mapping[str, Any], cls: type[T]) -> list[T]:
    """The ``measurements`` of a results JSON as ``cls`` dataclasses (unknown keys dropped)."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return [cls(**{k: v for k, v in m.items() if k in fields}) for m in report["measurements"]]


def write_results(path: Path, report: Mapping[str, Any]) -> None:
    """Write a results JSON (indented, one final newline) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
