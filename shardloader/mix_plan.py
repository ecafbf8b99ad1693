"""The mix schedule: which source fills each place of each global batch. Pure: no I/O, no torch.

A mixture is read as one global stream, the same on every rank, so every guarantee is a
property of the stream and holds on any topology:

- **Source streams.** Source ``i`` is an endless sequence of passes; pass ``p`` is the source's
  samples in the order `shardloader.plan.plan_epoch` gives one reader (shards permuted, ids
  permuted inside windows of ``shuffle_window`` shards), seeded by ``(seed, i)`` and ``p``.
  Stream position ``k`` is sample ``order(p = k // size)[k % size]``. So inside a source every
  sample is served once per pass before any repeats; an up-weighted source repeats whole passes,
  each in a new order; a down-weighted one serves the next part of its pass each epoch.
- **Samples** (``unit="samples"``): global batch ``b`` of ``B`` samples takes ``floor(w_i B)`` or
  ``ceil(w_i B)`` samples of source ``i``: always within one sample of ``w_i B``. Which sources
  get the extra sample is decided by the largest accumulated shortfall (integer arithmetic on
  the weights as exact fractions), so every prefix of a phase stays within about one sample of
  the target too. The batch lays its places out interleaved (source ``i``'s ``j``-th place at
  ``(j + 1/2) / c_i``) and rank ``r`` takes places ``[r B/W, (r+1) B/W)``.
- **Tokens** (``unit="tokens"``): the stream is a sequence of documents cut into global batches
  of exactly ``N`` tokens (rows of ``seq_len``; a document crossing a batch boundary continues
  in the next one, so no token is padding or lost). Each next document comes from the source
  whose committed tokens lag its target ``w_i x position`` most; a source is never ahead of its
  target by a whole document, so each batch and each prefix is within a few documents of the
  target (the counters report the realized tokens). Rank ``r`` takes rows ``[r R, (r+1) R)``.
  A document's tokens are its stored count (``length``): token mixes pack like ``concat``, so
  no document is truncated or dropped (``PackConfig.long_docs`` does not apply) and the counts
  are exact; loss masks (SFT sources) change which tokens are trained, not which are served.
- **Counters.** `MixCounters` (a few integers per source) is the whole position: stream
  positions, units served, the shortfalls of the current segment. A loader state is these
  counters, so resume is exact on the same topology and on any other (the next batch is planned
  from the counters with the new batch size; nothing is lost or repeated in any source).
- **Epochs.** An epoch is ``total`` units (the mixture's, or until the first source would repeat
  past its ``max_repetitions``); its last partial batch is not made. The next epoch continues
  every source stream; phases restart.

Cost: a batch is planned in O(sources) integer operations (samples), or O(documents) (tokens).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from shardloader.errors import ConfigError, ResumeError
from shardloader.mix_config import Mixture
from shardloader.plan import IdArray, PlanConfig, WorkerPlan, plan_epoch
from shardloader.plan_spans import window_samples


class SourceSize(NamedTuple):
    """What the plan needs of one source's manifest."""

    shard_sizes: IdArray
    num_tokens: int


class PhaseWeights(NamedTuple):
    """Resolved weights from ``start`` (units into the epoch): numerators over ``denominator``."""

    start: int
    numerators: tuple[int, ...]
    denominator: int
    weights: tuple[float, ...]


@dataclass(frozen=True, eq=False)
class MixSpec:
    """A mixture planned against its sources: what every rank computes identically.

    Attributes:
        names: Source names.
        unit: ``"samples"`` or ``"tokens"``.
        sizes: Each source's shard sizes and tokens.
        total: Units per epoch (resolved).
        phases: The weights by epoch position, the mixture's first.
        config: Seed, shuffle and window of the source streams.
    """

    names: tuple[str, ...]
    unit: str
    sizes: tuple[SourceSize, ...]
    total: int
    phases: tuple[PhaseWeights, ...]
    config: PlanConfig
    runs_out: tuple[float, ...] = field(repr=False)  # units into an epoch; inf: never

    def phase_at(self, position: int) -> int:
        """Index of the phase that holds epoch position ``position``."""
        if len(self.phases) == 1:
            return 0
        index = 0
        for i, phase in enumerate(self.phases):
            if phase.start <= position:
                index = i
        return index

    def source_units(self, i: int) -> int:
        """Units in one pass over source ``i``."""
        size = self.sizes[i]
        return int(size.shard_sizes.sum()) if self.unit == "samples" else size.num_tokens


