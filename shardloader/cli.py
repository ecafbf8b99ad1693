"""Command-line interface: ``shardloader convert | merge | inspect | stats | verify | profile``.

Also ``train``, ``index`` (Parquet files read in place) and ``train-tokenizer``. Flags mirror
the fields of the config objects (`shardloader.options`; ``train`` hands all its flags to
``python -m shardloader.train``). This module parses and prints;
the work happens in the library. Errors from shardloader print as one line
(``error: <location>: <what>``) and exit 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from shardloader import __version__
from shardloader.convert import ConvertConfig, ConvertResult, convert, merge
from shardloader.errors import ConfigError, ShardloaderError
from shardloader.manifest import Manifest, read_manifest
from shardloader.options import add_options, config_from_args, parse_size
from shardloader.profiling import LoaderResult, ProfileConfig, ProfileReport, profile_dataset
from shardloader.verify import iter_samples, verify

__all__ = ["build_parser", "main", "parse_size"]  # parse_size: shardloader.options's, re-exported


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _add_convert(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert a raw corpus into shards and a manifest")
    p.add_argument("inputs", nargs="+", help="files, directories or globs (local or fsspec URLs)")
    add_options(p, ConvertConfig)


def _convert(args: argparse.Namespace) -> int:
    result = convert(args.inputs, config_from_args(ConvertConfig, args))
    _print_result(result)
    return 0


def _print_result(r: ConvertResult) -> None:
    if r.tasks_run == 0 and r.manifest is not None:
        print(f"{r.output}: already converted, nothing to do")
        _print_manifest(r.manifest)
        return
    rate = r.num_input_bytes / max(r.wall_s, 1e-9) / 1e6
    ratio = r.num_input_bytes / r.num_output_bytes if r.num_output_bytes else 0.0
    print(f"converted {r.num_docs:,} documents in {r.wall_s:.1f} s ({rate:.1f} MB/s of input text)")
    print(f"  tasks:      {r.tasks_run} run, {r.tasks_skipped} already done, {r.tasks_total} total")
    print(f"  bytes in:   {_fmt_bytes(r.num_input_bytes)} (uncompressed input)")
    print(f"  bytes out:  {_fmt_bytes(r.num_output_bytes)} (compression ratio {ratio:.2f}x)")
    if r.num_tokens:
        print(f"  tokens:     {r.num_tokens:,} ({r.num_tokens / max(r.wall_s, 1e-9):,.0f}/s)")
    skipped = sum(r.skipped.values())
    print(f"  skipped:    {skipped}" + (f" {dict(r.skipped)}" if skipped else ""))
    for example in r.skipped_examples[:5]:
        print(f"    {example}")
    if r.manifest is not None:
        _print_manifest(r.manifest)
    else:
        print(f"  this slice is done; when every slice is, run: shardloader merge {r.output}")


def _print_manifest(m: Manifest) -> None:
    payload = (
        "chat token ids with loss spans"
        if "loss_spans" in m.fields
        else "token ids"
        if m.tokenized
        else "chat messages"
        if list(m.fields)[1:2] == ["messages"]
        else "text"
    )
    print(
        f"dataset: {len(m.shards)} {m.format} shards ({m.compression}), {m.num_samples:,} samples "
        f"of {payload}, {_fmt_bytes(m.num_bytes)}"
        + (f", {m.num_tokens:,} tokens" if m.tokenized else "")
    )
    if m.skipped:
        print(f"  skipped records: {dict(m.skipped)}")


def _add_index(sub: Any) -> None:
    p = sub.add_parser(
        "index", help="write a manifest over existing Parquet files, read in place (zero copy)"
    )
    p.add_argument("source", help="a directory, glob or file of Parquet files (local or URL)")
    p.add_argument("--text-field", default="text", help="the string column holding the text")
    p.add_argument(
        "--id-field",
        default="id",
        help="the id column, used where the files have it ('': ids are file:row)",
    )
    p.add_argument("--keep-fields", nargs="*", default=[], help="other columns to serve")
    p.add_argument("--output", help="directory for _manifest.json (default: beside the files)")


def _index(args: argparse.Namespace) -> int:
    from shardloader.index import index_parquet

    manifest = index_parquet(
        args.source,
        text_field=args.text_field,
        id_field=args.id_field or None,
        keep_fields=args.keep_fields,
        output=args.output,
    )
    where = args.output or manifest.root or args.source
    print(f"{where}: manifest written ({manifest.checksum_algorithm} identities)")
    _print_manifest(manifest)
    return 0


def _merge(args: argparse.Namespace) -> int:
    manifest = merge(args.output)
    print(f"{args.output}: manifest written")
    _print_manifest(manifest)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if args.mix:
        return _inspect_mix(args)
    if not args.dataset:
        raise ConfigError("inspect needs a dataset (or --mix FILE)")
    m = read_manifest(args.dataset)
    _print_manifest(m)
    print(f"  fields: {json.dumps(dict(m.fields))}")
    if m.tokenizer:
        print(
            f"  tokenizer: {m.tokenizer['fingerprint'][:23]}… vocab {m.tokenizer['vocab_size']}, "
            f"dtype {m.token_dtype}"
            + (
                f", chat template {m.tokenizer['chat_template'][:23]}…"
                if m.tokenizer.get("chat_template")
                else ""
            )
        )
    print(f"  sources: {len(m.sources)} files; created by {m.created_by}")
    sizes = [s.num_samples for s in m.shards]
    if sizes:
        print(f"  samples per shard: min {min(sizes)}, max {max(sizes)}")
    for s in m.shards[: args.shards]:
        print(
            f"  {s.path}: {s.num_samples} samples, {_fmt_bytes(s.num_bytes)}, "
            f"first id {s.first_sample_id}"
        )
    if len(m.shards) > args.shards:
        print(f"  ... {len(m.shards) - args.shards} more shards")
    for sample in iter_samples(args.dataset, limit=args.samples):
        shown = {k: v for k, v in sample.items() if k not in ("text", "input_ids")}
        if "text" in sample:
            text = sample["text"]
            shown["text"] = text[:160] + (f"… ({len(text)} chars)" if len(text) > 160 else "")
        elif "input_ids" in sample:
            ids = sample["input_ids"]
            shown["input_ids"] = f"{ids[:12].tolist()}… ({len(ids)} tokens)"
        print(f"  sample {json.dumps(shown, ensure_ascii=False)}")
    return 0


def _inspect_mix(args: argparse.Namespace) -> int:
    """Print a mixture's plan: per source, units and passes per epoch, when it runs out."""
    from shardloader.mix_config import Mixture
    from shardloader.mix_dataset import MixDataset
    from shardloader.pack import PackConfig

    mixture = Mixture.from_file(args.mix)
    pack = PackConfig(seq_len=args.seq_len) if mixture.unit == "tokens" else None
    dataset = MixDataset(
        mixture, pack=pack, batch_size=args.batch_size, rank=0, world_size=args.world_size
    )
    spec = dataset.spec()
    batch = dataset.batch_units(args.world_size)
    unit = spec.unit
    print(
        f"{args.mix}: {len(spec.names)} sources, {spec.total:,} {unit} per epoch "
        f"({spec.total // batch:,} global batches of {batch:,} {unit})"
    )
    for start, _, _, weights in spec.phases:
        shown = ", ".join(f"{n} {w:.3f}" for n, w in zip(spec.names, weights, strict=True))
        print(f"  from {start:,} {unit}: {shown}")
    for row in dataset.report():
        out = row["runs_out_at"]
        ends = "never" if out is None else f"after {out:,.0f} {unit} (step {int(out) // batch:,})"
        print(
            f"  {row['source']}: {row['samples']:,} samples, {row['tokens']:,} tokens; "
            f"per epoch {row['units_per_epoch']:,.0f} {unit} = {row['passes_per_epoch']:.2f} "
            f"passes (~{row['samples_per_epoch']:,.0f} samples); runs out {ends}"
        )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from shardloader.stats import dataset_stats, write_plot

    stats = dataset_stats(
        args.dataset, sample=args.sample, seq_len=args.seq_len, long_threshold=args.long
    )
    if args.plot:
        write_plot(stats, args.plot)
    if args.json:
        print(json.dumps(stats.to_dict(), indent=1))
        return 0
    print(
        f"{stats.dataset}: {stats.num_documents:,} documents"
        + (f", {stats.num_tokens:,} tokens" if stats.length_unit == "tokens" else "")
        + f", {_fmt_bytes(stats.num_bytes)} in {stats.num_shards} {stats.format} shards "
        f"({stats.compression})"
    )
    measured = (
        f"a sample of {stats.num_measured:,} documents from shards spread over the dataset"
        if stats.sampled
        else f"all {stats.num_measured:,} documents"
    )
    lengths = stats.lengths
    print(f"\nlength in {stats.length_unit} ({measured}):")
    print(
        f"  mean {lengths.mean:,.1f}  p50 {lengths.p50:,}  p90 {lengths.p90:,}  "
        f"p99 {lengths.p99:,}  max {lengths.max:,}"
    )
    top = max((c for _, _, c in stats.histogram), default=0)
    for lo, hi, count in stats.histogram:
        label = f"{lo:,}" if hi - lo == 1 else f"{lo:,}-{hi - 1:,}"
        bar = "#" * (round(40 * count / top) if top else 0)
        print(f"  {label:>17} {count:>9,} {bar}")
    print(f"  empty: {stats.num_empty:,}; longer than {stats.long_threshold:,}: {stats.num_long:,}")
    if stats.pack:
        print(f"\npacking into rows of {stats.seq_len:,} tokens (one stream, manifest order):")
        for p in stats.pack:
            print(f"  {p.mode:<7} {p.num_rows:>12,} rows, {p.utilization:.1%} of their tokens real")
    sb, sd = stats.shard_bytes, stats.shard_documents
    print(
        f"\nshards: {_fmt_bytes(sb.min)} to {_fmt_bytes(sb.max)} (median {_fmt_bytes(sb.p50)}); "
        f"{sd.min:,} to {sd.max:,} documents (median {sd.p50:,})"
    )
    print(f"\nsources: {len(stats.sources)} files")
    ranked = sorted(stats.sources, key=lambda s: -s["num_records"])
    for source in ranked[: args.sources]:
        skipped = f", {source['num_skipped']:,} skipped" if source["num_skipped"] else ""
        print(f"  {source['num_records']:>10,} records{skipped}  {source['url']}")
    if len(ranked) > args.sources:
        print(f"  ... {len(ranked) - args.sources} more")
    if stats.skipped:
        print(f"skipped at conversion: {stats.skipped}")
    if args.plot:
        print(f"\nplot written to {args.plot}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = verify(args.dataset)
    for problem in report.problems:
        print(f"BAD {problem}")
    status = "OK" if report.ok else f"FAILED: {len(report.problems)} bad shards"
    print(
        f"{status}: {report.num_shards} shards, {report.num_samples:,} samples, "
        f"{_fmt_bytes(report.num_bytes)} checked"
    )
    return 0 if report.ok else 1


def _train_tokenizer(args: argparse.Namespace) -> int:
    from shardloader.sources import (
        CHAT_SCHEMAS,
        BadRecords,
        RecordSpec,
        detect_file_schema,
        read_documents,
    )
    from shardloader.storage import list_files
    from shardloader.tokenizer import CHAT_SPECIAL_TOKENS, train_bpe_tokenizer

    files = list_files(args.inputs)
    bad = BadRecords(args.on_bad_record)
    budget = args.max_bytes

    def texts() -> Any:
        # Chat files (detected per file, as convert does) give their turns' contents.
        nonlocal budget
        for f in files:
            schema = detect_file_schema(f, args.text_field)
            spec = RecordSpec(text_field=args.text_field, id_field=None, schema=schema)
            for doc in read_documents(f, spec=spec, bad=bad):
                text = doc.text
                if schema in CHAT_SCHEMAS:  # normalized turns as canonical JSON
                    text = "\n".join(turn["content"] for turn in json.loads(doc.text))
                yield text
                budget -= len(text)
                if budget <= 0:
                    return

    chat = args.chat_template == "default"
    path = train_bpe_tokenizer(texts(), args.output, vocab_size=args.vocab_size, chat_template=chat)
    print(f"tokenizer written to {path} (vocab {args.vocab_size}, byte-level BPE)")
    if chat:
        print(
            "  chat template: the default (ChatML-like, special tokens "
            f"{' '.join(CHAT_SPECIAL_TOKENS)}) in tokenizer_config.json; "
            "--chat-template none leaves it out"
        )
    else:
        print("  chat template: none (--chat-template none)")
    if bad.total:
        print(f"  skipped records: {dict(bad.counts)}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    config = config_from_args(ProfileConfig, args)
    values = dataclasses.asdict(config)
    mix, source = values.pop("mix"), values.pop("source")
    if mix:
        return _profile_mix(mix, values, as_json=args.json)
    report = profile_dataset(source, **values)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0
    _print_profile_head(report)
    print()
    for run in report.loaders:
        _print_loader_run("ShardLoader", run)
    print(f"\nbottleneck: {report.bottleneck}")
    for line in report.suggestions:
        print(f"  - {line}")
    return 0


def _profile_mix(mix: str, values: dict[str, Any], *, as_json: bool) -> int:
    from shardloader.mix_profile import MIX_STAGES, bottleneck_lines, profile_mixture

    report = profile_mixture(mix, **values)
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0
    print(f"{report.mix}: {len(report.sources)} sources, weights in {report.unit}")
    for source in report.sources:
        print(
            f"\nsource {source.name}: weight {source.weight:.3f}, "
            f"{source.token_share:.1%} of the mix's tokens"
        )
        _print_profile_head(source.report)
        print(f"bottleneck: {source.report.bottleneck}")
        for line in source.report.suggestions:
            print(f"  - {line}")
    print(f"\n{'source':<16} {'per worker':>12} {'token share':>12} {'mixed/worker':>13}")
    for source in report.sources:
        print(
            f"{source.name:<16} {source.per_worker_tokens_per_s / 1e6:>11.2f}M "
            f"{source.token_share:>12.1%} {source.mix_tokens_per_s / 1e6:>12.2f}M"
        )
    print(
        f"{'the mix':<16} {report.per_worker_tokens_per_s / 1e6:>11.2f}M {'':>12} {'':>13}"
        "  one worker: 1 / sum(share / rate)"
    )
    print(f"(per worker: {' + '.join(MIX_STAGES[report.unit])} in turn, the stages the mix runs)")
    print()
    for run in report.loaders:
        _print_loader_run("MixLoader", run)
    head, why = bottleneck_lines(report)
    print(f"\nbottleneck: {head}\n  {why}")
    for line in report.suggestions:
        print(f"  - {line}")
    return 0


def _print_profile_head(report: ProfileReport) -> None:
    """The dataset line and the stage table of a `ProfileReport`."""
    kind = "tokenized" if report.tokenized else "text"
    where = "remote" if report.remote else "local"
    print(
        f"{report.source}: {report.num_shards} {kind} shards, "
        f"{_fmt_bytes(report.dataset_bytes)} ({where}), "
        f"{_fmt_bytes(report.mean_shard_bytes)} per shard"
    )
    print(f"\n{'stage':<16} {'rate':>22} {'tokens/s':>12}  note")
    for stage in report.stages:
        rate = "-"
        if stage.seconds > 0 and stage.unit == "MB":
            rate = f"{stage.rate:,.1f} MB/s"
        elif stage.seconds > 0:
            scaled = f"{stage.rate / 1e6:.2f}M" if stage.rate >= 1e6 else f"{stage.rate / 1e3:.1f}k"
            rate = f"{scaled} {stage.unit}/s"
        tps = f"{stage.tokens_per_s / 1e6:.2f}M" if stage.tokens_per_s else "-"
        print(f"{stage.name:<16} {rate:>22} {tps:>12}  {stage.note}")
    print(
        f"{'one worker':<16} {'':>22} {report.per_worker_tokens_per_s / 1e6:>11.2f}M"
        "  decode + tokenize + pack + collate in turn"
    )


def _print_loader_run(kind: str, run: LoaderResult) -> None:
    """One end-to-end loader run; a `MixLoader`'s with its stages' busy shares."""
    print(
        f"{kind} num_workers={run.num_workers}: {run.tokens_per_s / 1e6:.2f}M trained "
        f"tokens/s, first batch after {run.first_batch_s:.2f} s ({run.batches} batches, "
        f"{run.batches_per_s:,.0f}/s)"
    )
    if kind == "MixLoader" and run.stage_busy:
        busy = ", ".join(f"{name} {share:.0%}" for name, share in run.stage_busy.items())
        k = run.num_workers
        who = f"{k} worker{'s' if k > 1 else ''}" if k else "the main process"
        print(f"  busy share of {who}: {busy}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``shardloader`` command."""
    parser = argparse.ArgumentParser(
        prog="shardloader",
        description="Convert text corpora into compressed shards for LLM training.",
    )
    parser.add_argument("--version", action="version", version=f"shardloader {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_index(sub)
    p = sub.add_parser("merge", help="write the manifest of a conversion run in slices")
    p.add_argument("output")
    p = sub.add_parser(
        "inspect", help="print a dataset's manifest summary and a few samples, or a mixture's plan"
    )
    p.add_argument("dataset", nargs="?")
    p.add_argument("--mix", help="a mixture file (YAML or JSON): print its plan per source")
    p.add_argument("--batch-size", type=int, default=8, help="--mix: per-rank batch")
    p.add_argument("--world-size", type=int, default=1, help="--mix: number of ranks")
    p.add_argument("--seq-len", type=int, default=2048, help="--mix: row length (token mixes)")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--shards", type=int, default=5)
    p = sub.add_parser(
        "stats",
        help="summarize a dataset: documents, tokens, lengths, sources, shards, packing fill",
    )
    p.add_argument("dataset", help="a dataset directory or manifest (local or URL)")
    p.add_argument(
        "--sample",
        type=int,
        default=10_000,
        help="text datasets: documents to measure, from shards spread over the dataset "
        "(default 10000; token datasets read every length)",
    )
    p.add_argument(
        "--seq-len", type=int, default=2048, help="token datasets: row length for packing"
    )
    p.add_argument(
        "--long",
        type=int,
        help="count documents longer than this (default: --seq-len tokens, 100000 characters)",
    )
    p.add_argument("--sources", type=int, default=10, help="source files to list (largest first)")
    p.add_argument("--plot", help="write a PNG of the distributions here (the 'plot' extra)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p = sub.add_parser("verify", help="re-read every shard and check counts and checksums")
    p.add_argument("dataset")
    p = sub.add_parser("train-tokenizer", help="train a small byte-level BPE tokenizer offline")
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--output", required=True, help="directory for tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--text-field", default="text")
    p.add_argument(
        "--max-bytes",
        type=parse_size,
        default=parse_size("200MB"),
        help="train on at most this much text (default 200MiB)",
    )
    p.add_argument("--on-bad-record", default="raise", choices=["raise", "skip"])
    p.add_argument(
        "--chat-template",
        default="default",
        choices=["default", "none"],
        help="write a default ChatML-like chat template (and its special tokens) into "
        "tokenizer_config.json, so convert can render chat data offline (default: default)",
    )
    p = sub.add_parser(
        "profile",
        help="time each stage of reading a dataset (or a mixture) here; name the bottleneck",
    )
    add_options(p, ProfileConfig)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    # Its flags live with TrainConfig in shardloader.train, which imports torch: parsed there.
    p = sub.add_parser(
        "train",
        help="fine-tune a causal LM on shards (run it under torchrun for many processes)",
        add_help=False,
    )
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    return parser


_COMMANDS = {
    "convert": _convert,
    "index": _index,
    "merge": _merge,
    "inspect": _inspect,
    "stats": _stats,
    "verify": _verify,
    "train-tokenizer": _train_tokenizer,
    "profile": _profile,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # all its flags, --help included, belong to shardloader.train
        from shardloader.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _COMMANDS[args.command](args)
    except ShardloaderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os._exit(0)
