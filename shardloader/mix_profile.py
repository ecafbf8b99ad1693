"""Why is my mixture slow: each source's stages, the `MixLoader` end to end, the limiting source.

`profile_mixture` reads a mixture file and measures:

- every source alone, with `shardloader.profiling.profile_dataset`'s stages (fetch, decode,
  tokenize, pack, collate; no loader runs), and the tokens/s one worker makes of it running the
  stages the mix runs: decode, pack and collate for a token mixture (tokenized sources; the mix
  cuts rows), decode and tokenize for a samples mixture (text is tokenized in the loader's
  ``collate_fn`` here, as a training loop would have to);
- the `MixLoader` end to end with each worker count, and the share of the workers' time each of
  its stages took (`MixLoader.stage_seconds`).

Which source limits the mix: a worker spends ``share / rate`` seconds per mixed token on a
source that makes ``share`` of the mix's tokens at ``rate`` tokens/s, so one worker makes
``1 / sum(share / rate)`` mixed tokens/s, and the source with the lowest ``rate / share`` takes
most of its time. A token mixture's shares are its weights; a samples mixture's weigh each
source's weight by its tokens per sample. The weights are those the mix starts with (phases
change them later).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shardloader.errors import ConfigError
from shardloader.mix_config import Mixture, normalize
from shardloader.pack import PackConfig
from shardloader.profiling import (
    DEFAULT_CACHE_BYTES,
    LoaderResult,
    ProfileReport,
    data_advice,
    format_rate,
    profile_dataset,
    serial_rate,
    time_loader,
    trained_tokens,
    worker_advice,
)

# The stages of `profile_dataset` that a mix's worker runs, by the mixture's unit.
MIX_STAGES = {"tokens": ("decode", "pack", "collate"), "samples": ("decode", "tokenize")}


@dataclass(frozen=True)
class SourceProfile:
    """One source of the mixture, measured alone.

    Attributes:
        name: The source's name in the mixture.
        weight: Its normalized weight (the mix's first phase).
        token_share: Its share of the mix's tokens.
        per_worker_tokens_per_s: Tokens/s of it one worker makes (the mix's stages in turn).
        mix_tokens_per_s: ``per_worker_tokens_per_s / token_share``: the mixed tokens/s one
            worker would make if every source were this one's speed.
        report: Its stages (`profile_dataset` without loader runs), with advice on its data.
    """

    name: str
    weight: float
    token_share: float
    per_worker_tokens_per_s: float
    mix_tokens_per_s: float
    report: ProfileReport


@dataclass(frozen=True)
class MixProfileReport:
    """What `profile_mixture` measured, and what it suggests.

    Attributes:
        mix: The mixture file.
        unit: ``"tokens"`` or ``"samples"``.
        sources: Every source, in the mixture's order.
        loaders: The `MixLoader` with each worker count.
        per_worker_tokens_per_s: Mixed tokens/s of one worker: ``1 / sum(share / rate)``.
        bottleneck: The name of the source with the lowest ``mix_tokens_per_s``.
        bottleneck_time_share: The part of a worker's time that source takes.
        suggestions: Advice for the mix as a whole (each source's is in its report).
    """

    mix: str
    unit: str
    sources: tuple[SourceProfile, ...]
    loaders: tuple[LoaderResult, ...]
    per_worker_tokens_per_s: float
    bottleneck: str
    bottleneck_time_share: float
    suggestions: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``shardloader profile --mix FILE --json``)."""
        return dataclasses.asdict(self)


def profile_mixture(
    mix: str,
    *,
    tokenizer: str | None = None,
    seq_len: int = 2048,
    batch_size: int = 8,
    num_workers: Sequence[int] = (0, 2),
    seconds: float = 2.0,
    cache_dir: str | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    storage_options: Mapping[str, Any] | None = None,
) -> MixProfileReport:
    """Measure every source of the mixture in ``mix``, then the mix (module docstring).

    The settings are `profile_dataset`'s (and ``shardloader profile``'s flags), applied to
    every source and to the `MixLoader`.

    Args:
        mix: A mixture file (YAML or JSON; `Mixture.from_file`).
        tokenizer: Needed for text sources.
        seq_len: Token mixtures: tokens per row.
        batch_size: Per step: rows (token mixtures) or samples.
        num_workers: Worker counts to run the `MixLoader` with.
        seconds: Per stage of each source, and per loader run.
        cache_dir: Of the loader runs.
        cache_bytes: Each dataset is judged against it.
        storage_options: For fsspec.

    Raises:
        ConfigError: A bad mixture file, a mix its sources cannot make, text sources without a
            tokenizer, or a bad setting.
        ManifestError: A source holds no dataset.
    """
    from shardloader.mix_dataset import MixDataset

    mixture = Mixture.from_file(mix)
    options = dict(storage_options or {})
    pack = PackConfig(seq_len=seq_len) if mixture.unit == "tokens" else None
    # Plan it first: an infeasible mix or incompatible sources fail before any timing.
    MixDataset(
        mixture, pack=pack, tokenizer=tokenizer, rank=0, world_size=1, storage_options=options
    ).spec()
    reports = []
    for source in mixture.sources:
        report = profile_dataset(
            source.url,
            tokenizer=tokenizer,
            seq_len=seq_len,
            batch_size=batch_size,
            num_workers=(),
            seconds=seconds,
            cache_bytes=cache_bytes,
            storage_options=options,
        )
        # Worker counts are the mix's advice; keep the advice on this source's data.
        advice = data_advice(report, cache_bytes=cache_bytes)
        reports.append(dataclasses.replace(report, suggestions=tuple(advice)))
    sources = measure_sources(mixture, reports)
    scratch = tempfile.mkdtemp(prefix="shardloader-profile-mix-")
    try:
        loaders = tuple(
            _run_mix_loader(
                mixture,
                tokenizer,
                pack,
                batch_size,
                k,
                seconds,
                cache_dir or os.path.join(scratch, "cache"),
                options,
            )
            for k in num_workers
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    per_worker, bottleneck, time_share = mix_bottleneck(sources)
    fetch = min((_fetch_rate(s) for s in sources), default=float("inf"))
    cpu_count = os.cpu_count() or 1
    advice = worker_advice(per_worker, fetch, cpu_count) if per_worker else []
    advice += loader_advice(loaders, cpu_count)
    return MixProfileReport(
        mix=mix,
        unit=mixture.unit,
        sources=sources,
        loaders=loaders,
        per_worker_tokens_per_s=per_worker,
        bottleneck=bottleneck,
        bottleneck_time_share=time_share,
        suggestions=tuple(advice),
    )


def measure_sources(
    mixture: Mixture, reports: Sequence[ProfileReport]
) -> tuple[SourceProfile, ...]:
    """Each source's weight, token share and per-worker rates from its measured stages (pure)."""
    weights = [float(w) for w in normalize([s.weight for s in mixture.sources])]
    stages = MIX_STAGES[mixture.unit]
    per_unit = [
        1.0 if mixture.unit == "tokens" else _tokens_per_sample(report) for report in reports
    ]
    mass = [w * t for w, t in zip(weights, per_unit, strict=True)]
    total = sum(mass)
    if total <= 0:
        raise ConfigError("the mixture's sources hold no tokens to profile")
    out = []
    for source, weight, m, report in zip(mixture.sources, weights, mass, reports, strict=True):
        share = m / total
        rate = serial_rate([s.tokens_per_s for s in report.stages if s.name in stages])
        out.append(
            SourceProfile(
                name=source.label,
                weight=weight,
                token_share=share,
                per_worker_tokens_per_s=rate,
                mix_tokens_per_s=rate / share if share > 0 else float("inf"),
                report=report,
            )
        )
    return tuple(out)


def mix_bottleneck(sources: Sequence[SourceProfile]) -> tuple[float, str, float]:
    """One worker's mixed tokens/s, the source that limits it, and its part of the time (pure).

    Returns:
        ``(1 / sum(share / rate), name of the lowest rate / share, its share / rate of the
        total)``; ``(0.0, name, 1.0)`` when a source's rate is unknown (nothing measured).
    """
    timed = [s for s in sources if s.token_share > 0]
    slowest = min(timed, key=lambda s: s.mix_tokens_per_s)
    if any(s.per_worker_tokens_per_s <= 0 for s in timed):
        return 0.0, slowest.name, 1.0
    costs = {s.name: s.token_share / s.per_worker_tokens_per_s for s in timed}
    total = sum(costs.values())
    return 1.0 / total, slowest.name, costs[slowest.name] / total


def loader_advice(loaders: Sequence[LoaderResult], cpu_count: int) -> list[str]:
    """A word when more workers read the mix no faster than fewer did (pure)."""
    runs = sorted(loaders, key=lambda run: run.num_workers)
    for fewer, more in zip(runs, runs[1:], strict=False):
        if more.num_workers > fewer.num_workers and more.tokens_per_s <= fewer.tokens_per_s:
            return [
                f"MixLoader with {more.num_workers} worker{'s' if more.num_workers > 1 else ''} "
                f"made {format_rate(more.tokens_per_s)} "
                f"tokens/s, no more than {format_rate(fewer.tokens_per_s)} with "
                f"{fewer.num_workers}: every worker decodes each shard the mix passes through "
                f"(it builds only its own samples), and the workers share {cpu_count} cores"
            ]
    return []


def bottleneck_lines(report: MixProfileReport) -> list[str]:
    """The bottleneck, in words (``shardloader profile --mix`` prints it)."""
    source = next(s for s in report.sources if s.name == report.bottleneck)
    return [
        f"source {source.name} (its slowest stage: {source.report.bottleneck})",
        f"{source.name} makes {format_rate(source.per_worker_tokens_per_s)} tokens/s per worker "
        f"for {source.token_share:.0%} of the mix's tokens: at most "
        f"{format_rate(source.mix_tokens_per_s)} mixed tokens/s per worker; it takes "
        f"{report.bottleneck_time_share:.0%} of a worker's time",
    ]


def _tokens_per_sample(report: ProfileReport) -> float:
    """Mean tokens of a sample, from the decode stage (samples/s and tokens/s)."""
    decode = next(s for s in report.stages if s.name == "decode")
    return (decode.tokens_per_s or 0.0) / decode.rate if decode.rate > 0 else 0.0


def _fetch_rate(source: SourceProfile) -> float:
    """Mixed tokens/s the source's fetch allows: its fetch rate over its share."""
    fetch = next((s.tokens_per_s for s in source.report.stages if s.name == "fetch"), None)
    if not fetch or source.token_share <= 0:
        return float("inf")
    return fetch / source.token_share


class _SampleTokens:
    """A samples mixture's ``collate_fn`` here: the step's token count (text is tokenized)."""

    def __init__(self, tokenizer: str | None) -> None:
        self.tokenizer = tokenizer
        self._encoder: Any = None

    def __call__(self, samples: list[dict[str, Any]]) -> int:
        if self._encoder is None:  # made in the worker that uses it
            from shardloader.pack_encode import SampleEncoder
            from shardloader.tokenizer import TextTokenizer

            tokenizer = TextTokenizer(self.tokenizer) if self.tokenizer is not None else None
            self._encoder = SampleEncoder(tokenizer)
        return sum(len(doc.input_ids) for doc in self._encoder(samples))


def _run_mix_loader(
    mixture: Mixture,
    tokenizer: str | None,
    pack: PackConfig | None,
    batch_size: int,
    num_workers: int,
    seconds: float,
    cache_dir: str,
    options: Mapping[str, Any],
) -> LoaderResult:
    from shardloader.dataset import StreamConfig
    from shardloader.mix_dataset import MixDataset, MixLoader

    dataset = MixDataset(
        mixture,
        config=StreamConfig(cache_dir=cache_dir),
        pack=pack,
        tokenizer=tokenizer,
        rank=0,
        world_size=1,
        storage_options=options,
    )
    collate = None if pack is not None else _SampleTokens(tokenizer)
    try:
        loader = MixLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate
        )
        count = trained_tokens if pack is not None else int
        return time_loader(loader, num_workers, seconds, count)
    finally:
        dataset.close()
