"""The quality metrics of an order, and the shard-size corpora they are measured on.

Metrics: the fraction of consecutive samples from the same shard, Spearman's |rho| between
position and (rank-transformed) sample id, the mean number of distinct shards per window of
``WINDOW`` samples, Mosaic Streaming's gap entropy (`mosaic_entropy`), and a digest to compare
orders across machines.
"""

from __future__ import annotations

import hashlib

import numpy as np

from tools.bench.shuffle.orders import IdArray

WINDOW = 1000  # samples per window of the mixing metric


def shard_of(ids: IdArray, first: IdArray) -> IdArray:
    """The shard index of every sample id."""
    return np.searchsorted(first, ids, side="right") - 1


def same_shard_fraction(shards: IdArray) -> float:
    """Fraction of consecutive pairs whose samples come from the same shard."""
    if len(shards) < 2:
        return 0.0
    return float(np.mean(shards[1:] == shards[:-1]))


def spearman_abs(ids: IdArray) -> float:
    """|Spearman rho| between position and sample id (ids rank-transformed, no ties assumed)."""
    n = len(ids)
    if n < 2:
        return 0.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[np.argsort(ids, kind="stable")] = np.arange(n, dtype=np.float64)
    positions = np.arange(n, dtype=np.float64)
    return abs(float(np.corrcoef(positions, ranks)[0, 1]))


def mean_distinct_shards(shards: IdArray, window: int = WINDOW) -> float:
    """Mean number of distinct shards in consecutive, non-overlapping windows of samples."""
    num_windows = len(shards) // window
    if num_windows == 0:
        return float("nan")
    blocks = np.sort(shards[: num_windows * window].reshape(num_windows, window), axis=1)
    return float(np.mean((np.diff(blocks, axis=1) != 0).sum(axis=1) + 1))


def gap_entropy(ordering: IdArray) -> float:
    """Shannon entropy, in bits, of the absolute gaps between consecutive values.

    As ``get_entropy`` in Mosaic Streaming's ``simulation/core/shuffle_quality.py``: the ``n - 1``
    values ``|ordering[i+1] - ordering[i]|`` are counted (``np.bincount``) and the entropy of their
    empirical distribution is ``-sum(p * log2(p))``. No normalization: an order of ``n`` values
    scores at most ``log2(n - 1)`` (every gap different); a sorted run of consecutive ids scores 0.
    """
    n = len(ordering)
    if n < 2:
        return 0.0
    freqs = np.bincount(np.abs(np.diff(ordering)))
    probs = freqs[freqs != 0] / (n - 1)
    return max(0.0, float(-np.sum(probs * np.log2(probs))))  # one gap value: -0.0, shown as 0


def mosaic_entropy(ids: IdArray, shards: IdArray) -> float:
    """Mosaic Streaming's shuffle quality: harmonic mean of sample-gap and shard-gap entropies.

    As ``get_entropy_shuffle_quality`` in ``streaming/simulation/core/shuffle_quality.py`` (0.13):
    ``2 * s * h / (s + h)`` with ``s = gap_entropy(sample ids)`` and ``h = gap_entropy(shard
    index of each sample)``, in bits, not normalized. Mosaic applies it to the global order of one
    epoch (every rank's samples, padding removed); here it is applied to the order measured (rank
    0's loop order or one worker's), with global sample ids as they are, so a value compares
    across systems only at the same corpus and world size (similar ``n``: the uniform permutation
    row is the ceiling there). Two ids from the same shard give a shard gap of 0.

    Args:
        ids: Sample ids in reading order.
        shards: The shard of each id.

    Returns:
        The harmonic mean in bits (0 when both entropies are 0).
    """
    sample = gap_entropy(ids)
    shard = gap_entropy(shards)
    if sample + shard == 0:
        return 0.0
    return 2 * sample * shard / (sample + shard)


def quality(ids: IdArray, first: IdArray) -> dict[str, float | int]:
    """The quality metrics of one order.

    Args:
        ids: Sample ids in reading order.
        first: First sample id of every shard, plus the total.

    Returns:
        ``samples``, ``same_shard``, ``spearman_abs``, ``distinct_shards_per_1000`` and
        ``mosaic_entropy_bits``.
    """
    shards = shard_of(ids, first)
    return {
        "samples": len(ids),
        "same_shard": same_shard_fraction(shards),
        "spearman_abs": spearman_abs(ids),
        "distinct_shards_per_1000": mean_distinct_shards(shards),
        "mosaic_entropy_bits": mosaic_entropy(ids, shards),
    }


def digest(ids: IdArray) -> str:
    """First 16 hex digits of the sha256 of the ids (int64, little-endian): compare machines."""
    return hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()[:16]


def uniform_sizes(num_shards: int, samples_per_shard: int) -> IdArray:
    """``num_shards`` shards of ``samples_per_shard`` samples each."""
    return np.full(num_shards, samples_per_shard, dtype=np.int64)


def long_tailed_sizes(num_shards: int, median: int, sigma: float = 1.5, seed: int = 0) -> IdArray:
    """Log-normal shard sizes (at least 1): most shards small, a few very large ones.

    Args:
        num_shards: Number of shards.
        median: Median shard size.
        sigma: Log-space standard deviation (1.5: the largest of 1,000 is ~100x the median).
        seed: Seed of the sizes.

    Returns:
        The sizes.
    """
    rng = np.random.default_rng(seed)
    return np.maximum(1, rng.lognormal(np.log(median), sigma, num_shards)).astype(np.int64)


def describe(sizes: IdArray) -> dict[str, int]:
    """Shard count, sample count and the spread of shard sizes."""
    return {
        "shards": len(sizes),
        "samples": int(sizes.sum()),
        "min": int(sizes.min()),
        "median": int(np.median(sizes)),
        "max": int(sizes.max()),
    }
