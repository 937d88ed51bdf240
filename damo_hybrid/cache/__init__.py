"""Stage 2 of the data flow: the tiers that make a batch's rows resident.

- :mod:`.keyindex`: vectorized uint64 -> slot hash index.
- :mod:`.slots`: :class:`SlotPool`, slot bookkeeping (free list, pins, CLOCK) shared by tiers.
- :mod:`.host`: :class:`HostCache`, the host-memory tier.
- :mod:`.device`: :class:`DeviceCache`, the accelerator tier above it (imports torch).
- :mod:`.writer`: :class:`WriteBehind`, background write-back of evicted rows.
- :mod:`.tiers`: :class:`TableTiers`, one table's tiers, owned by the store.

Who may touch what is stated in each module; in short, the host manager thread changes
residency under the table's tier lock, the worker steps and unpins pinned rows, and the
writer thread only writes.
"""

from .host import CacheStats, HostCache
from .tiers import TableTiers
from .writer import WriteBehind

__all__ = ["CacheStats", "HostCache", "TableTiers", "WriteBehind"]