def plan_mixture(mixture: Mixture, sizes: Sequence[SourceSize], config: PlanConfig) -> MixSpec:
    """Resolve a mixture's phases and length and check that it is feasible.

    Raises:
        ConfigError: A source is empty, has no tokens in token mode, or runs out before
            ``total`` (the message names it, when, and how many passes the mix needs).
    """
    names = tuple(mixture.names)
    phases = []
    for start, weights in mixture.phase_table():
        den = math.lcm(*(w.denominator for w in weights))
        nums = tuple(int(w * den) for w in weights)
        phases.append(PhaseWeights(start, nums, den, tuple(float(w) for w in weights)))
    units = []
    for name, size in zip(names, sizes, strict=True):
        samples = int(size.shard_sizes.sum())
        if samples == 0:
            raise ConfigError(f"mixture source {name!r} holds no samples")
        if mixture.unit == "tokens" and size.num_tokens <= 0:
            raise ConfigError(
                f"mixture source {name!r} has no token counts: unit='tokens' needs tokenized "
                "shards (shardloader convert --tokenizer ...)"
            )
        units.append(samples if mixture.unit == "samples" else size.num_tokens)
    runs_out = []
    for i, source in enumerate(mixture.sources):
        reps = source.max_repetitions
        if reps is None and mixture.total is not None:
            runs_out.append(math.inf)
            continue
        runs_out.append(_exhausted_at(phases, i, units[i] * (reps or 1)))
    total = mixture.total
    if total is None:
        first = min(runs_out)
        total = int(first)
        if total <= 0:
            raise ConfigError("the mixture's sources are too small for one batch")
    else:
        for i, at in enumerate(runs_out):
            if at < total:
                source = mixture.sources[i]
                need = _consumed(phases, i, total)
                raise ConfigError(
                    f"mixture source {source.label!r} runs out {int(at):,} {mixture.unit} into "
                    f"the run of total={total:,}: the mix needs {need:,.0f} {mixture.unit} of "
                    f"it, {need / units[i]:.2f} passes over its {units[i]:,}, but "
                    f"max_repetitions is {source.max_repetitions}; lower its weight, raise "
                    "max_repetitions, or shorten total"
                )
    return MixSpec(
        names=names,
        unit=mixture.unit,
        sizes=tuple(sizes),
        total=total,
        phases=tuple(phases),
        config=config,
        runs_out=tuple(runs_out),
    )


def _consumed(phases: Sequence[PhaseWeights], i: int, position: float) -> float:
    """Units of source ``i`` the target mix has used by epoch position ``position``."""
    used = 0.0
    for k, phase in enumerate(phases):
        end = phases[k + 1].start if k + 1 < len(phases) else math.inf
        if position <= phase.start:
            break
        used += phase.weights[i] * (min(position, end) - phase.start)
    return used


def _exhausted_at(phases: Sequence[PhaseWeights], i: int, capacity: float) -> float:
    """The epoch position at which source ``i`` has given ``capacity`` units (inf: never)."""
    used = 0.0
    for k, phase in enumerate(phases):
        end = phases[k + 1].start if k + 1 < len(phases) else math.inf
        rate = phase.weights[i]
        if rate and used + rate * (end - phase.start) >= capacity:
            return phase.start + (capacity - used) / rate
        if end == math.inf:
            break
        used += rate * (end - phase.start)
    return math.inf


