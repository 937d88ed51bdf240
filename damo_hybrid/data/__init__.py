"""Stage 1 of the data flow: input files and synthetic data -> batches of keys.

- :mod:`.readers`: schema-declared CSV/TSV, Criteo, Avazu, MovieLens, libFM and parquet.
- :mod:`.stream`: the same delimited files streamed in blocks (flat memory, exact resume).
- :mod:`.synthetic`: the Criteo-like generator used for scale.
- :mod:`.metrics`: AUC and logloss.

Pure data; a reader runs in the loader thread.
"""

from .metrics import auc, logloss
from .readers import FORMATS, OnError, Schema, TabularData, read_dataset
from .source import EndOfData, StreamSource
from .stream import DelimitedStream, Position
from .synthetic import Batch, SyntheticCriteo

__all__ = ["FORMATS", "Batch", "DelimitedStream", "EndOfData", "OnError", "Position", "Schema", "StreamSource",
           "SyntheticCriteo", "TabularData", "auc", "logloss", "read_dataset"]
