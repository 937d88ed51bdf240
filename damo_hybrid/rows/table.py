"""One table at run time: its config decomposed once, and the one owner of its global step.

A :class:`Table` holds what every tier needs to treat the table's rows alike: the row
initializer, the row optimizer and its learning-rate schedule, the row codec, the NaN/Inf
policy, the admission filter, and the table's global step. Whoever steps rows (the store's
uncached path, a table's cache tiers, an :class:`~damo_hybrid.nn.EmbeddingCollection`) asks
the table to validate the gradients (:meth:`Table.check_gradients`), takes the step's
learning rate from it (:meth:`Table.lr`), updates the rows with that rate, and only then calls
:meth:`Table.advance`; the caches themselves never touch the schedule.

Thread safety: the step and the counters are plain ints changed by one stepping thread at a
time (the worker); readers in other threads (metadata writes between steps) see a whole int.
"""

from __future__ import annotations

import numpy as np

from ..config import NonFinitePolicy, TableConfig
from ..errors import NonFiniteGradientError, NonFiniteUpdateError
from ..keys.hashing import as_keys, mix64
from ..precision import RowPrecision
from .admission import CountingBloomFilter
from .codec import RowCodec, Rows
from .initializers import RowInitializer
from .optimizers import RowOptimizer

__all__ = ["Table", "TableCounters"]


def _first_bad(finite: np.ndarray) -> tuple[int, int]:
    """``(how many rows are not finite, the first one's position)``."""
    return int(np.count_nonzero(~finite)), int(np.argmin(finite))


_ROUNDING_SALT = np.uint64(0x5352_4F55_4E44_0001)


class TableCounters:
    """Per-table counters since the store was opened (see :class:`~damo_hybrid.store.StoreStats`)."""

    __slots__ = ("hits", "misses", "writes", "dropped_nonfinite", "dropped_unadmitted")

    def __init__(self) -> None:
        self.hits = self.misses = self.writes = 0
        self.dropped_nonfinite = self.dropped_unadmitted = 0