def mix_report(spec: MixSpec) -> list[dict[str, Any]]:
    """Per source: size, weights, units and passes per epoch, when it would run out."""
    rows = []
    for i, name in enumerate(spec.names):
        size = spec.sizes[i]
        units = spec.source_units(i)
        need = _consumed(spec.phases, i, spec.total)
        samples = int(size.shard_sizes.sum())
        per_doc = size.num_tokens / samples if samples else 0.0
        rows.append(
            {
                "source": name,
                "weights": [p.weights[i] for p in spec.phases],
                "samples": samples,
                "tokens": size.num_tokens,
                "units_per_epoch": need,
                "samples_per_epoch": need if spec.unit == "samples" else need / (per_doc or 1),
                "passes_per_epoch": need / units,
                "runs_out_at": None if math.isinf(spec.runs_out[i]) else spec.runs_out[i],
            }
        )
    return rows


@dataclass
class MixCounters:
    """The position in a mixture: plain integers, the loader state's core.

    Attributes:
        epoch: The epoch being read.
        epoch_units: Units served in it (whole batches).
        step: Global batches served since the run began.
        taken: Per source: stream position of its next sample (samples started).
        served: Per source: units served since the run began.
        target: Per source: units the weights asked for since the run began.
        segment: ``(start, phase, batch)``: where the current segment began (epoch position),
            its phase, and (samples) its batch size; shortfalls are counted per segment.
        used: Per source, in the segment: extra samples given (samples) or tokens committed
            (tokens).
        current: Tokens: ``(source, offset)`` of the document in progress (its stream
            position is ``taken[source] - 1``), or ``None``.
    """

    epoch: int
    epoch_units: int
    step: int
    taken: list[int]
    served: list[int]
    target: list[float]
    segment: tuple[int, int, int]
    used: list[int]
    current: tuple[int, int] | None = None

    @classmethod
    def fresh(cls, num_sources: int) -> MixCounters:
        """The start of a run."""
        zeros = [0] * num_sources
        return cls(0, 0, 0, zeros, list(zeros), [0.0] * num_sources, (0, -1, 0), list(zeros))

    def copy(self) -> MixCounters:
        """An independent copy."""
        return MixCounters(
            self.epoch,
            self.epoch_units,
            self.step,
            list(self.taken),
            list(self.served),
            list(self.target),
            self.segment,
            list(self.used),
            self.current,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "epoch": self.epoch,
            "epoch_units": self.epoch_units,
            "step": self.step,
            "taken": list(self.taken),
            "served": list(self.served),
            "target": list(self.target),
            "segment": list(self.segment),
            "used": list(self.used),
            "current": None if self.current is None else list(self.current),
        }

    @classmethod
    def from_dict(cls, data: Any, num_sources: int) -> MixCounters:
        """Read `to_dict` output, checking every count.

        Raises:
            ResumeError: A field is missing, of the wrong type or out of range.
        """
        try:
            lists = {}
            for name in ("taken", "served", "used"):
                values = data[name]
                if len(values) != num_sources or not all(_is_count(v) for v in values):
                    raise ResumeError(f"{name} must hold {num_sources} counts >= 0")
                lists[name] = [int(v) for v in values]
            target = [float(v) for v in data["target"]]
            if len(target) != num_sources or not all(math.isfinite(v) for v in target):
                raise ResumeError(f"target must hold {num_sources} numbers")
            segment = tuple(int(v) for v in data["segment"])
            current = data["current"]
            if current is not None:
                current = (int(current[0]), int(current[1]))
                if not (0 <= current[0] < num_sources and current[1] >= 0):
                    raise ResumeError(f"current {current} is out of range")
                if lists["taken"][current[0]] < 1:
                    raise ResumeError("current names a source with nothing taken")
            scalars = [data[name] for name in ("epoch", "epoch_units", "step")]
            if not all(_is_count(v) for v in scalars) or len(segment) != 3:
                raise ResumeError("epoch, epoch_units and step must be counts >= 0")
        except ResumeError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ResumeError(f"malformed mixture counters ({type(exc).__name__}: {exc})") from None
        return cls(
            int(scalars[0]),
            int(scalars[1]),
            int(scalars[2]),
            lists["taken"],
            lists["served"],
            target,
            (segment[0], segment[1], segment[2]),
            lists["used"],
            current,
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def epoch_done(spec: MixSpec, counters: MixCounters, batch_units: int) -> bool:
    """Whether the epoch has no room for another whole batch of ``batch_units``."""
    return counters.epoch_units + batch_units > spec.total


def next_epoch(counters: MixCounters) -> None:
    """Move ``counters`` to the start of the next epoch (source streams continue)."""
    counters.epoch += 1
    counters.epoch_units = 0
    counters.segment = (0, -1, 0)
    counters.used[:] = [0] * len(counters.used)


def sample_batch(spec: MixSpec, counters: MixCounters, batch: int) -> list[int]:
    """Plan the next global batch of ``batch`` samples: samples per source; advances ``counters``.

    Each count is ``floor(w_i * batch)`` or that plus one.
    """
    position = counters.epoch_units
    phase_index = spec.phase_at(position)
    start, phase_of_segment, segment_batch = counters.segment
    if phase_of_segment != phase_index or segment_batch != batch:
        counters.segment = (position, phase_index, batch)
        counters.used[:] = [0] * len(counters.used)
        start = position
    phase = spec.phases[phase_index]
    den = phase.denominator
    done = (position - start) // batch  # batches made in this segment
    base = [n * batch // den for n in phase.numerators]
    rest = [n * batch % den for n in phase.numerators]
    extra = sum(rest) // den
    shortfall = [
        (r * (done + 1) - u * den, -i)
        for i, (r, u) in enumerate(zip(rest, counters.used, strict=True))
        if r
    ]
    counts = list(base)
    for _, minus_i in sorted(shortfall, reverse=True)[:extra]:
        counts[-minus_i] += 1
        counters.used[-minus_i] += 1
    for i, count in enumerate(counts):
        counters.taken[i] += count
        counters.served[i] += count
        counters.target[i] += phase.weights[i] * batch
    counters.epoch_units += batch
    counters.step += 1
    return counts


@functools.lru_cache(maxsize=256)
def batch_layout(counts: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The places of a global batch, interleaved: each place's source and its index in that source.

    Source ``i``'s ``j``-th place sits at ``(2j + 1) / (2 c_i)`` (ties: lower source first). The
    float keys are correctly rounded quotients, so equal fractions tie on every machine and
    unequal ones (at least ``1 / (4 B^2)`` apart) never do. A batch's counts repeat from batch to
    batch, so layouts are cached.
    """
    sources = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    index = np.concatenate([np.arange(c, dtype=np.int64) for c in counts]) if counts else sources
    sizes = np.repeat(np.asarray(counts, dtype=np.int64), counts)
    order = np.lexsort((sources, (2 * index + 1) / (2 * sizes)))
    sources, index = sources[order], index[order]
    sources.setflags(write=False)
    index.setflags(write=False)
    return sources, index


class Piece(NamedTuple):
    """A run of tokens of one document in the token stream."""

    source: int
    position: int  # stream position of the document in its source
    start: int  # first token of the run, in the document
    stop: int


def token_batch(
    spec: MixSpec,
    counters: MixCounters,
    batch_tokens: int,
    length: Callable[[int, int], int],
) -> list[Piece]:
    """Plan the next global batch of exactly ``batch_tokens`` tokens; advances ``counters``.

    Args:
        spec: The planned mixture (unit ``"tokens"``).
        counters: The position; the document in progress is continued first.
        batch_tokens: Tokens in a global batch.
        length: ``length(source, stream_position)``: that document's token count.

    Returns:
        The batch's document pieces in stream order; their lengths sum to ``batch_tokens``.
    """
    pieces: list[Piece] = []
    filled = 0
    taken, served, used = counters.taken, counters.served, counters.used
    one_phase = len(spec.phases) == 1
    nums, den = spec.phases[0].numerators, spec.phases[0].denominator
    while filled < batch_tokens:
        if counters.current is None:
            position = counters.epoch_units + filled
            if one_phase and counters.segment[1] == 0:  # the common case, without phase lookups
                i = _most_lagging(nums, den, used, position - counters.segment[0])
            else:
                i = _pick_source(spec, counters, position)
            k = taken[i]
            taken[i] = k + 1
            size = length(i, k)
            used[i] += size
            offset = 0
        else:
            i, offset = counters.current
            k = taken[i] - 1
            size = length(i, k)
        take = min(size - offset, batch_tokens - filled)
        if take > 0:
            pieces.append(Piece(i, k, offset, offset + take))
            served[i] += take
            filled += take
        counters.current = None if offset + take >= size else (i, offset + take)
    phase = spec.phases[spec.phase_at(counters.epoch_units)]
    for i in range(len(counters.target)):
        counters.target[i] += phase.weights[i] * batch_tokens
    counters.epoch_units += batch_tokens
    counters.step += 1
    return pieces


def _pick_source(spec: MixSpec, counters: MixCounters, position: int) -> int:
    """The source whose committed tokens lag its target most (ties: the first)."""
    phase_index = spec.phase_at(position)
    if counters.segment[1] != phase_index:
        counters.segment = (position, phase_index, 0)
        counters.used[:] = [0] * len(counters.used)
    phase = spec.phases[phase_index]
    since = position - counters.segment[0]
    return _most_lagging(phase.numerators, phase.denominator, counters.used, since)


def _most_lagging(nums: Sequence[int], den: int, used: Sequence[int], since: int) -> int:
    """Of the sources with weight, the one whose ``used`` lags ``num / den x since`` most."""
    best, best_lag = -1, 0
    for i, num in enumerate(nums):
        if num:
            lag = num * since - used[i] * den
            if best < 0 or lag > best_lag:
                best, best_lag = i, lag
    return best


class SourceOrder:
    """Maps a source's stream positions to its sample ids (module docstring), lazily.

    Args:
        shard_sizes: The source's shard sizes.
        config: Shuffle settings; ``seed`` is the mixture's.
        index: The source's index in the mixture (seeds its own order).
    """

    def __init__(self, shard_sizes: IdArray, config: PlanConfig, index: int) -> None:
        self._sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.num_samples = int(self._sizes.sum())
        seed = int(np.random.SeedSequence([config.seed, index]).generate_state(1)[0])
        self._config = PlanConfig(
            seed=seed, shuffle=config.shuffle, shuffle_window=config.shuffle_window
        )
        self._pass = -1
        self._plan: WorkerPlan | None = None
        self._window_starts = np.zeros(1, np.int64)
        self._window = -1
        self._window_ids = np.zeros(0, np.int64)
        self._window_base = 0

    def ids(self, start: int, count: int) -> IdArray:
        """Sample ids of stream positions ``[start, start + count)``."""
        parts = []
        while count > 0:
            ids = self._window_at(start)
            offset = start - self._window_base
            piece = ids[offset : offset + count]
            parts.append(piece)
            start += len(piece)
            count -= len(piece)
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def shards_ahead(self, position: int) -> list[int]:
        """The shards of the window after the one holding ``position`` (to prefetch)."""
        self._window_at(position)
        assert self._plan is not None
        nxt = self._window + 1
        if nxt < len(self._plan.windows):
            return [s.shard_index for s in self._plan.windows[nxt].spans]
        return []

    def _window_at(self, position: int) -> IdArray:
        p, j = divmod(position, self.num_samples)
        if p != self._pass:
            self._plan = plan_epoch(
                self._sizes,
                config=self._config,
                epoch=p,
                world_size=1,
                rank=0,
                num_workers=0,
            ).workers[0]
            sizes = [w.num_samples for w in self._plan.windows]
            self._window_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self._pass, self._window = p, -1
        w = int(np.searchsorted(self._window_starts, j, side="right")) - 1
        if w != self._window:
            assert self._plan is not None
            made = window_samples(self._plan.windows[w], self._plan.shard_first_ids)
            self._window, self._window_ids = w, made.sample_ids
        self._window_base = p * self.num_samples + int(self._window_starts[w])
        return self._window_ids
