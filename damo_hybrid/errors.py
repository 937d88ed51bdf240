"""Typed runtime errors.

Bad arguments raise the builtin ``ValueError``/``TypeError``; faults of the
store at run time raise a subclass of :class:`DamoHybridError`.
"""

from __future__ import annotations

__all__ = [
    "DamoHybridError",
    "StoreClosedError",
    "StoreLockedError",
    "ConfigConflictError",
    "CorruptRowError",
    "OutOfSpaceError",
    "NonFiniteGradientError",
    "NonFiniteUpdateError",
    "UnknownTableError",
    "PipelineError",
    "WriteBackError",
    "ExchangeError",
]


class DamoHybridError(Exception):
    """Base class of every runtime fault raised by damo_hybrid."""


class StoreClosedError(DamoHybridError):
    """The store was used after ``close()``."""


class StoreLockedError(DamoHybridError):
    """Another process (or another open handle in this process) holds the store."""


class ConfigConflictError(DamoHybridError):
    """The table config given at open time conflicts with the one stored on disk."""


class CorruptRowError(DamoHybridError):
    """A stored row failed its length or checksum check; it is never used."""

    def __init__(self, table: str, key: int, reason: str) -> None:
        super().__init__(
            f"corrupt row in table {table!r} at key {key} (0x{key:016x}): {reason}. "
            "Restore the store from a checkpoint, or delete the row with "
            "EmbeddingStore.delete() to re-initialise it."
        )
        self.table = table
        self.key = key


class OutOfSpaceError(DamoHybridError):
    """The disk holding the store is full; the failed write was not applied."""


class NonFiniteGradientError(DamoHybridError, ValueError):
    """A gradient holds NaN or Inf and the table's policy is ``raise``."""


class NonFiniteUpdateError(NonFiniteGradientError):
    """A step with finite gradients would store NaN or Inf (an overflow) under the ``raise`` policy."""


class UnknownTableError(DamoHybridError, KeyError):
    """A table name that the store does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown table"


class PipelineError(DamoHybridError):
    """A pipeline stage failed; the stage's exception is the ``__cause__``."""


class WriteBackError(DamoHybridError):
    """Cached rows could not be written to the storage (a full disk, say); they are still
    held in memory: fix the cause and flush or close again."""


class ExchangeError(DamoHybridError):
    """An exchange between ranks failed: another rank stopped, or did not answer within the
    timeout. This rank's step was not stored; resume every rank from the last checkpoint."""
