"""Stage 1 of the data flow: input files and synthetic data -> batches of keys.

- :mod:`.readers`: ``read_dataset``, a whole file by format name: schema-declared CSV/TSV, Criteo, Avazu,
  MovieLens (:mod:`.delimited`), libFM (:mod:`.libfm`) and parquet (:mod:`.parquet`), into a
  :class:`.tabular.TabularData`; :mod:`.schema`: the columns of a file and the built-in formats.
- :mod:`.stream`: the same delimited files streamed in blocks (flat memory, exact resume).
- :mod:`.synthetic`: the Criteo-like generator used for scale.
- :mod:`.metrics`: AUC and logloss.

Pure data; a reader runs in the loader thread.
"""

from .metrics import auc, logloss
from .readers import read_dataset
from .schema import FORMATS, OnError, Schema
from .source import EndOfData, StreamSource
from .stream import DelimitedStream, Position
from .synthetic import Batch, SyntheticCriteo
from .tabular import TabularData

__all__ = ["FORMATS", "Batch", "DelimitedStream", "EndOfData", "OnError", "Position", "Schema", "StreamSource",
           "SyntheticCriteo", "TabularData", "auc", "logloss", "read_dataset"]
