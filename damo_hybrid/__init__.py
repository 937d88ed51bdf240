"""damo_hybrid: train CTR models whose embedding tables are larger than memory.

Every embedding row lives in RocksDB on local disk, keyed by a uint64 feature
hash per table; any key is valid, so new ids never fail.
"""

from .config import (
    AdmissionConfig,
    ExpiryConfig,
    InitializerConfig,
    OptimizerConfig,
    ScheduleConfig,
    StoreConfig,
    TableConfig,
)
from .errors import DamoHybridError
from .keys.compression import CompressionConfig
from .keys.hashing import hash_feature
from .precision import RowDtype
from .storage.backend import MemoryStorage
from .store import EmbeddingStore, StoreStats

__version__ = "0.1.0"

__all__ = [
    "AdmissionConfig",
    "CompressionConfig",
    "DamoHybridError",
    "EmbeddingStore",
    "ExpiryConfig",
    "InitializerConfig",
    "MemoryStorage",
    "OptimizerConfig",
    "RowDtype",
    "ScheduleConfig",
    "StoreConfig",
    "StoreStats",
    "TableConfig",
    "hash_feature",
]
