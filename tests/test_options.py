import argparse
from dataclasses import dataclass

import pytest

from shardloader.errors import ConfigError
from shardloader.options import add_options, config_from_args, option, parse_size


@dataclass(frozen=True, kw_only=True)
class _Config:
    data: str = option(help="the data", positional=True)
    output: str = option(help="where", flags=("-o", "--output"))
    size: int = option(64, "bytes", parse=parse_size)
    ratio: float = option(0.5, "a ratio")
    limit: int | None = option(None, "optional count")
    mode: str = option("a", "mode", choices=("a", "b"))
    fields: tuple[str, ...] = option((), "comma list")
    add_eos: bool = option(True, "append eos", negative="--no-eos")
    progress: bool | None = option(None, "bar")
    hidden: int = option(3, "python only", cli=False)

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ConfigError("size must be positive")


def _parse(argv: list[str]) -> _Config:
    parser = argparse.ArgumentParser()
    add_options(parser, _Config)
    return config_from_args(_Config, parser.parse_args(argv))


def test_defaults_and_types() -> None:
    c = _parse(["d", "-o", "out"])
    assert c == _Config(data="d", output="out")
    c = _parse(
        [
            "d",
            "--output",
            "o",
            "--size",
            "2KiB",
            "--ratio",
            "0.25",
            "--limit",
            "7",
            "--mode",
            "b",
            "--fields",
            "x, y,",
            "--no-eos",
            "--progress",
        ]
    )
    assert (c.size, c.ratio, c.limit, c.mode, c.fields) == (2048, 0.25, 7, "b", ("x", "y"))
    assert c.add_eos is False
    assert c.progress is True
    assert _parse(["d", "-o", "o", "--no-add-eos", "--no-progress"]).progress is False


def test_required_choices_and_hidden() -> None:
    with pytest.raises(SystemExit):
        _parse(["d"])  # --output is required
    with pytest.raises(SystemExit):
        _parse(["d", "-o", "o", "--mode", "c"])
    with pytest.raises(SystemExit):
        _parse(["d", "-o", "o", "--hidden", "4"])
    with pytest.raises(SystemExit):
        _parse(["d", "-o", "o", "--size", "lots"])


def test_validation_runs() -> None:
    with pytest.raises(ConfigError):
        _parse(["d", "-o", "o", "--size", "0"])


@pytest.mark.parametrize(
    ("text", "value"), [("1000", 1000), ("64MB", 64 << 20), ("64MiB", 64 << 20), ("1.5G", 3 << 29)]
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value
