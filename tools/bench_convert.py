"""Conversion benchmark: shardloader against WebDataset, Mosaic Streaming and LitData, in one run.

What is measured, on one generated JSONL corpus (``tools/make_corpus.py``, 256 MB in 32 files by
default, cached under ``.bench/``) with the same number of processes ``N`` for every system:

- **text**: JSONL -> text shards. ``shardloader convert --format arrow`` and ``--format tar``
  (zstd); WebDataset ``ShardWriter`` (a ``multiprocessing.Pool`` of N, one writer per process over
  its share of the input files; plain tar, as WebDataset has no zstd writer); Mosaic ``MDSWriter``
  (N writers over a split of the files, zstd, then ``merge_index``); LitData ``optimize`` (a
  generator fn per input file, ``num_workers=N``, zstd, ``reorder_files=False``). Rate: MB/s of
  input (uncompressed JSONL bytes) and documents/s.
- **tokens**: JSONL -> token-id shards with a byte-level BPE tokenizer (vocab 8192, trained here on
  a sample of the corpus). ``shardloader convert --tokenizer``; Mosaic ``MDSWriter`` with an
  ``ndarray:uint16`` column; LitData ``optimize`` with ``TokensLoader`` (``compression_level=
  "chunk"``, the only zstd mode it accepts with that loader). The bound is the tokenizer alone: N
  processes that read their share of the files, parse JSON and encode batches of 1,000 documents,
  writing nothing. ``bound`` uses the fastest batch encoder the library has
  (``encode_batch_fast``, as shardloader does) and ``bound-encode-batch`` plain ``encode_batch``;
  the ratio column is against the faster one. Rate: tokens/s, where tokens means the text tokens
  of the corpus (the bound's count, without EOS) for every system, so all rates share a numerator.

Every measurement runs in a fresh subprocess (``_job``), into a fresh output folder that is deleted
afterwards. The time is wall time from just after the library's import until its output, index or
manifest included, is complete; the whole subprocess time (interpreter start and imports too) is
kept in the JSON as ``process_s``. Systems run interleaved, repeat by repeat (``--repeats``, 3 by
default); the table shows the median rate with [min-max]. The input files are read once before the
first measurement so that every system starts from the page cache. Every job's sample count is
checked against the corpus.

Run it (on 2 cores the default run takes 20-25 minutes, nearly all of it tokenizing)::

    bash tools/bench_setup.sh
    .venv-bench/bin/python tools/bench_convert.py            # 256 MB, 3 repeats, N = cores
    .venv-bench/bin/python tools/bench_convert.py --quick    # 32 MB, 1 repeat: a smoke test
    .venv-bench/bin/python tools/bench_convert.py --systems webdataset,mosaic --tasks text
    .venv-bench/bin/python tools/bench_convert.py --from-json .bench/results-convert.json

Other work on the machine skews the rates: each job records the share of CPU that other processes
used meanwhile, and the verdicts give best-of-N ratios beside the median ones.

Targets (from the issue): shardloader's text conversion at least 1.5x the fastest peer; conversion
with tokenization at least 80% of the tokenizer-alone bound. Results go to
``.bench/results-convert.json`` (``--out``); job logs to ``.bench/logs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
STUBS = TOOLS / "bench_stubs"
BENCH_DIR = ROOT / ".bench"
SHARD_BYTES = 1 << 26  # 64 MiB shards or chunks for every system
VOCAB_SIZE = 8192
EOS_TOKEN = "<|endoftext|>"
TOKENIZER_SAMPLE_BYTES = 16_000_000
ENCODE_BATCH_DOCS = 1000
TEXT_SYSTEMS = ("shardloader-arrow", "shardloader-tar", "webdataset", "mosaic", "litdata")
TOKEN_SYSTEMS = ("bound", "bound-encode-batch", "shardloader-arrow", "mosaic", "litdata")
PEERS = ("webdataset", "mosaic", "litdata")
BOUNDS = ("bound", "bound-encode-batch")
TARGET_TEXT_RATIO = 1.5
TARGET_TOKEN_RATIO = 0.8
BUSY_SHARE = 0.1  # flag jobs during which other processes used more than this share of the CPU


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Measurement:
    """One run of one system on one task.

    Args:
        system: Which system (``TEXT_SYSTEMS`` or ``TOKEN_SYSTEMS``).
        task: ``"text"`` or ``"tokens"``.
        repeat: Repeat index, from 0.
        ok: Whether the job finished and wrote every document.
        job_s: Wall time of the job, from after imports to complete output.
        process_s: Wall time of the whole subprocess.
        output_bytes: Bytes under the output folder.
        num_samples: Samples the system reports it wrote.
        num_tokens: Tokens the system reports (EOS included where it adds one), if it reports any.
        error: What went wrong, when not ok.
        note: Something odd that did not fail the run.
        other_cpu_share: Share of the machine's CPU time (all cores, over the job's wall time)
            that processes other than the job used meanwhile: a few percent is background noise,
            more means something else competed for the cores.
    """

    system: str
    task: str
    repeat: int
    ok: bool
    job_s: float = 0.0
    process_s: float = 0.0
    output_bytes: int = 0
    num_samples: int = 0
    num_tokens: int = 0
    error: str = ""
    note: str = ""
    other_cpu_share: float = 0.0


# --------------------------------------------------------------------------------------------
# Corpus and tokenizer (parent process)


def ensure_corpus(mb: float, seed: int, num_files: int) -> Corpus:
    """Generate the JSONL corpus once; later runs with the same arguments reuse it."""
    suffix = "" if num_files == 32 else f"-{num_files}files"
    path = BENCH_DIR / f"corpus-{mb:g}mb-{seed}{suffix}"
    stats_path = path / "corpus.json"
    if not stats_path.exists():
        sys.path.insert(0, str(TOOLS))
        from make_corpus import write_corpus

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


def count_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------
# Jobs (each runs in its own ``bench_convert.py _job`` subprocess)


def split_files(files: Sequence[str], num_parts: int) -> list[list[str]]:
    """Split files into ``num_parts`` groups of about equal bytes (largest first, greedy)."""
    groups: list[list[str]] = [[] for _ in range(min(num_parts, len(files)))]
    sizes = [0] * len(groups)
    for path in sorted(files, key=lambda f: (-os.path.getsize(f), f)):
        smallest = sizes.index(min(sizes))
        groups[smallest].append(path)
        sizes[smallest] += os.path.getsize(path)
    return [sorted(group) for group in groups]


def read_records(paths: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Parse every JSON line of ``paths``, in order."""
    for path in paths:
        with open(path, "rb") as lines:
            for line in lines:
                yield json.loads(line)


