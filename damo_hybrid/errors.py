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
    "CacheFullError",
    "InsufficientMemoryError",
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
    """A stored row failed its length or checksum check (it is never used), or the storage cannot
    read a table's rows at all (a damaged file): then ``key`` is None, and no key is blamed.

    Args:
        table: the table.
        key: the row's key, or None where no row could be read.
        reason: the cause (RocksDB's own words for a damaged file).
        store: the store's folder, named first in the message.
    """

    def __init__(self, table: str, key: int | None, reason: str, store: str | None = None) -> None:
        at = f"store {store}: " if store else ""
        if key is None:
            msg = f"{at}table {table!r} cannot be read: {reason}. Restore the store from a checkpoint."
        else:
            msg = (f"{at}corrupt row in table {table!r} at key {key} (0x{key:016x}): {reason}. "
                   "Restore the store from a checkpoint, or EmbeddingStore.delete() the row to re-initialise it.")
        super().__init__(msg)
        self.table = table
        self.key = key
        self.reason = reason
        self.store = store

    def __reduce__(self) -> tuple[object, ...]:  # (pickled across processes with its arguments)
        return (type(self), (self.table, self.key, self.reason, self.store))


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


class CacheFullError(DamoHybridError, RuntimeError):
    """A cache tier cannot hold the rows one batch needs beside the batches in flight: its budget
    is too small for the batch size (CLI: raise ``--cache-mb`` or lower ``--batch-size``)."""


class InsufficientMemoryError(DamoHybridError, MemoryError):
    """A configuration needs more memory than the machine has available; refused before anything
    was allocated (:mod:`damo_hybrid.resources`). The message names the option to change."""


class DamagedOutputError(DamoHybridError):
    """An output (an export, a save, a checkpoint) whose parts do not belong together: a file
    missing, cut short, or written by another write than the one its manifest records."""
