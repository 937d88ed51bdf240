"""Which keys a batch makes resident (the host-manager stage, for :class:`EmbeddingCollection
<damo_hybrid.nn.collection.EmbeddingCollection>`): a compressed table's partition keys, and which
of a batch's distinct keys admission lets in.

Both read counters that a training batch adds to only once every table of the batch is resident,
in batch order, so a pipelined run decides as the sequential one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..cache.tiers import TableTiers
from ..keys.compression import CompressionConfig, CompressionKind
from ..keys.kernels import unique_inverse

__all__ = ["partition_keys", "admit"]

Counts = list[tuple[TableTiers, tuple[np.ndarray, np.ndarray]]]


def partition_keys(comp: CompressionConfig, tiers: TableTiers, items: list[tuple[Any, np.ndarray, Any]],
                   counting: bool, counts: Counts) -> list[tuple[Any, np.ndarray, Any]]:
    """A compressed table's ``(feature, keys, offsets)`` items with each key's ``P`` partition keys
    (key-major) in place of it.

    ``double_hash`` asks the table's counters which raw keys are frequent (this batch's occurrences
    included) and, for a training batch, appends those occurrences to ``counts`` (added once the
    batch is resident).
    """
    if comp.kind is not CompressionKind.DOUBLE_HASH:
        return [(f, comp.subkeys(k).reshape(-1), offs) for f, k, offs in items]
    raw, inv = unique_inverse(np.concatenate([k for _, k, _ in items]))
    occ = np.bincount(inv, minlength=len(raw)) if counting else np.zeros(len(raw), np.int64)
    with tiers.lock:
        frequent = (tiers.table.filter.count(raw) + occ >= comp.min_count)[inv]  # type: ignore[union-attr]
    if counting:
        counts.append((tiers, (raw, occ)))
    out, start = [], 0
    for f, k, offs in items:
        out.append((f, comp.subkeys(k, frequent[start:start + len(k)]).reshape(-1), offs))
        start += len(k)
    return out


def admit(tiers: TableTiers, ukeys: np.ndarray, inv: np.ndarray, counting: bool
          ) -> tuple[np.ndarray | None, np.ndarray | None, tuple[np.ndarray, np.ndarray] | None]:
    """Admission of a batch's distinct keys: a training batch's own occurrences count (added
    once the batch is resident, in batch order); an eval batch only asks. A key with a stored row
    is in. A ``double_hash`` table's counters count raw keys (:func:`partition_keys`): its
    partition keys are all in.

    Returns:
        ``(admitted bool (U,), rows of the others, (keys, occurrences) to count)``; the first
        two are None when every key is in.
    """
    table = tiers.table
    if not table.admits:
        return None, None, None
    occ = np.bincount(inv, minlength=len(ukeys)) if counting else np.zeros(len(ukeys), np.int64)
    admitted = tiers.admitted(ukeys, table.admit(ukeys, occ, count=False))  # type: ignore[arg-type]
    seen = (ukeys, occ) if counting else None
    if admitted.all():
        return None, None, seen
    out = ukeys[~admitted]
    side = np.zeros((len(out), table.dim), np.float32) if table.unadmitted_zeros else table.initial_weights(out)
    return admitted, side, seen
