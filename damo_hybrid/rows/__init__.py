"""What a row is and how it changes: codec, initializers, optimizers and schedules, admission.

- :mod:`.codec`: :class:`Rows` (weights, optimizer state, count, times) and the checksummed
  byte format one row is stored in.
- :mod:`.initializers`: a new key's row, a pure function of (seed, table, key).
- :mod:`.optimizers`: row-wise update rules, their state layout and learning-rate schedules.
- :mod:`.admission`: the counting Bloom filter behind frequency admission.
- :mod:`.table`: :class:`Table`, one table at run time and the one owner of its global step.

Everything here works on numpy batches and holds no I/O; see :mod:`.table` for threads.
"""

from .codec import RowCodec, Rows
from .initializers import RowInitializer
from .optimizers import RowOptimizer, state_width
from .table import Table

__all__ = ["RowCodec", "RowInitializer", "RowOptimizer", "Rows", "Table", "state_width"]