def read_batches(paths: Sequence[str]) -> Iterator[list[dict[str, Any]]]:
    """Records of ``paths`` in lists of ``ENCODE_BATCH_DOCS``."""
    batch: list[dict[str, Any]] = []
    for record in read_records(paths):
        batch.append(record)
        if len(batch) == ENCODE_BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def load_encoder(tokenizer_path: str, method: str = "fast") -> tuple[Callable[..., Any], int]:
    """Return (batch encoder, EOS id); ``method`` is ``"fast"`` or ``"encode_batch"``."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"{tokenizer_path}: no {EOS_TOKEN} token")
    encode: Callable[..., Any] = tokenizer.encode_batch
    if method == "fast":
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return encode, eos_id


def _bound_worker(args: tuple[list[str], str, str]) -> tuple[int, int]:
    paths, tokenizer_path, method = args
    encode, _ = load_encoder(tokenizer_path, method)
    num_docs = num_tokens = 0
    for batch in read_batches(paths):
        encodings = encode([record["text"] for record in batch], add_special_tokens=False)
        num_tokens += sum(len(encoding.ids) for encoding in encodings)
        num_docs += len(batch)
    return num_docs, num_tokens


def _wds_worker(args: tuple[int, list[str], str]) -> int:
    import webdataset as wds

    rank, paths, output = args
    num_docs = 0
    pattern = os.path.join(output, f"shard-{rank:03d}-%06d.tar")
    with wds.ShardWriter(pattern, maxsize=SHARD_BYTES, verbose=0) as sink:
        for record in read_records(paths):
            sink.write({"__key__": record["id"], "txt": record["text"]})
            num_docs += 1
    return num_docs


def _mds_worker(args: tuple[int, list[str], str, str | None]) -> tuple[int, int]:
    import numpy as np
    from streaming import MDSWriter

    rank, paths, output, tokenizer_path = args
    num_docs = num_tokens = 0
    out = os.path.join(output, f"{rank:03d}")
    if tokenizer_path is None:
        columns = {"id": "str", "text": "str"}
        writer = MDSWriter(out=out, columns=columns, compression="zstd", size_limit=SHARD_BYTES)
        with writer as sink:
            for record in read_records(paths):
                sink.write({"id": record["id"], "text": record["text"]})
                num_docs += 1
        return num_docs, 0
    encode, eos_id = load_encoder(tokenizer_path)
    columns = {"id": "str", "tokens": "ndarray:uint16"}
    with MDSWriter(out=out, columns=columns, compression="zstd", size_limit=SHARD_BYTES) as sink:
        for batch in read_batches(paths):
            encodings = encode([record["text"] for record in batch], add_special_tokens=False)
            for record, encoding in zip(batch, encodings, strict=True):
                tokens = np.array([*encoding.ids, eos_id], dtype=np.uint16)
                sink.write({"id": record["id"], "tokens": tokens})
                num_tokens += tokens.size
            num_docs += len(batch)
    return num_docs, num_tokens


def litdata_text_fn(path: str) -> Iterator[dict[str, str]]:
    """LitData ``optimize`` fn: one ``{"id", "text"}`` item per document of a JSONL file."""
    for record in read_records([path]):
        yield {"id": record["id"], "text": record["text"]}


_LITDATA_ENCODER: tuple[Callable[..., Any], int] | None = None


def litdata_tokens_fn(path: str) -> Iterator[Any]:
    """LitData ``optimize`` fn: a uint16 token array (EOS appended) per document of a JSONL file."""
    import numpy as np

    global _LITDATA_ENCODER
    if _LITDATA_ENCODER is None:  # once per worker process
        _LITDATA_ENCODER = load_encoder(os.environ["BENCH_TOKENIZER"])
    encode, eos_id = _LITDATA_ENCODER
    for batch in read_batches([path]):
        encodings = encode([record["text"] for record in batch], add_special_tokens=False)
        for encoding in encodings:
            yield np.array([*encoding.ids, eos_id], dtype=np.uint16)


def _pool(num_proc: int) -> Any:
    import multiprocessing

    return multiprocessing.get_context("fork").Pool(num_proc)


def run_job(
    system: str, task: str, inputs: list[str], output: str, num_proc: int, tokenizer: str | None
) -> dict[str, Any]:
    """Run one conversion and time it; returns job_s, num_samples, num_tokens."""
    tokens = task == "tokens"
    if system.startswith("shardloader"):
        from shardloader.cli import main as shardloader_main

        argv = ["convert", *inputs, "--output", output, "--num-proc", str(num_proc)]
        argv += ["--format", system.removeprefix("shardloader-"), "--shard-bytes", str(SHARD_BYTES)]
        argv += ["--no-progress"] + (["--tokenizer", str(tokenizer)] if tokens else [])
        print("shardloader " + " ".join(argv), flush=True)
        started = time.perf_counter()
        try:
            code = shardloader_main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        job_s = time.perf_counter() - started
        if code != 0:
            raise RuntimeError(f"shardloader {' '.join(argv)} exited with {code}")
        from shardloader.manifest import read_manifest

        manifest = read_manifest(output)
        num_samples, num_tokens = manifest.num_samples, manifest.num_tokens
        return {"job_s": job_s, "num_samples": num_samples, "num_tokens": num_tokens}

    if system in BOUNDS:
        method = "fast" if system == "bound" else "encode_batch"
        groups = split_files(inputs, num_proc)
        started = time.perf_counter()
        with _pool(num_proc) as pool:
            counts = pool.map(_bound_worker, [(g, str(tokenizer), method) for g in groups])
        job_s = time.perf_counter() - started
        return {
            "job_s": job_s,
            "num_samples": sum(c[0] for c in counts),
            "num_tokens": sum(c[1] for c in counts),
        }

    if system == "webdataset":
        import webdataset  # noqa: F401  (import outside the timed region, like the others)

        groups = split_files(inputs, num_proc)
        os.makedirs(output)
        started = time.perf_counter()
        with _pool(num_proc) as pool:
            counts = pool.map(_wds_worker, [(rank, g, output) for rank, g in enumerate(groups)])
        return {"job_s": time.perf_counter() - started, "num_samples": sum(counts), "num_tokens": 0}

    if system == "mosaic":
        from streaming.base.util import merge_index

        groups = split_files(inputs, num_proc)
        tok = str(tokenizer) if tokens else None
        os.makedirs(output)
        started = time.perf_counter()
        jobs = [(rank, group, output, tok) for rank, group in enumerate(groups)]
        with _pool(num_proc) as pool:
            counts = pool.map(_mds_worker, jobs)
        merge_index(output, keep_local=True)
        job_s = time.perf_counter() - started
        index = json.loads(Path(output, "index.json").read_text())
        num_samples = sum(shard["samples"] for shard in index["shards"])
        return {"job_s": job_s, "num_samples": num_samples, "num_tokens": sum(c[1] for c in counts)}

    if system == "litdata":
        from litdata import TokensLoader, optimize

        options: dict[str, Any] = {
            "inputs": list(inputs),
            "output_dir": output,
            "num_workers": num_proc,
            "chunk_bytes": SHARD_BYTES,
            "compression": "zstd",
            "reorder_files": False,
            "verbose": False,
        }
        if tokens:
            os.environ["BENCH_TOKENIZER"] = str(tokenizer)  # read by the spawned workers
            options.update(item_loader=TokensLoader(), compression_level="chunk")
        started = time.perf_counter()
        optimize(fn=litdata_tokens_fn if tokens else litdata_text_fn, **options)
        job_s = time.perf_counter() - started
        index = json.loads(Path(output, "index.json").read_text())
        num_samples = sum(chunk["chunk_size"] for chunk in index["chunks"])
        num_tokens = sum(chunk.get("dim") or 0 for chunk in index["chunks"]) if tokens else 0
        return {"job_s": job_s, "num_samples": num_samples, "num_tokens": num_tokens}

    raise ValueError(f"unknown system {system!r}")


def job_main(argv: Sequence[str]) -> int:
    """Entry point of a ``_job`` subprocess: run one job, write its result as JSON."""
    parser = argparse.ArgumentParser(prog="bench_convert.py _job")
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--system", required=True)
    parser.add_argument("--task", required=True, choices=["text", "tokens"])
    parser.add_argument("--output", required=True)
    parser.add_argument("--num-proc", type=int, required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    result = run_job(
        args.system, args.task, args.inputs, args.output, args.num_proc, args.tokenizer
    )
    Path(args.result).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------
# Orchestration (parent process)


def job_env(system: str) -> dict[str, str]:
    """Environment of a job subprocess."""
    env = dict(os.environ)
    env.update(TOKENIZERS_PARALLELISM="false", LITDATA_DISABLE_VERSION_CHECK="1")
    if system == "mosaic":  # streaming imports torchvision; see tools/bench_stubs
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(STUBS), env.get("PYTHONPATH")]))
    return env


def measure(
    *,
    system: str,
    task: str,
    repeat: int,
    corpus: Corpus,
    num_proc: int,
    tokenizer: Path | None,
    corpus_tokens: int | None,
    python: str,
) -> Measurement:
    """Run one job in a fresh subprocess and output folder; delete the output afterwards."""
    name = f"{system}-{task}-r{repeat}"
    output = BENCH_DIR / "out" / name
    result_path = BENCH_DIR / "out" / f"{name}.result.json"
    log_path = BENCH_DIR / "logs" / f"{name}.log"
    shutil.rmtree(output, ignore_errors=True)
    result_path.unlink(missing_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [python, str(Path(__file__).resolve()), "_job", *map(str, corpus.files)]
    command += ["--system", system, "--task", task, "--output", str(output)]
    command += ["--num-proc", str(num_proc), "--result", str(result_path)]
    command += ["--tokenizer", str(tokenizer)] if tokenizer else []
    busy_before, own_before = machine_busy_s(), children_cpu_s()
    started = time.perf_counter()
    with log_path.open("w") as log:
        code = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=job_env(system), cwd=ROOT
        ).returncode
    process_s = time.perf_counter() - started
    others_s = (machine_busy_s() - busy_before) - (children_cpu_s() - own_before)
    other_cpu_share = max(0.0, others_s) / (process_s * (os.cpu_count() or 1))
    failed = Measurement(
        system=system,
        task=task,
        repeat=repeat,
        ok=False,
        process_s=process_s,
        other_cpu_share=other_cpu_share,
    )
    try:
        if code != 0 or not result_path.exists():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            return dataclasses.replace(failed, error=f"exit {code}: {' | '.join(tail)}")
        result = json.loads(result_path.read_text())
        done = dataclasses.replace(
            failed,
            job_s=result["job_s"],
            output_bytes=count_bytes(output),
            num_samples=result["num_samples"],
            num_tokens=result["num_tokens"],
        )
        if done.num_samples != corpus.num_docs:
            error = f"wrote {done.num_samples} of {corpus.num_docs} documents"
            return dataclasses.replace(done, error=error)
        expected = corpus_tokens + corpus.num_docs if corpus_tokens else None  # EOS per document
        if task == "tokens" and system not in BOUNDS and expected != done.num_tokens:
            note = f"reports {done.num_tokens} tokens, expected {expected} (text + EOS)"
            if system in PEERS:  # our own peer code appends one EOS per document
                return dataclasses.replace(done, error=note)
            done = dataclasses.replace(done, note=note)
        return dataclasses.replace(done, ok=True)
    finally:
        shutil.rmtree(output, ignore_errors=True)
        result_path.unlink(missing_ok=True)


def warm_page_cache(corpus: Corpus) -> None:
    """Read every input file once so that no system pays for the first read from disk."""
    for path in corpus.files:
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass


@dataclasses.dataclass(frozen=True, kw_only=True)
class Summary:
    """Median and range of one (system, task) over its repeats.

    Ratios come twice: from median times, and from best (shortest) times, which are the better
    estimate when other work shares the cores (see ``other_cpu_share`` in the measurements).
    """

    system: str
    task: str
    num_ok: int
    num_failed: int
    job_s: list[float]
    mb_per_s: tuple[float, float, float]  # median, min, max
    docs_per_s: tuple[float, float, float]
    tokens_per_s: tuple[float, float, float] | None
    process_mb_per_s: float  # median, over the whole subprocess: interpreter start and imports too
    output_mb: float
    ratio_to_fastest_peer: float | None
    ratio_to_bound: float | None
    best_ratio_to_fastest_peer: float | None
    best_ratio_to_bound: float | None
    errors: list[str]


def _rates(numerator: float, times: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of ``numerator / time``."""
    return (numerator / statistics.median(times), numerator / max(times), numerator / min(times))