class Table:
    """Runtime state of one table.

    Args:
        tid: the table's numeric id in the storage.
        cfg: its config.
        step: its global step so far.
        rows: its stored row count so far.
        counters: admission counters to resume from (uint8), if the table has admission.
    """

    def __init__(self, tid: int, cfg: TableConfig, step: int = 0, rows: int = 0,
                 counters: np.ndarray | None = None) -> None:
        self.id = tid
        self.cfg = cfg
        self.name = cfg.name
        self.dim = cfg.dim
        self.init = RowInitializer(cfg.initializer, cfg.name, cfg.dim, zero_last=cfg.linear_column)
        self.opt = RowOptimizer(cfg.optimizer, cfg.dim)
        self.width = self.opt.width
        # the rounding stream's salt: the initializer's, moved off it so the two streams differ
        self.prec = RowPrecision(cfg.row_dtype, cfg.int16_step, int(mix64(self.init.salt ^ _ROUNDING_SALT)[0]))
        self.codec = RowCodec(cfg.name, cfg.dim, self.opt.width, self.prec)
        self.step = step
        self.rows = rows
        self.skip_nonfinite = cfg.nonfinite is NonFinitePolicy.SKIP
        adm = cfg.admission
        self.filter = CountingBloomFilter.from_config(adm, counters) if adm is not None else None
        self.min_count = adm.min_count if adm is not None else 0
        # whether admission applies to the keys this table is given: a double_hash table's
        # counters count raw keys instead (nn.batch_keys), and all its partition keys are in
        comp = cfg.compression
        self.admits = self.filter is not None and (comp is None or comp.kind.value != "double_hash")
        self.unadmitted_zeros = self.admits and adm is not None and adm.unadmitted_value == "zeros"
        self.counters = TableCounters()

    def new_rows(self, rows: Rows, keys: np.ndarray, new: np.ndarray, now: int) -> None:
        """Fill ``rows[new]`` as never-seen keys start: initial weights and state, count 0,
        created and updated ``now``.

        Args:
            rows: N rows, changed in place.
            keys: uint64 (N,) their keys.
            new: bool (N,) which rows to fill.
        """
        n = int(np.count_nonzero(new))
        if n:
            rows.weights[new] = self.initial_weights(keys[new])
            rows.state[new] = self.opt.initial_state(n)
            rows.count[new] = 0
            rows.created[new] = rows.updated[new] = now

    def initial_weights(self, keys: np.ndarray) -> np.ndarray:
        """float32 (N, dim): the weights keys ``uint64 (N,)`` start with, on the table's grid."""
        return self.prec.nearest(self.init(keys))

    def step_rows(self, rows: Rows, keys: np.ndarray, g: np.ndarray, lr: float, now: int) -> None:
        """One optimizer step of whole rows in place: count + 1, the update rule, the weights'
        rounding (16-bit tables), updated ``now``.

        Args:
            rows: U rows.
            keys: uint64 (U,) their keys.
            g: float32 (U, dim) summed gradients.
            lr: the step's learning rate.
        """
        rows.count += 1
        self.opt.update(rows.weights, rows.state, g, rows.count, lr)
        rows.weights = self.prec.stochastic(rows.weights, keys, rows.count)
        rows.updated[:] = now

    def lr(self, step: int | None = None) -> float:
        """The scheduled learning rate of the next step (or of ``step``).

        Raises:
            ValueError: a negative or non-integer ``step``.
        """
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0):
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        return self.opt.lr(self.step if step is None else int(step))

    def advance(self) -> None:
        """Count one applied step (call after the rows were updated, so a failed step does not count)."""
        self.step += 1

    def check_gradients(self, keys: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Validate one step's gradients against this table; changes nothing.

        Args:
            keys: uint64 (N,) (int64 read as the same bits).
            grads: float32 (N, dim).
        Returns:
            ``(keys uint64 (N,), grads, finite)``: ``finite`` is None when every row is finite,
            else bool (N,) the rows to keep (the ``skip`` policy); count the dropped ones with
            :meth:`count_dropped` once the step is applied.
        Raises:
            TypeError, ValueError: wrong dtype or shape.
            NonFiniteGradientError: a NaN/Inf row under the ``raise`` policy.
        """
        keys = as_keys(keys)
        if not isinstance(grads, np.ndarray):
            raise TypeError(f"grads must be a numpy float32 array, got {type(grads).__name__}")
        if grads.dtype != np.float32:
            raise TypeError(f"grads must have dtype float32, got {grads.dtype}")
        if grads.shape != (len(keys), self.dim):
            raise ValueError(f"grads must have shape ({len(keys)}, {self.dim}) for table {self.name!r}, got {grads.shape}")
        finite = np.isfinite(grads).all(axis=1)
        if finite.all():
            return keys, grads, None
        if not self.skip_nonfinite:
            bad, i = _first_bad(finite)
            raise NonFiniteGradientError(
                f"{bad} gradient row(s) of table {self.name!r} hold NaN or Inf (first at position {i}, "
                f"key {int(keys[i])}); nothing was written. Use nonfinite='skip' to drop such rows."
            )
        return keys, grads, finite

    def check_results(self, keys: np.ndarray, weights: np.ndarray, state: np.ndarray) -> np.ndarray | None:
        """Validate a step's results before they are stored; changes nothing.

        A finite gradient can still overflow a row (a huge learning rate, an accumulator past
        float32's range): such rows are never stored. Under the ``raise`` policy the whole
        step is refused; under ``skip`` the caller drops these rows (they keep their old value).

        Args:
            keys: uint64 (N,) the stepped rows' keys.
            weights: float32 (N, dim) and state float32 (N, state_width), the stepped values.
        Returns:
            None when every row is finite, else bool (N,) the rows to keep.
        Raises:
            NonFiniteUpdateError: a NaN/Inf result under the ``raise`` policy.
        """
        finite = np.isfinite(weights).all(axis=1) & np.isfinite(state).all(axis=1)
        if finite.all():
            return None
        if not self.skip_nonfinite:
            bad, i = _first_bad(finite)
            raise NonFiniteUpdateError(
                f"the step of table {self.name!r} would store NaN or Inf in {bad} row(s) (first key "
                f"{int(keys[i])}) at learning rate {self.lr():g}: the gradients are finite but the update "
                f"overflows {self.prec.dtype.value} (|w| <= {self.prec.max:g}); nothing was written. Lower the "
                "learning rate (or clip gradients"
                + (", or take a larger int16_step" if self.prec.dtype.value == "int16" else "")
                + "), or use nonfinite='skip' to drop such rows."
            )
        return finite

    def admit(self, ukeys: np.ndarray, occurrences: np.ndarray, count: bool = True) -> np.ndarray | None:
        """Which of a batch's distinct keys are admitted, counting this batch's occurrences.

        Args:
            ukeys: uint64 (U,) distinct keys.
            occurrences: int (U,) their occurrences in the batch.
            count: add the occurrences to the filter (a training batch); False only asks.
        Returns:
            bool (U,) admitted, or None for a table without admission (all are).
        """
        if not self.admits:
            return None
        admitted = self.filter.count(ukeys) + occurrences >= self.min_count  # type: ignore[union-attr]
        if count:
            self.filter.add(ukeys, occurrences)  # type: ignore[union-attr]
        return admitted

    def count_dropped(self, *masks: np.ndarray | None) -> None:
        """Count the rows ``skip`` decisions dropped (each mask: bool, the rows kept)."""
        for keep in masks:
            if keep is not None:
                self.counters.dropped_nonfinite += int(np.count_nonzero(~keep))
