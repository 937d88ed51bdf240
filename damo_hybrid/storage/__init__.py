"""Stage 4 of the data flow (and the bottom tier): rows on disk.

- :mod:`.backend`: the :class:`Storage` protocol (byte values by (table id, key)) and
  :class:`MemoryStorage`, the dict reference model every test compares RocksDB against.
- :mod:`.rocksdb`: :class:`RocksDBStorage`, rows in RocksDB through rocksdict.
- :mod:`.rowio`: encoded row I/O of whole batches; the only code that touches a Storage.
- :mod:`.meta`: the table registry on disk (``meta.json``, admission counters).
- :mod:`.maintenance`: expiry and dumps over a table's stored rows.
- :mod:`.checkpoint`: atomic checkpoints and restores.
- :mod:`.files`: crash-safe file writes.

The :class:`~damo_hybrid.store.EmbeddingStore` facade composes these with the cache tiers.
"""

from .backend import MemoryStorage, Storage, encode_keys
from .rocksdb import RocksDBStorage

__all__ = ["MemoryStorage", "RocksDBStorage", "Storage", "encode_keys"]