def summarize(
    measurements: list[Measurement], corpus: Corpus, corpus_tokens: int | None
) -> list[Summary]:
    """Median rates per (system, task) and the ratios the targets are stated in.

    The headline rate is MB/s of input for text and tokens/s for tokens; shardloader's rows are
    compared with the fastest peer on the same task, token rows with the ``bound`` job.
    """
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.system, m.task), []).append(m)

    def times(key: tuple[str, str]) -> list[float]:
        return [m.job_s for m in groups.get(key, []) if m.ok]

    def headline(key: tuple[str, str], best: bool = False) -> float:
        numerator = corpus.input_bytes / 1e6 if key[1] == "text" else corpus_tokens or 0
        return _rates(numerator, times(key))[2 if best else 0] if times(key) and numerator else 0.0

    def ratios(system: str, task: str, best: bool) -> tuple[float | None, float | None]:
        own = headline((system, task), best)
        peer = max((headline((p, task), best) for p in PEERS), default=0.0)
        bound = headline(("bound", "tokens"), best)
        to_peer = own / peer if system.startswith("shardloader") and own and peer else None
        return to_peer, (own / bound if task == "tokens" and own and bound else None)

    summaries = []
    for (system, task), runs in groups.items():
        key, good = (system, task), [m for m in runs if m.ok]
        to_peer, to_bound = ratios(system, task, best=False)
        best_to_peer, best_to_bound = ratios(system, task, best=True)
        with_tokens = task == "tokens" and bool(corpus_tokens) and bool(good)
        process_s = statistics.median([m.process_s for m in good]) if good else 0.0
        summaries.append(
            Summary(
                system=system,
                task=task,
                num_ok=len(good),
                num_failed=len(runs) - len(good),
                job_s=times(key),
                mb_per_s=_rates(corpus.input_bytes / 1e6, times(key)) if good else (0.0,) * 3,
                docs_per_s=_rates(corpus.num_docs, times(key)) if good else (0.0,) * 3,
                tokens_per_s=_rates(corpus_tokens or 0, times(key)) if with_tokens else None,
                process_mb_per_s=corpus.input_bytes / 1e6 / process_s if process_s else 0.0,
                output_mb=statistics.median([m.output_bytes for m in good]) / 1e6 if good else 0.0,
                ratio_to_fastest_peer=to_peer,
                ratio_to_bound=to_bound,
                best_ratio_to_fastest_peer=best_to_peer,
                best_ratio_to_bound=best_to_bound,
                errors=[m.error for m in runs if m.error],
            )
        )
    return summaries


