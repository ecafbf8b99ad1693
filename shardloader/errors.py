"""The exceptions shardloader raises.

Every message starts with where the problem is (a file and line, a shard, a URL), then says what is
wrong with the expected and actual values, then what to do. Each class also subclasses the matching
builtin, so ``except ValueError`` keeps working for callers that do not know shardloader.
"""

from __future__ import annotations


class ShardloaderError(Exception):
    """Base class of every error shardloader raises on purpose."""


class ConfigError(ShardloaderError, ValueError):
    """A configuration value is invalid or two values contradict each other."""


class CorpusError(ShardloaderError, ValueError):
    """A raw input record or file cannot be converted (bad JSON, bad UTF-8, missing field, ...)."""


class ManifestError(ShardloaderError, ValueError):
    """A manifest is missing, malformed, of an unknown version, or inconsistent."""


class ShardError(ShardloaderError, ValueError):
    """A shard is missing, truncated, undecodable, or does not match its manifest entry."""


class StorageError(ShardloaderError, OSError):
    """Reading or writing a URL failed (after retries, where retries apply)."""


class ResumeError(ShardloaderError, ValueError):
    """A saved state cannot be resumed with this dataset or configuration."""


class CheckpointDamagedError(ResumeError):
    """A checkpoint's files are not the bytes its save recorded (missing, truncated, changed)."""


class ShardloaderWarning(UserWarning):
    """Warnings shardloader issues; the test suite turns them into errors."""
