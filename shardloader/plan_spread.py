"""The spread order of an epoch's blocks, computed per shard (used by `shardloader.plan_sequence`).

Over blocks (``unit_groups``), an epoch puts the ``m`` blocks of a shard one in each ``1/m`` of
the epoch: block ``i`` of the shard takes slot ``j = (i + c) mod m`` (``c``, a random turn per
shard, so no epoch reads every shard from its start) and the sort key (its time in the epoch)

    t(s, j) = (j + v(s, j)) / m,    v in [0, 1)

The epoch's sequence is every block sorted by ``(t, block index)``. ``v`` is stratified over
runs of ``2**CELL_BITS`` (64) shards adjacent in manifest order (order 3): for slot ``j`` the
shards of one run take the run's 64 cells ``[k/64, (k+1)/64)`` of ``[0, 1)`` in a keyed
permutation of their offsets in the run (made anew for every run, slot and epoch), and a
uniform place inside their cell. So any stretch of the epoch holds about the same share of
every run of neighbouring shards, not a random one: the blocks that share a window are a
stratified sample of the manifest, and a rank's order does not lean towards the corpus's start
or end (Spearman's abs(rho) of a 1,000-shard corpus over 8 ranks was 0.014 on average and up to
0.032 with independent ``v``, and is about 0.003 and at most 0.008 so; a sorted corpus is
spread the same way). A shard of one block keeps its whole-shard draw ``r`` (below) as ``v``, so
shards of one block each come in whole shards' order.

Per shard one PCG64 output ``r`` is drawn, seeded by ``(seed, epoch)`` as whole shards are
(O(shards)), plus one word for the epoch; the turn ``c``, the place inside a cell and the
permutation's keys are counter-based hashes (splitmix64's finalizer) of states made from those
and the slot, so any block's key is computed alone, with no draw per block. Integer arithmetic,
an exact conversion of a 53-bit integer and a correctly rounded add and division give the same
keys on every machine, and keys rise with the slot.

So nothing here is O(blocks):

- How many of a shard's slots come before a time ``T`` is ``floor(T * m)``, give or take the
  slot at ``T`` (its key is checked; near an integer ``T * m`` the slots either side too).
- How many samples come before ``T`` (`SpreadOrder.samples_before`) is a sum over shards of
  the samples of their first slots: a rotated run of the shard's blocks, two look-ups each in
  the running sum of block sizes (``first``, made once per dataset by `PlanUnits`).
- The blocks at positions ``[start, stop)`` of the sequence (`SpreadOrder.segment`): a time
  ``T0`` at or before ``start`` and a time ``T1`` at or after ``stop`` are found from a guess
  (``start / total``) widened until they bound the range (one or two sums over shards each), and
  only the blocks with keys in ``[T0, T1)`` are made and sorted: about
  ``(stop - start) / total`` of all blocks, plus a margin of about ``8 * sqrt(shards)`` blocks.

Measured (``python -m tools.bench.plan --blocks``: 100,000 shards of 1 to 20,000 samples in
51-sample blocks, 19.6 M blocks, 1,000 ranks x 8 workers, on a shared 2-core machine): see
`shardloader.plan`'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shardloader.errors import ConfigError
from shardloader.plan_config import is_int_array
from shardloader.plan_spans import IdArray, generator

# splitmix64's constants: the golden-ratio increment and the finalizer's multipliers.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TO_UNIT = 1.0 / (1 << 53)
# v is stratified over runs of 2**CELL_BITS shards; the keyed permutation of a run's cells takes
# _ROUNDS rounds of (multiply by an odd key, xor-shift, add a key), each a bijection mod 2**bits.
CELL_BITS = 6
_CELLS = np.uint64((1 << CELL_BITS) - 1)
_ROUNDS = 4
_SLOT_SALT = np.uint64(0x6A09E667F3BCC909)  # sqrt(2)'s fraction: keeps slot 0's word nonzero
_NEAR = 1e-6  # T * m this close to an integer: check the slots either side of it too


def mix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finalizer, element-wise (uint64 arithmetic wraps, the same everywhere)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def _cell(
    shard: npt.NDArray[np.uint64], slot: npt.NDArray[np.uint64], epoch_word: np.uint64
) -> npt.NDArray[np.uint64]:
    """The cell of each shard's slot: its offset in its run, through the run's keyed permutation."""
    run = shard >> np.uint64(CELL_BITS)
    key = mix64((run * _GOLDEN) ^ mix64(slot * _GOLDEN + _SLOT_SALT) ^ epoch_word)
    x = shard & _CELLS
    half = np.uint64((CELL_BITS + 1) // 2)
    for r in range(_ROUNDS):
        k = key >> np.uint64(16 * r)
        x = (x * (k | np.uint64(1))) & _CELLS
        x ^= x >> half
        x = (x + (k >> np.uint64(8))) & _CELLS
    return x


@dataclass(frozen=True, eq=False)
class PlanUnits:
    """A dataset's units, checked and summed once, for every plan made over them.

    Made by `prepare_units`; pass it to `shardloader.plan.plan_epoch` as ``shard_sizes`` so
    that a plan over millions of blocks costs O(shards), not O(blocks). Arrays are read-only.

    Attributes:
        sizes: Samples per unit (shard, or block), in manifest order.
        first: Global id of every unit's first sample, plus the total at the end.
        unit_bytes: Decoded bytes per unit, or ``None``.
        groups: With blocks: each block's shard; else ``None``.
        group_starts: With blocks: each shard's first block.
        group_counts: With blocks: each shard's number of blocks (all > 0).
        group_samples: With blocks: each shard's number of samples.
    """

    sizes: IdArray
    first: IdArray
    unit_bytes: IdArray | None = None
    groups: IdArray | None = None
    group_starts: IdArray | None = None
    group_counts: IdArray | None = None
    group_samples: IdArray | None = None


def prepare_units(
    sizes: Sequence[int] | npt.NDArray[np.integer],
    *,
    unit_bytes: Sequence[int] | npt.NDArray[np.integer] | None = None,
    unit_groups: Sequence[int] | npt.NDArray[np.integer] | None = None,
) -> PlanUnits:
    """Check a dataset's units once (the arguments of `shardloader.plan.plan_epoch`).

    Args:
        sizes: Samples per unit, in manifest order (zeros allowed).
        unit_bytes: Decoded bytes per unit (see `shardloader.plan.plan_epoch`).
        unit_groups: When the units are blocks, each block's shard.

    Integer arrays of dtype int64 are kept as read-only views, not copied: do not change them
    afterwards.

    Raises:
        ConfigError: An argument is invalid.
    """
    checked, first = _check_sizes(sizes)
    nbytes = None if unit_bytes is None else _check_unit_bytes(unit_bytes, len(checked))
    groups = starts = counts = samples = None
    if unit_groups is not None:
        groups, starts = _check_groups(unit_groups, len(checked))
        counts = np.diff(np.append(starts, len(groups)))
        samples = first[starts + counts] - first[starts]
    for array in (checked, first, nbytes, groups, starts, counts, samples):
        if array is not None:
            array.setflags(write=False)
    return PlanUnits(checked, first, nbytes, groups, starts, counts, samples)


class SpreadOrder:
    """One epoch's spread order over blocks, queried by time and by position.

    Args:
        units: The blocks, with their shards (``units.groups`` set).
        key: The epoch's entropy (decision, seed, epoch), as for the other generators.
    """

    def __init__(self, units: PlanUnits, key: tuple[int, ...]) -> None:
        assert units.group_starts is not None
        assert units.group_counts is not None
        assert units.group_samples is not None
        self._first = units.first
        self._starts = units.group_starts
        self._counts = units.group_counts
        self._scale = self._counts.astype(np.float64)
        self.total = int(units.first[-1])
        num_shards = len(self._counts)
        # One PCG64 output per shard (what whole shards are ordered by): the jitter of shards of
        # one block, so they come in the order of whole shards; the shard's turn and the place
        # of its blocks in their cells hash a state made from it. One more output keys the
        # permutations of cells.
        draws = generator(key).random_raw(num_shards + 1)
        self._raw = draws[:num_shards]
        self._state = mix64(self._raw)
        self._epoch_word = draws[num_shards]
        self._single = self._counts == 1
        self._shard_samples = units.group_samples
        self._all_heads: IdArray | None = None  # made when most shards need theirs
        # Margin around a guessed time: a shard's share before T is off by at most one block,
        # so the sum over shards strays by about sqrt(shards) blocks.
        self._margin = 8.0 * math.sqrt(max(num_shards, 1)) / max(len(units.sizes), 1)

    def keys(self, shard: IdArray, slot: IdArray) -> npt.NDArray[np.float64]:
        """Times in the epoch of slots ``slot`` of shards ``shard``."""
        slot_word = slot.astype(np.uint64)
        word = mix64(self._state[shard] + slot_word * _GOLDEN)
        cell = _cell(shard.astype(np.uint64), slot_word, self._epoch_word)
        bits = (cell << np.uint64(53 - CELL_BITS)) | (word >> np.uint64(11 + CELL_BITS))
        single = self._single[shard]
        bits[single] = self._raw[shard[single]] >> np.uint64(11)
        jitter = bits.astype(np.float64) * _TO_UNIT
        return (slot + jitter) / self._scale[shard]

    def slots_before(self, time: float) -> IdArray:
        """How many slots of each shard have a key below ``time``."""
        counts = self._counts
        if time <= 0.0:
            return np.zeros(len(counts), dtype=np.int64)
        if time > 1.0:
            return counts.copy()
        x = time * self._scale
        j = np.floor(x).astype(np.int64)
        frac = x - j
        # Slots below j - 1 come before, slots above j + 1 after; j + 1 (and j - 1) can only
        # differ from that where x is within rounding of an integer.
        out = np.minimum(j, counts)
        rows = np.flatnonzero(j < counts)
        out[rows] += self.keys(rows, j[rows]) < time
        near = np.flatnonzero((frac < _NEAR) | (frac > 1.0 - _NEAR))
        if len(near):
            jn, mn = j[near], counts[near]
            exact = np.clip(jn - 1, 0, mn)
            for d in (-1, 0, 1):
                slot = jn + d
                ok = (slot >= 0) & (slot < mn)
                exact[ok] += self.keys(near[ok], slot[ok]) < time
            out[near] = exact
        return out

    def samples_before(self, slots: IdArray) -> int:
        """Samples in the first ``slots[s]`` slots of every shard ``s``.

        Slot 0 holds the shard's block ``head`` (its turn), so the first ``n`` slots are the
        blocks ``head .. head + n - 1``, wrapping round: two look-ups in ``first``. Shards with
        all or none of their slots counted need neither (near the epoch's ends, most of them).
        """
        counts = self._counts
        whole = int(self._shard_samples[slots >= counts].sum())
        rows = np.flatnonzero((slots > 0) & (slots < counts))
        head = self._heads(rows)
        m, start = counts[rows], self._starts[rows]
        end = head + slots[rows]
        wraps = end > m
        end -= np.where(wraps, m, 0)
        inside = self._first[start + end] - self._first[start + head]
        return whole + int(inside.sum()) + int(self._shard_samples[rows][wraps].sum())

    def _heads(self, rows: IdArray) -> IdArray:
        """The block in slot 0 of shards ``rows``: ``(-turn) mod m``, the turn a hash."""
        if self._all_heads is None and 4 * len(rows) > len(self._counts):
            self._all_heads = self._heads_of(np.arange(len(self._counts)))
        if self._all_heads is not None:
            return self._all_heads[rows]
        return self._heads_of(rows)

    def _heads_of(self, rows: IdArray) -> IdArray:
        m = self._counts[rows]
        turn = (mix64(self._state[rows]) % m.astype(np.uint64)).astype(np.int64)
        return (m - turn) % m

    def bound(self, position: int, *, upper: bool) -> tuple[IdArray, int]:
        """Slots per shard before a time at or before (``upper``: at or after) ``position``.

        Returns:
            The slots, and the samples in them (``<= position``, or ``>= position``).
        """
        total = self.total
        if position <= 0 and not upper:
            return np.zeros(len(self._counts), dtype=np.int64), 0
        if position >= total and upper:
            return self._counts.copy(), total
        margin = self._margin
        while True:
            time = position / total + (margin if upper else -margin)
            slots = self.slots_before(time)
            samples = self.samples_before(slots)
            if (samples >= position) if upper else (samples <= position):
                return slots, samples
            margin *= 4

    def segment(self, start: int, stop: int) -> tuple[IdArray, int]:
        """Blocks covering positions ``[start, stop)``, in order, and the first one's position."""
        lo, pos = self.bound(start, upper=False)
        hi, _ = self.bound(stop, upper=True)
        take = hi - lo
        rows = np.flatnonzero(take)
        take = take[rows]
        shard = np.repeat(rows, take)
        begin = np.cumsum(take) - take
        slot = lo[shard] + (np.arange(len(shard), dtype=np.int64) - np.repeat(begin, take))
        keys = self.keys(shard, slot)
        unit = self._starts[shard] + (self._heads(shard) + slot) % self._counts[shard]
        order = np.lexsort((unit, keys))
        return unit[order].astype(np.int64), pos


def _check_sizes(shard_sizes: Sequence[int] | npt.NDArray[np.integer]) -> tuple[IdArray, IdArray]:
    sizes = np.asarray(shard_sizes)
    if sizes.ndim != 1 or not is_int_array(sizes):
        raise ConfigError(
            f"shard_sizes has shape {sizes.shape} and dtype {sizes.dtype}; "
            "expected a 1-D sequence of integer sample counts"
        )
    negative = np.flatnonzero(sizes < 0)
    if len(negative):
        i = int(negative[0])
        raise ConfigError(f"shard_sizes[{i}] is {sizes[i]}; expected a sample count >= 0")
    sizes = _int64(sizes)
    first = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=first[1:])
    return sizes, first