def _fmt_rate(rate: tuple[float, float, float] | None, scale: float = 1.0, digits: int = 1) -> str:
    if rate is None or rate[0] == 0.0:
        return "-"
    median, low, high = (r / scale for r in rate)
    if low == high:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def format_table(summaries: list[Summary]) -> str:
    """The results table, one row per (system, task)."""
    header = (
        "system",
        "task",
        "MB/s",
        "MB/s w/ startup",
        "Mtokens/s",
        "kdocs/s",
        "output MB",
        "vs fastest peer",
        "vs bound",
    )
    rows = [header]
    for s in summaries:
        if s.num_ok == 0:
            rows.append((s.system, s.task, "FAILED", "", "", "", "", "", s.errors[0][:60]))
            continue
        rows.append(
            (
                s.system,
                s.task,
                _fmt_rate(s.mb_per_s),
                f"{s.process_mb_per_s:.1f}",
                _fmt_rate(s.tokens_per_s, 1e6, 2),
                _fmt_rate(s.docs_per_s, 1e3, 2),
                f"{s.output_mb:.1f}" if s.output_mb else "-",
                f"{s.ratio_to_fastest_peer:.2f}x" if s.ratio_to_fastest_peer else "",
                f"{s.ratio_to_bound:.2f}" if s.ratio_to_bound else "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def _verdict(median: float, best: float, target: float) -> str:
    if median >= target:
        return "meets"
    return "meets only at best-of-N" if best >= target else "MISSES"


def format_verdicts(summaries: list[Summary]) -> list[str]:
    """One line per target: the measured ratios (median, best) and whether they meet it."""
    lines = []
    for s in summaries:
        if not s.system.startswith("shardloader"):
            continue
        if s.task == "text" and s.ratio_to_fastest_peer and s.best_ratio_to_fastest_peer:
            median, best = s.ratio_to_fastest_peer, s.best_ratio_to_fastest_peer
            lines.append(
                f"{s.system} text: {median:.2f}x the fastest peer (best-of-{s.num_ok}: "
                f"{best:.2f}x); {_verdict(median, best, TARGET_TEXT_RATIO)} the "
                f"{TARGET_TEXT_RATIO}x target"
            )
        if s.task == "tokens" and s.ratio_to_bound and s.best_ratio_to_bound:
            median, best = s.ratio_to_bound, s.best_ratio_to_bound
            lines.append(
                f"{s.system} tokens: {median:.0%} of the tokenizer alone (best-of-{s.num_ok}: "
                f"{best:.0%}); {_verdict(median, best, TARGET_TOKEN_RATIO)} the "
                f"{TARGET_TOKEN_RATIO:.0%} target"
            )
    return lines


def print_report(
    measurements: list[Measurement], corpus: Corpus, corpus_tokens: int | None
) -> list[Summary]:
    """Print the table, the verdicts and a warning if other work competed for the cores."""
    summaries = summarize(measurements, corpus, corpus_tokens)
    print()
    print(format_table(summaries))
    print()
    for line in format_verdicts(summaries):
        print(line)
    busy = [m for m in measurements if m.other_cpu_share > BUSY_SHARE]
    if busy:
        print(
            f"note: during {len(busy)} of {len(measurements)} jobs, other processes used more than "
            f"{BUSY_SHARE:.0%} of the CPU (up to {max(m.other_cpu_share for m in busy):.0%}): "
            "best-of-N is the better estimate"
        )
    return summaries


def report_from_json(path: Path) -> int:
    """Re-print the table and verdicts of an earlier run's results file."""
    report = json.loads(path.read_text())
    info = report["corpus"]
    corpus = Corpus(
        path=ROOT / info["path"],
        files=(),
        num_docs=info["num_docs"],
        input_bytes=info["input_bytes"],
    )
    fields = {f.name for f in dataclasses.fields(Measurement)}
    measurements = [
        Measurement(**{k: v for k, v in m.items() if k in fields}) for m in report["measurements"]
    ]
    print(
        f"{path}: {info['num_docs']:,} docs, {info['input_bytes'] / 1e6:.1f} MB of JSONL; "
        f"{report['num_proc']} processes each, {report['repeats']} repeat(s)"
    )
    print_report(measurements, corpus, info.get("num_tokens"))
    return 0


def _versions(python: str) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "names = ['shardloader', 'webdataset', 'mosaicml-streaming', 'litdata', 'tokenizers',"
        " 'pyarrow', 'torch', 'zstandard']\n"
        "out = {'python': sys.version.split()[0]}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def default_python() -> str:
    """The interpreter for the jobs: .venv-bench's if it exists, else this one."""
    bench_python = ROOT / ".venv-bench" / "bin" / "python"
    return str(bench_python) if bench_python.exists() else sys.executable


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_job"]:
        return job_main(argv[1:])
    parser = argparse.ArgumentParser(
        description="Conversion throughput of shardloader and its peers on one generated corpus."
    )
    parser.add_argument("--mb", type=float, default=None, help="corpus size in MB (default 256)")
    parser.add_argument("--num-files", type=int, default=32, help="JSONL files in the corpus")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="processes each")
    parser.add_argument("--repeats", type=int, default=None, help="runs per measurement (3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 32 MB, 1 repeat")
    parser.add_argument("--tasks", default="text,tokens", help="comma-separated: text,tokens")
    parser.add_argument("--systems", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--python", default=default_python(), help="interpreter for the jobs")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results-convert.json")
    parser.add_argument(
        "--from-json", type=Path, help="re-print the table of an earlier results file; run nothing"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        return report_from_json(args.from_json)
    mb = args.mb if args.mb is not None else (32.0 if args.quick else 256.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    tasks = [t for t in args.tasks.split(",") if t]
    only = {s for s in args.systems.split(",") if s}
    plan = [(s, "text") for s in TEXT_SYSTEMS if "text" in tasks]
    plan += [(s, "tokens") for s in TOKEN_SYSTEMS if "tokens" in tasks]
    if only:
        plan = [(s, t) for s, t in plan if s in only or s.split("-")[0] in only]
        if "tokens" in tasks and ("bound", "tokens") not in plan:
            plan.insert(0, ("bound", "tokens"))  # tokens/s needs the bound's token count
    if not plan or repeats < 1 or args.num_proc < 1:
        parser.error("nothing to run: check --tasks, --systems, --repeats and --num-proc")

    BENCH_DIR.mkdir(exist_ok=True)
    corpus = ensure_corpus(mb, args.seed, args.num_files)
    tokenizer = ensure_tokenizer(corpus) if "tokens" in tasks else None
    warm_page_cache(corpus)
    versions = _versions(args.python)
    print(
        f"corpus: {corpus.path.relative_to(ROOT)}: {len(corpus.files)} files, "
        f"{corpus.num_docs:,} docs, {corpus.input_bytes / 1e6:.1f} MB of JSONL; "
        f"{args.num_proc} processes each, {repeats} repeat(s)"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)

    measurements: list[Measurement] = []
    corpus_tokens: int | None = None  # set by the first good "bound" job
    for repeat in range(repeats):
        for system, task in plan:
            m = measure(
                system=system,
                task=task,
                repeat=repeat,
                corpus=corpus,
                num_proc=args.num_proc,
                tokenizer=tokenizer if task == "tokens" else None,
                corpus_tokens=corpus_tokens,
                python=args.python,
            )
            measurements.append(m)
            if m.ok and system == "bound" and corpus_tokens is None:
                corpus_tokens = m.num_tokens
            status = f"{m.job_s:7.2f} s" if m.ok else f"FAILED ({m.error[:200]})"
            status += f"  (other processes: {m.other_cpu_share:.0%} CPU)" if m.ok else ""
            status += f" (note: {m.note})" if m.note else ""
            print(f"  [{repeat + 1}/{repeats}] {system:<20} {task:<6} {status}", flush=True)

    summaries = print_report(measurements, corpus, corpus_tokens)
    report = {
        "corpus": {
            "path": str(corpus.path.relative_to(ROOT)),
            "files": len(corpus.files),
            "num_docs": corpus.num_docs,
            "input_bytes": corpus.input_bytes,
            "num_tokens": corpus_tokens,
            "mb": mb,
            "seed": args.seed,
        },
        "num_proc": args.num_proc,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "shard_bytes": SHARD_BYTES,
        "versions": versions,
        "summaries": [dataclasses.asdict(s) for s in summaries],
        "measurements": [dataclasses.asdict(m) for m in measurements],
        "targets": {
            "text_vs_fastest_peer": TARGET_TEXT_RATIO,
            "tokens_vs_bound": TARGET_TOKEN_RATIO,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all(m.ok for m in measurements) else 1


if __name__ == "__main__":
    sys.exit(main())
