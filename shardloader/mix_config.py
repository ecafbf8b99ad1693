"""What a mixture is: `Source`, `Phase` and `Mixture`, checked on creation, read from YAML or JSON.

A `Mixture` names its sources (each a converted dataset: local folder or URL), their weights
(relative; normalized to sum 1), the unit the weights count (``"samples"`` or ``"tokens"``), an
optional length of the run (``total`` units) and optional phases: weights that change at a
given number of units (an annealing mix for the last 10%, say). Everything here is plain data;
`shardloader.mix_plan` plans it against the sources' manifests and `shardloader.mix_dataset`
reads it.

A mixture file (``--mix mix.yaml``)::

    unit: tokens
    total: 2000000000          # optional
    sources:
      - {url: s3://corpora/web/, weight: 0.6}
      - {url: s3://corpora/code/, weight: 0.3, max_repetitions: 2}
      - {url: data/sft-chat/, weight: 0.1, name: chat}
    phases:                    # optional
      - {at: 0.9, weights: {web: 0.3, code: 0.3, chat: 0.4}}
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from shardloader.errors import ConfigError

UNITS = ("samples", "tokens")
MAX_MIX_FILE_BYTES = 1 << 20  # a mixture file is a few lines; refuse anything huge


@dataclass(frozen=True)
class Source:
    """One dataset of a mixture.

    Args:
        url: The converted dataset: a folder or URL holding ``_manifest.json``.
        weight: Its share of the mix (relative to the other sources' weights; > 0).
        name: How logs, counters and phases name it (default: the URL's last path part).
        max_repetitions: How many passes over it the run may make (may be fractional); a mix
            that needs more is refused up front. ``None``: any number when the mixture has a
            ``total``; without one, the run ends before any source repeats.
    """

    url: str
    weight: float
    name: str | None = None
    max_repetitions: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise ConfigError(f"Source.url is {self.url!r}; expected a dataset folder or URL")
        _check_weight(f"Source({self.url!r}).weight", self.weight)
        if self.name is None:
            base = posixpath.basename(self.url.rstrip("/")) or self.url
            object.__setattr__(self, "name", base)
        elif not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"Source({self.url!r}).name is {self.name!r}; expected a string")
        reps = self.max_repetitions
        if reps is not None and (
            isinstance(reps, bool)
            or not isinstance(reps, int | float)
            or not math.isfinite(reps)
            or reps <= 0
        ):
            raise ConfigError(
                f"Source {self.name!r}: max_repetitions is {reps!r}; expected a number > 0"
            )

    @property
    def label(self) -> str:
        """The name, typed as a str (it is always set after construction)."""
        assert self.name is not None
        return self.name


@dataclass(frozen=True)
class Phase:
    """Weights that take over at a point of the run.

    Args:
        at: Where the phase starts: units from the start of the run (an int), or a fraction of
            the mixture's ``total`` (a float in (0, 1)).
        weights: The new weight of every source, by name (a source left out gets 0).
    """

    at: int | float
    weights: Mapping[str, float]

    def __post_init__(self) -> None:
        at = self.at
        if isinstance(at, bool) or not isinstance(at, int | float):
            raise ConfigError(f"Phase.at is {at!r}; expected units (int) or a fraction (float)")
        if isinstance(at, float) and not 0 < at < 1:
            raise ConfigError(f"Phase.at is {at}; a float is a fraction of total, in (0, 1)")
        if isinstance(at, int) and at <= 0:
            raise ConfigError(f"Phase.at is {at}; expected units > 0 (phase 0 is the mixture)")
        if not isinstance(self.weights, Mapping) or not self.weights:
            raise ConfigError(f"Phase(at={at}).weights must map source names to weights")
        for name, weight in self.weights.items():
            if weight != 0:
                _check_weight(f"Phase(at={at}).weights[{name!r}]", weight)
        if not any(self.weights.values()):
            raise ConfigError(f"Phase(at={at}): every weight is 0")
        object.__setattr__(self, "weights", dict(self.weights))


@dataclass(frozen=True)
class Mixture:
    """Sources read together in fixed proportions (see the module docstring).

    Args:
        sources: The datasets, at least one; names must differ.
        unit: What the weights count: ``"samples"`` (documents) or ``"tokens"`` (tokenized
            shards only; the loader then yields packed rows).
        total: The run's length in units; ``None``: until the first source would repeat
            (beyond its ``max_repetitions``).
        phases: Weights that change during the run, in increasing ``at``.
    """

    sources: Sequence[Source]
    unit: str = "samples"
    total: int | None = None
    phases: Sequence[Phase] = field(default=())

    def __post_init__(self) -> None:
        sources = tuple(self.sources)
        if not sources or not all(isinstance(s, Source) for s in sources):
            raise ConfigError("Mixture needs a list of Source objects, at least one")
        names = [s.label for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(
                f"Mixture: sources share the name {dupes[0]!r}; give each a name= of its own"
            )
        if self.unit not in UNITS:
            raise ConfigError(f"Mixture.unit is {self.unit!r}; expected 'samples' or 'tokens'")
        total = self.total
        if total is not None and (isinstance(total, bool) or not isinstance(total, int)):
            raise ConfigError(f"Mixture.total is {total!r}; expected an integer number of units")
        if total is not None and total <= 0:
            raise ConfigError(f"Mixture.total is {total}; expected > 0")
        phases = tuple(self.phases)
        if not all(isinstance(p, Phase) for p in phases):
            raise ConfigError("Mixture.phases must be Phase objects")
        starts = []
        for phase in phases:
            unknown = sorted(set(phase.weights) - set(names))
            if unknown:
                raise ConfigError(
                    f"Phase(at={phase.at}) weighs {unknown[0]!r}, which is not a source "
                    f"(sources: {', '.join(names)})"
                )
            if isinstance(phase.at, float) and total is None:
                raise ConfigError(
                    f"Phase(at={phase.at}) is a fraction of total, but the mixture has no total"
                )
            starts.append(phase_start(phase, total))
        if starts != sorted(starts) or len(set(starts)) != len(starts):
            raise ConfigError(f"Mixture.phases must start at increasing points, got {starts}")
        if total is not None and starts and starts[-1] >= total:
            raise ConfigError(f"a phase starts at {starts[-1]}, not before total={total}")
        object.__setattr__(self, "sources", sources)
        object.__setattr__(self, "phases", phases)

    @property
    def names(self) -> list[str]:
        """The sources' names, in order."""
        return [s.label for s in self.sources]

    def phase_table(self) -> list[tuple[int, list[Fraction]]]:
        """Every phase as (start unit, normalized weights in source order), the mixture first."""
        table = [(0, normalize([s.weight for s in self.sources]))]
        for phase in self.phases:
            weights = [phase.weights.get(name, 0) for name in self.names]
            table.append((phase_start(phase, self.total), normalize(weights)))
        return table

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what `from_dict` reads)."""
        return {
            "unit": self.unit,
            "total": self.total,
            "sources": [
                {
                    "url": s.url,
                    "weight": s.weight,
                    "name": s.name,
                    "max_repetitions": s.max_repetitions,
                }
                for s in self.sources
            ],
            "phases": [{"at": p.at, "weights": dict(p.weights)} for p in self.phases],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "mixture") -> Mixture:
        """A mixture from its dict form (`to_dict`, or a parsed mixture file).

        Raises:
            ConfigError: A key is unknown or missing, or a value is invalid (naming ``where``).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'sources', got {type(data)}")
        _check_keys(data, {"unit", "total", "sources", "phases"}, where)
        raw_sources = data.get("sources")
        if not isinstance(raw_sources, list) or not raw_sources:
            raise ConfigError(f"{where}: 'sources' must be a non-empty list")
        try:
            sources = []
            for i, item in enumerate(raw_sources):
                if not isinstance(item, Mapping):
                    raise ConfigError(f"sources[{i}] must be a mapping with url and weight")
                _check_keys(item, {"url", "weight", "name", "max_repetitions"}, f"sources[{i}]")
                if "url" not in item or "weight" not in item:
                    raise ConfigError(f"sources[{i}] needs url and weight")
                sources.append(Source(**item))
            phases = []
            for i, item in enumerate(data.get("phases") or []):
                if not isinstance(item, Mapping) or set(item) != {"at", "weights"}:
                    raise ConfigError(f"phases[{i}] must have exactly 'at' and 'weights'")
                phases.append(Phase(at=item["at"], weights=item["weights"]))
            return cls(
                sources,
                unit=data.get("unit", "samples"),
                total=data.get("total"),
                phases=phases,
            )
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> Mixture:
        """Read a mixture file: YAML (``.yaml``, ``.yml``) or JSON.

        Raises:
            ConfigError: The file is missing, not a regular file, too big, or invalid.
        """
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such mixture file (or not a regular file)")
        if p.stat().st_size > MAX_MIX_FILE_BYTES:
            raise ConfigError(f"{p}: a mixture file of over {MAX_MIX_FILE_BYTES} bytes; refused")
        text = p.read_text(encoding="utf-8")
        kind = "YAML" if p.suffix in (".yaml", ".yml") else "JSON"
        try:
            if kind == "YAML":
                import yaml

                data = yaml.safe_load(text)  # safe_load: plain data, never Python objects
            else:
                data = json.loads(text)
        except Exception as exc:  # yaml.YAMLError or json.JSONDecodeError
            raise ConfigError(f"{p}: not valid {kind}: {exc}") from None
        return cls.from_dict(data, where=str(p))


def phase_start(phase: Phase, total: int | None) -> int:
    """The unit a phase starts at (a fraction of ``total`` rounded down)."""
    if isinstance(phase.at, float):
        assert total is not None
        return int(phase.at * total)
    return phase.at


def normalize(weights: Sequence[float]) -> list[Fraction]:
    """Weights as exact fractions summing to 1 (decimal weights stay exact: 0.3 is 3/10)."""
    exact = [Fraction(str(w)) if isinstance(w, float) else Fraction(w) for w in weights]
    total = sum(exact)
    return [w / total for w in exact]


def _check_weight(where: str, weight: object) -> None:
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or weight <= 0
    ):
        raise ConfigError(f"{where} is {weight!r}; expected a number > 0")


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(allowed))})"
        )
