"""`MixDataset` and `MixLoader`: read a `shardloader.Mixture`, exact in every global batch.

The schedule is `shardloader.mix_plan`'s: one global stream, the same on every rank, planned
batch by batch from a few counters. Every process that iterates (a rank, or one of its
DataLoader workers) walks the whole schedule and reads only its own places: rank ``r`` takes
its slice of every global batch, and DataLoader worker ``w`` of ``K`` the steps ``w, w + K,
...`` (the DataLoader hands batches to the loop in that order). Each item is one training step
of this rank, already collated, with the counters after it; `MixLoader` keeps the counters of
the last step it handed to the loop, and those are the state: the same on every rank, so
``state_dict`` needs no gather and resumes on any world size or worker count.

Token mixes cut the global token stream into rows like ``PackConfig(mode="concat")``: a document
that crosses a row (or batch) end continues at the start of the next one, so ``long_docs``
(truncate or drop, ``bfd`` and ``pad`` only) does not apply, and the plan, which counts each
document's stored token length (the offsets of an Arrow shard), is exact: every stored token is
served. Loss masks travel with their tokens: a source whose documents carry one (SFT
conversations: the token encoder, `shardloader.pack_encode.encode_token_samples`, gives it) gets
labels only where its mask is set, and mask-free sources keep the all-tokens path (no mask is
built for a step without a masked document). A conversation cut at a row end continues without
its beginning in view, as text does; for whole conversations pack a single source with ``bfd``.

Cost of the global view: every process decodes the shards that the whole global stream passes
through (it reads its own samples only); on one node the shard cache is shared. For token mixes
every process also reads the token counts of every document (the offsets of an Arrow shard).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.utils.data
from torch.utils.data import default_collate

from shardloader import storage
from shardloader.errors import ConfigError, CorpusError, ResumeError
from shardloader.loader import (
    TRANSFER_BATCHES,
    _from_wire,
    _in_batch_order,
    _to_wire,
    _TransferSampler,
    _widen_result_pipe,
    _WireRows,
)
from shardloader.manifest import Manifest, iter_shard_urls, read_manifest
from shardloader.mix_config import Mixture
from shardloader.mix_plan import (
    MixCounters,
    MixSpec,
    Piece,
    SourceOrder,
    SourceSize,
    batch_layout,
    epoch_done,
    mix_report,
    next_epoch,
    plan_mixture,
    sample_batch,
    token_batch,
)
from shardloader.pack import PackConfig, PackedRow, collate_rows
from shardloader.pack_encode import EncodedDoc, encode_token_samples
from shardloader.reader import ShardReader
from shardloader.state import dataset_fingerprint
from shardloader.world import WorldInfo, WorldSource

log = logging.getLogger(__name__)

STATE_KIND = "shardloader.mix_state"
STATE_VERSION = 1
LENGTH_BLOCK = 4096  # token mode: document lengths read per source at a time
READ_AHEAD = 2048  # samples mixes: samples planned and read together (per source, one read)


class MixDataset(torch.utils.data.IterableDataset):
    """Streams a `Mixture`: one item per training step of this rank.

    Made by ``ShardDataset(mixture, ...)`` as well. Read it with `MixLoader` (or
    ``ShardLoader(dataset, batch_size=...)``, which makes one), which sets the batch size.

    Args:
        mixture: The sources, weights, unit, length and phases.
        config: `shardloader.StreamConfig`: seed, shuffle and window (of every source's
            stream), fetch and cache settings.
        transform: Applied to every sample (samples mixes).
        pack: Token mixes: rows of ``pack.seq_len`` (``mode`` must be ``"concat"``).
        tokenizer: Checked against the tokenized sources' fingerprint.
        rank: This rank (detected when iteration starts by default); pass with ``world_size``.
        world_size: Number of ranks.
        storage_options: Passed to fsspec for every source.
        batch_size: Per-rank batch: samples, or rows in a token mix (set by the loader).

    Items are ``(batch, counters)``: the collated step and the `MixCounters` after it. A
    sample is a dict with ``source`` (the source's name), ``sample_id`` (its id inside its
    source), ``id`` and its fields; a token step is a dict of tensors (`collate_rows`) with
    ``sample_sources`` (each piece's source index, aligned with ``sample_ids``).
    """

    def __init__(
        self,
        mixture: Mixture,
        *,
        config: Any = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        pack: PackConfig | None = None,
        tokenizer: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        from shardloader.dataset import StreamConfig

        if not isinstance(mixture, Mixture):
            raise ConfigError(f"mixture is a {type(mixture).__name__}; expected a Mixture")
        if config is not None and not isinstance(config, StreamConfig):
            raise ConfigError(f"config is a {type(config).__name__}; expected a StreamConfig")
        if mixture.unit == "tokens":
            if pack is None:
                raise ConfigError(
                    "a mixture with unit='tokens' yields packed rows: pass pack=PackConfig(...)"
                )
            if pack.mode != "concat":
                raise ConfigError(
                    f"a token mixture packs documents end to end (mode 'concat'), not "
                    f"{pack.mode!r}: a batch is exactly its tokens, cut into rows"
                )
        elif pack is not None:
            raise ConfigError(
                "pack needs unit='tokens' in a mixture (the mix is then counted in tokens)"
            )
        self.mixture = mixture
        self.config = config or StreamConfig()
        if self.config.shuffle_unit == "block":
            raise ConfigError(
                "StreamConfig.shuffle_unit is 'block'; a mixture plans whole shards only "
                "(blocks are not supported for mixtures yet): use shuffle_unit='shard' or 'auto'"
            )
        self.transform = transform
        self.pack = pack
        if isinstance(tokenizer, str):
            from shardloader.tokenizer import TextTokenizer

            tokenizer = TextTokenizer(tokenizer)
        self.tokenizer = tokenizer
        self._world_source = WorldSource(rank, world_size)
        self._storage_options = dict(storage_options or {})
        self.batch_size = batch_size
        self._manifests: list[Manifest] | None = None
        self._spec: MixSpec | None = None
        self._fingerprint: str | None = None
        self._start: MixCounters | None = None  # where the next iteration begins
        self._fetcher: Any = None
        # Seconds of this process per stage (see `stage_seconds`): ended readers', then live ones.
        self._stages = {"fetch_wait": 0.0, "decode": 0.0, "pack": 0.0, "collate": 0.0}
        self._readers: list[ShardReader] = []

    # --- configuration ------------------------------------------------------------------

    @property
    def sources(self) -> list[str]:
        """The sources' URLs, normalized."""
        return [storage.normalize(s.url) for s in self.mixture.sources]

    def manifests(self) -> list[Manifest]:
        """Every source's manifest, read on first use and checked against the others."""
        if self._manifests is None:
            manifests = [read_manifest(url, **self._storage_options) for url in self.sources]
            _check_compatible(self.mixture, self.sources, manifests, self.tokenizer)
            self._manifests = manifests
        return self._manifests

    def spec(self) -> MixSpec:
        """The mixture planned against the manifests (checked: refused if infeasible)."""
        if self._spec is None:
            sizes = [
                SourceSize(np.array(m.shards.column("num_samples"), dtype=np.int64), m.num_tokens)
                for m in self.manifests()
            ]
            self._spec = plan_mixture(self.mixture, sizes, self.config.shard_plan_config())
        return self._spec

    def report(self) -> list[dict[str, Any]]:
        """Per source: tokens, samples, passes per epoch, when it would run out."""
        return mix_report(self.spec())

    @property
    def fingerprint(self) -> str:
        """What a saved state must match: sources' contents, weights, unit, length, plan."""
        if self._fingerprint is None:
            spec = self.spec()
            mix = self.mixture.to_dict()
            for source in mix["sources"]:
                source.pop("url")  # data may move (local to S3); its content is fingerprinted
            payload = {
                "mixture": mix,
                "total": spec.total,
                "datasets": [dataset_fingerprint(m) for m in self.manifests()],
                "plan": {
                    "seed": spec.config.seed,
                    "shuffle": spec.config.shuffle,
                    "shuffle_window": spec.config.shuffle_window,
                },
                "pack": None if self.pack is None else self.pack.to_dict(),
            }
            digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
            self._fingerprint = digest
        return self._fingerprint

    def world(self) -> WorldInfo:
        """This process's rank and worker, as iteration would see them now."""
        return self._world_source.world()

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads."""
        return self.counters().epoch

    def counters(self) -> MixCounters:
        """Where the next iteration starts (a copy)."""
        if self._start is None:
            return MixCounters.fresh(len(self.mixture.sources))
        return self._start.copy()

    def set_counters(self, counters: MixCounters) -> None:
        """Start the next iteration at ``counters`` (the loader's position)."""
        self._start = counters.copy()

    def batch_units(self, world_size: int) -> int:
        """Units in one global batch: samples, or tokens (rows x seq_len) of all ranks."""
        if self.batch_size is None or self.batch_size < 1:
            raise ConfigError(
                "a MixDataset needs its per-rank batch size: read it with "
                "ShardLoader(dataset, batch_size=N), or pass batch_size=N"
            )
        if self.mixture.unit == "tokens":
            assert self.pack is not None
            return self.batch_size * self.pack.seq_len * world_size
        return self.batch_size * world_size

    # --- iteration ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        world = self.world()
        spec = self.spec()
        units = self.batch_units(world.world_size)
        counters = self.counters()
        if epoch_done(spec, counters, units):
            if counters.epoch_units == 0:
                raise ConfigError(
                    f"a global batch of {units:,} {spec.unit} does not fit the mixture's epoch "
                    f"of {spec.total:,}: lower the batch size or raise total"
                )
            next_epoch(counters)
        self._fetcher = self.config.make_fetcher(self._storage_options)
        readers = [
            ShardReader(
                m,
                [url for _, url in iter_shard_urls(src, m)],
                fetcher=self._fetcher,
                prefetch_windows=self.config.prefetch_windows,
            )
            for src, m in zip(self.sources, self.manifests(), strict=True)
        ]
        orders = [
            SourceOrder(size.shard_sizes, spec.config, i) for i, size in enumerate(spec.sizes)
        ]
        self._readers = readers
        steps = max(world.num_workers, 1)
        made = 0
        keep = max(2 * (spec.config.shuffle_window or 1), 4)
        lengths = (
            _Lengths(orders, readers, self.manifests(), keep) if spec.unit == "tokens" else None
        )
        epoch = counters.epoch
        pending: list[tuple[list[tuple[int, int, np.ndarray]], dict[str, Any]]] = []
        try:
            while not epoch_done(spec, counters, units) and counters.epoch == epoch:
                mine = made % steps == world.worker_id
                made += 1
                started = time.perf_counter()
                if lengths is None:
                    before = list(counters.taken)
                    counts = sample_batch(spec, counters, units)
                    self._stages["pack"] += time.perf_counter() - started
                    if mine:
                        pending.append((self._places(counts, before, world), counters.to_dict()))
                    last = epoch_done(spec, counters, units)
                    if pending and (len(pending) * (self.batch_size or 1) >= READ_AHEAD or last):
                        batches = self._samples([p for p, _ in pending], orders, readers, keep)
                        yield from zip(batches, [c for _, c in pending], strict=True)
                        pending = []
                else:
                    pieces = token_batch(spec, counters, units, lengths.length)
                    self._stages["pack"] += time.perf_counter() - started
                    if mine:
                        rows = self._rows(pieces, world, orders, readers, keep)
                        yield rows, counters.to_dict()
        finally:
            for reader in readers:
                for name, seconds in reader.stage_seconds.items():
                    self._stages[name] += seconds
                reader.close()
            self._readers = []
            self.close()

    def _places(
        self, counts: list[int], before: list[int], world: WorldInfo
    ) -> list[tuple[int, int, np.ndarray]]:
        """This rank's places of a global batch: (source, first stream position, where)."""
        assert self.batch_size is not None
        lo = world.rank * self.batch_size
        sources, index = batch_layout(tuple(counts))
        sources, index = sources[lo : lo + self.batch_size], index[lo : lo + self.batch_size]
        places = []
        for i in np.unique(sources).tolist():
            where = np.flatnonzero(sources == i)
            # A source's places keep their order, so this rank's are consecutive in its stream.
            places.append((i, before[i] + int(index[where[0]]), where))
        return places

    def _samples(
        self,
        steps: list[list[tuple[int, int, np.ndarray]]],
        orders: list[SourceOrder],
        readers: list[ShardReader],
        keep: int,
    ) -> list[list[Any]]:
        """The samples of several steps' places: one read per source for all of them."""
        assert self.batch_size is not None
        out: list[list[Any]] = [[None] * self.batch_size for _ in steps]
        names = self.mixture.names
        for i in sorted({i for places in steps for i, _, _ in places}):
            runs = [
                (t, first, where)
                for t, places in enumerate(steps)
                for s, first, where in places
                if s == i
            ]
            ids = np.concatenate([orders[i].ids(first, len(where)) for _, first, where in runs])
            ahead = orders[i].shards_ahead(runs[-1][1])
            samples = iter(readers[i].read_ids(ids, ahead=ahead, keep=keep))
            for t, _, where in runs:
                row = out[t]
                for p in where.tolist():
                    sample = next(samples)
                    sample["source"] = names[i]
                    row[p] = sample if self.transform is None else self.transform(sample)
        return out

    def _rows(
        self,
        pieces: list[Piece],
        world: WorldInfo,
        orders: list[SourceOrder],
        readers: list[ShardReader],
        keep: int,
    ) -> list[tuple[PackedRow, list[int]]]:
        """This rank's rows of a global token batch, each with its pieces' source indices."""
        assert self.pack is not None
        assert self.batch_size is not None
        seq_len = self.pack.seq_len
        lo = world.rank * self.batch_size * seq_len
        hi = lo + self.batch_size * seq_len
        mine: list[Piece] = []
        at = 0
        for piece in pieces:
            n = piece.stop - piece.start
            if lo <= at and at + n <= hi:
                mine.append(piece)
            elif at < hi and at + n > lo:
                a, b = max(at, lo), min(at + n, hi)
                mine.append(piece._replace(start=piece.start + a - at, stop=piece.start + b - at))
            at += n
            if at >= hi:
                break
        # Read each source's documents of the slice at once (their stream positions are
        # consecutive: documents are taken in stream order).
        docs: dict[tuple[int, int], tuple[EncodedDoc, int]] = {}
        for i in sorted({p.source for p in mine}):
            positions = sorted({p.position for p in mine if p.source == i})
            first = positions[0]
            span = orders[i].ids(first, positions[-1] - first + 1)
            ids = span[np.asarray(positions) - first]
            ahead = orders[i].shards_ahead(positions[-1])
            samples = readers[i].read_ids(ids, ahead=ahead, keep=keep)
            # The token encoder gives each document's ids as stored (the plan counted those)
            # and its loss mask (SFT shards: a stored field), or None (all tokens are trained).
            # A source with no field beside id and input_ids has no mask: skip it (~0.6 us/doc).
            if len(self.manifests()[i].fields) > 2:
                encoded = encode_token_samples(list(samples))
            else:
                encoded = [EncodedDoc(sample["input_ids"], None) for sample in samples]
            for k, sid, doc in zip(positions, ids.tolist(), encoded, strict=True):
                docs[(i, k)] = (doc, sid)
        parts = [docs[(p.source, p.position)][0] for p in mine]
        for piece, doc in zip(mine, parts, strict=True):
            if piece.stop > len(doc.input_ids):
                raise CorpusError(
                    f"{self.sources[piece.source]}: the token encoder gave document"
                    f" {piece.position} of the source's stream {len(doc.input_ids)} tokens, fewer"
                    f" than the {piece.stop} planned from its stored length; a token mixture"
                    " reads documents as stored"
                )
        flat = np.concatenate(
            [d.input_ids[p.start : p.stop] for p, d in zip(mine, parts, strict=True)]
        )
        lengths = np.fromiter((p.stop - p.start for p in mine), np.int64, len(mine))
        masked = np.fromiter((d.loss_mask is not None for d in parts), bool, len(parts))
        flat_mask = None
        if masked.any():  # one concatenate; mask-free sources cost nothing per token
            flat_mask = np.concatenate(
                [
                    d.loss_mask[p.start : p.stop] if d.loss_mask is not None else np.ones(n, bool)
                    for p, d, n in zip(mine, parts, lengths.tolist(), strict=True)
                ]
            )
        piece_ends = np.cumsum(lengths)
        piece_starts = piece_ends - lengths
        row_starts = np.arange(self.batch_size, dtype=np.int64) * seq_len
        seg_starts = np.union1d(piece_starts, row_starts)
        seg_lens = np.diff(np.append(seg_starts, len(flat)))
        owner = np.searchsorted(piece_ends, seg_starts, side="right")
        seg_samples = np.fromiter(
            (docs[(mine[j].source, mine[j].position)][1] for j in owner.tolist()),
            np.int64,
            len(owner),
        )
        seg_sources = [mine[j].source for j in owner.tolist()]
        seg_masked = masked[owner]
        bounds = np.searchsorted(seg_starts, np.append(row_starts, len(flat))).tolist()
        rows = []
        for r in range(self.batch_size):
            a, b = bounds[r], bounds[r + 1]
            lo, hi = r * seq_len, (r + 1) * seq_len
            mask = flat_mask[lo:hi] if flat_mask is not None and seg_masked[a:b].any() else None
            row = PackedRow(flat[lo:hi], seg_lens[a:b], seg_samples[a:b], mask, (0, 0))
            rows.append((row, seg_sources[a:b]))
        return rows

    def stage_seconds(self) -> dict[str, float]:
        """Seconds this process has spent per stage since it started.

        ``fetch_wait`` (blocked on the fetcher), ``decode`` (decoding shards, building samples),
        ``pack`` (planning the mix and cutting rows), ``collate``.
        """
        stages = dict(self._stages)
        for reader in self._readers:
            for name, seconds in reader.stage_seconds.items():
                stages[name] += seconds
        return stages

    def count_stage(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to stage ``name`` of this process (the loader counts ``collate``)."""
        self._stages[name] += seconds

    def close(self) -> None:
        """Stop background fetches of this process."""
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fetcher"] = None
        state["_readers"] = []
        return state

    # --- state --------------------------------------------------------------------------

    def state_from_counters(self, counters: MixCounters) -> dict[str, Any]:
        """A JSON-ready state: the counters, the fingerprint and per-source realized counts."""
        spec = self.spec()
        return {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "unit": spec.unit,
            "sources": list(spec.names),
            "counters": counters.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `MixLoader.state_dict` (saved on any topology).

        Raises:
            ResumeError: The state is from another mixture, data or config, or malformed.
        """
        if not isinstance(state, Mapping) or state.get("kind") != STATE_KIND:
            raise ResumeError(
                "not a mixture loader state (kind is "
                f"{state.get('kind') if isinstance(state, Mapping) else type(state).__name__!r})"
            )
        if state.get("version") != STATE_VERSION:
            raise ResumeError(
                f"mixture state version {state.get('version')!r}; this shardloader reads "
                f"version {STATE_VERSION}"
            )
        if state.get("fingerprint") != self.fingerprint:
            raise ResumeError(
                "the state is from another mixture: sources, weights, phases, unit, total, "
                "seed, shuffle or packing differ (or a source's data changed)"
            )
        counters = MixCounters.from_dict(state.get("counters"), len(self.mixture.sources))
        self._start = counters


class _Lengths:
    """Token counts of source documents by stream position, read a block at a time."""

    def __init__(
        self,
        orders: list[SourceOrder],
        readers: list[ShardReader],
        manifests: list[Manifest],
        keep: int,
    ) -> None:
        self._orders, self._readers, self._keep = orders, readers, keep
        self._fields = [_token_field(m) for m in manifests]
        self._blocks: list[tuple[int, list[int]]] = [(-1, [])] * len(orders)

    def length(self, source: int, position: int) -> int:
        block, values = self._blocks[source]
        index = position // LENGTH_BLOCK
        if index != block:
            ids = self._orders[source].ids(index * LENGTH_BLOCK, LENGTH_BLOCK)
            reader = self._readers[source]
            values = reader.token_lengths(ids, self._fields[source], keep=self._keep).tolist()
            self._blocks[source] = (index, values)
        return values[position % LENGTH_BLOCK]


def _token_field(manifest: Manifest) -> str:
    for name, kind in manifest.fields.items():
        if kind == "tokens":
            return name
    raise ConfigError("the source has no token field")


def _check_compatible(
    mixture: Mixture, urls: list[str], manifests: list[Manifest], tokenizer: Any
) -> None:
    """Token sources must share a tokenizer; token mixes need tokenized sources."""
    first: tuple[str, str] | None = None
    for url, manifest in zip(urls, manifests, strict=True):
        if mixture.unit == "tokens" and not manifest.tokenized:
            raise ConfigError(
                f"{url}: a text dataset in a mixture with unit='tokens'; convert it with "
                "--tokenizer (the mix counts tokens, so they must be known before reading)"
            )
        if manifest.tokenized:
            info = manifest.tokenizer or {}
            fingerprint = str(info.get("fingerprint"))
            if first is None:
                first = (url, fingerprint)
            elif fingerprint != first[1]:
                raise ConfigError(
                    f"the mixture's sources use different tokenizers: {first[0]} "
                    f"(fingerprint {first[1][:12]}) and {url} (fingerprint {fingerprint[:12]})"
                )
            if tokenizer is not None:
                from shardloader.pack_encode import check_tokenizer

                check_tokenizer(manifest, tokenizer, where=url)


class _MixCollate:
    """Collates one step inside the worker; keeps the counters beside it."""

    def __init__(self, collate: Callable[[Any], Any] | None, dataset: MixDataset) -> None:
        self.collate = collate
        self.pack = dataset.pack
        self.dataset = dataset

    def __call__(
        self, item: tuple[Any, dict[str, Any]]
    ) -> tuple[Any, dict[str, Any], tuple[int, dict[str, float]]]:
        batch, counters = self.one(item)
        return batch, counters, self._origin()

    def group(
        self, items: list[tuple[Any, dict[str, Any]]]
    ) -> tuple[list[tuple[Any, dict[str, Any]]], tuple[int, dict[str, float]]]:
        """Several steps a worker sends at once (`MixLoader`'s ``transfer_batches``)."""
        return [self.one(item) for item in items], self._origin()

    def _origin(self) -> tuple[int, dict[str, float]]:
        """This process's worker id (-1: the main one) and its stage counters."""
        info = torch.utils.data.get_worker_info()
        dataset = info.dataset if info is not None else self.dataset
        assert isinstance(dataset, MixDataset)
        return (info.id if info is not None else -1), dataset.stage_seconds()

    def one(self, item: tuple[Any, dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
        """One step's batch (on its way out of a worker: `_WireRows` or wired tensors)."""
        started = time.perf_counter()
        payload, counters = item
        info = torch.utils.data.get_worker_info()
        if self.pack is not None and self.collate is None:
            rows = [row for row, _ in payload]
            sources = np.array([s for _, srcs in payload for s in srcs], dtype=np.int64)
            if info is not None:  # rows cross as rows and are collated on arrival
                batch: Any = _WireRows(rows, self.pack, {"sample_sources": sources})
            else:
                batch = collate_rows(rows, self.pack)
                batch["sample_sources"] = torch.from_numpy(sources)
        elif self.collate is not None and self.pack is not None:
            batch = self.collate([row for row, _ in payload])
        else:
            batch = (self.collate or default_collate)(payload)
        dataset = info.dataset if info is not None else self.dataset
        assert isinstance(dataset, MixDataset)
        dataset.count_stage("collate", time.perf_counter() - started)
        if info is not None and not isinstance(batch, _WireRows):
            batch = _to_wire(batch)
        return batch, counters


class MixLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` over a `MixDataset`: one batch per step, with an exact ``state_dict``.

    With workers, each worker sends ``transfer_batches`` steps at once (after a first step of
    its own), given out in step order, as `ShardLoader` does: a step crossing from a worker
    costs the main process about 0.1 ms however small it is.

    Args:
        dataset: The mixture dataset.
        batch_size: Per rank: samples per batch, or rows per batch in a token mixture.
        collate_fn: Collates one step's samples (default: ``default_collate``; token
            mixtures: `collate_rows` plus ``sample_sources``).
        transfer_batches: Steps a worker sends at once (1: one per request, as a plain
            DataLoader).
        **kwargs: Passed to ``DataLoader`` (``num_workers``, ``pin_memory``, ...). Persistent
            workers are restarted at each epoch (they hold the position they started from).
    """

    def __init__(
        self,
        dataset: MixDataset,
        batch_size: int | None = None,
        collate_fn: Callable[[Any], Any] | None = None,
        *,
        transfer_batches: int = TRANSFER_BATCHES,
        **kwargs: Any,
    ) -> None:
        if not isinstance(dataset, MixDataset):
            raise ConfigError(f"MixLoader needs a MixDataset, got {type(dataset).__name__}")
        if transfer_batches < 1:
            raise ConfigError(f"transfer_batches must be >= 1, got {transfer_batches}")
        if batch_size is not None:
            if dataset.batch_size not in (None, batch_size):
                raise ConfigError(
                    f"batch_size={batch_size} but the dataset was made with "
                    f"batch_size={dataset.batch_size}"
                )
            dataset.batch_size = batch_size
        dataset.batch_units(1)  # raises without a batch size
        for name in ("sampler", "batch_sampler", "drop_last"):
            if kwargs.get(name):
                raise ConfigError(f"MixLoader makes its own batches; {name} is not supported")
        collate = _MixCollate(collate_fn, dataset)
        self._transfer = transfer_batches if kwargs.get("num_workers", 0) > 0 else 1
        fn: Any = collate.group if self._transfer > 1 else collate
        super().__init__(dataset, batch_size=None, collate_fn=fn, **kwargs)
        self._last: dict[str, Any] | None = None
        # Stage counters: the latest of each live process, and the sum of those that ended.
        self._stages: dict[int, dict[str, float]] = {}
        self._stages_ended: dict[str, float] = {}

    @property
    def mix_dataset(self) -> MixDataset:
        """The dataset, typed."""
        dataset = self.dataset
        assert isinstance(dataset, MixDataset)
        return dataset

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        """Start the epoch now (workers start and fetch ahead at ``iter()``, as a DataLoader's)."""
        dataset = self.mix_dataset
        if self._last is not None:
            dataset.set_counters(MixCounters.from_dict(self._last, len(dataset.mixture.sources)))
        self._last = None
        self._iterator = None  # workers start from the dataset's current position
        spec = dataset.spec()
        units = dataset.batch_units(dataset.world().world_size)
        wired = self.num_workers > 0
        if wired:  # new worker processes count from zero
            for stages in self._stages.values():
                for name, seconds in stages.items():
                    self._stages_ended[name] = self._stages_ended.get(name, 0.0) + seconds
            self._stages = {}
        groups: Any = super().__iter__()
        steps: Iterator[tuple[Any, Any, int, dict[str, float]]] = (
            _in_batch_order(groups, self.num_workers)
            if self._transfer > 1
            else ((batch, counters, worker, stages) for batch, counters, (worker, stages) in groups)
        )
        return self._deliver(steps, spec, units, wired)

    def _deliver(
        self,
        steps: Iterator[tuple[Any, Any, int, dict[str, float]]],
        spec: MixSpec,
        units: int,
        wired: bool,
    ) -> Iterator[Any]:
        """The epoch's steps, each one's counters kept; the counters moved on at its end."""
        dataset = self.mix_dataset
        last: dict[str, Any] | None = None
        for batch, counters, worker, stages in steps:
            self._stages[worker] = stages
            last = self._last = counters
            yield _from_wire(batch) if wired else batch
        if last is not None:
            ended = MixCounters.from_dict(last, len(spec.names))
            if epoch_done(spec, ended, units):
                next_epoch(ended)
            dataset.set_counters(ended)
        self._last = None

    def _get_iterator(self) -> Any:
        return _widen_result_pipe(super()._get_iterator())

    @property
    def _auto_collation(self) -> bool:
        # Grouped: a worker fetches `transfer_batches` steps per request (`_index_sampler`) and
        # the collate gets them as a list.
        return self._transfer > 1 or super()._auto_collation

    @property
    def _index_sampler(self) -> Any:
        if self._transfer > 1:
            return _TransferSampler(1, self._transfer, self.num_workers)
        return super()._index_sampler

    def stage_seconds(self) -> dict[str, float]:
        """Seconds the loader's processes spent per stage (like `ShardLoader.stage_seconds`)."""
        total = dict.fromkeys(("fetch_wait", "decode", "pack", "collate"), 0.0)
        for name, seconds in self._stages_ended.items():
            total[name] += seconds
        for stages in self._stages.values():
            for name, seconds in stages.items():
                total[name] = total.get(name, 0.0) + seconds
        return total

    def counters(self) -> MixCounters:
        """The position of the training loop: after the last step it was handed."""
        dataset = self.mix_dataset
        if self._last is not None:
            return MixCounters.from_dict(self._last, len(dataset.mixture.sources))
        return dataset.counters()

    def state_dict(self, *, gather: bool = False) -> dict[str, Any]:
        """The position of the training loop, the same on every rank (``gather`` is not needed).

        Returns:
            A JSON-ready dict: the mixture's fingerprint and its `MixCounters`.
        """
        return self.mix_dataset.state_from_counters(self.counters())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict` output of any rank, on any topology."""
        self.mix_dataset.load_state_dict(state)
        self._last = None
        self._iterator = None

    def mix_counters(self) -> list[dict[str, Any]]:
        """Per source, realized against target, since the run began (all ranks together)."""
        counters = self.counters()
        spec = self.mix_dataset.spec()
        total = sum(counters.served) or 1
        return [
            {
                "source": name,
                spec.unit: counters.served[i],
                "target": counters.target[i],
                "samples": counters.taken[i],
                "share": counters.served[i] / total,
            }
            for i, name in enumerate(spec.names)
        ]