def _check_groups(
    groups: Sequence[int] | npt.NDArray[np.integer], num_units: int
) -> tuple[IdArray, IdArray]:
    """The groups, and where each group starts (one pass of differences)."""
    values = np.asarray(groups)
    ok = values.shape == (num_units,) and is_int_array(values)
    starts = np.zeros(min(num_units, 1), dtype=np.int64)
    if ok and num_units:
        steps = np.diff(values).astype(np.int64, copy=False)
        ok = values[0] == 0 and bool((steps.view(np.uint64) <= 1).all())  # 0 or 1, not < 0
        starts = np.concatenate([starts, np.flatnonzero(steps) + 1]).astype(np.int64)
    if not ok:
        raise ConfigError(
            f"unit_groups has shape {values.shape} and dtype {values.dtype}; expected the shard "
            f"of each of the {num_units} units, from 0, non-decreasing by steps of 0 or 1"
        )
    return _int64(values), starts


def _check_unit_bytes(
    unit_bytes: Sequence[int] | npt.NDArray[np.integer], num_units: int
) -> IdArray:
    values = np.asarray(unit_bytes)
    if values.shape != (num_units,) or not is_int_array(values) or (values < 0).any():
        raise ConfigError(
            f"unit_bytes has shape {values.shape} and dtype {values.dtype}; expected one "
            f"integer >= 0 per shard ({num_units})"
        )
    return _int64(values)


def _int64(values: np.ndarray) -> IdArray:
    """``values`` as int64: a read-only view when they are already (no copy), else a copy."""
    if values.dtype == np.int64:
        view = values.view()
        view.setflags(write=False)
        return view
    return values.astype(np.int64)
