"""Stage 3 of the data flow: the ``torch.nn.Module`` users put in their models.

- :mod:`.collection`: :class:`EmbeddingCollection`, per-field lookups and pooled bags over
  rows the store's cache tiers make resident, and the sparse optimizer step.
- :mod:`.models`: DeepFM, Wide & Deep, DCN-v2 and DLRM on one shared sparse base.

Thread safety: a collection's ``prepare`` runs in the host-manager thread, everything else in
the worker's; see :mod:`.collection`.
"""

from .collection import EmbeddingCollection, Feature, PreparedBatch

__all__ = ["EmbeddingCollection", "Feature", "PreparedBatch"]
