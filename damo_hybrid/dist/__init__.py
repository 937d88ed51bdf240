"""Scale-out on ``torch.distributed``: tables sharded by key over ranks (each rank owns its shard in
its own store), rows and gradients exchanged by all-to-all, the dense layers data-parallel.

- :mod:`~damo_hybrid.dist.sharding`: which rank owns a key.
- :mod:`~damo_hybrid.dist.exchange`: variable-length all-to-all over a process group.
- :mod:`~damo_hybrid.dist.collection`: :class:`ShardedEmbeddingCollection`, the
  :class:`~damo_hybrid.nn.EmbeddingCollection` API over the shards.
- :mod:`~damo_hybrid.dist.checkpoint`: sharded checkpoints, restorable onto any number of ranks.
- :mod:`~damo_hybrid.dist.data`: a stream split over the ranks by file, their data ending together.
"""

from .checkpoint import latest_sharded_checkpoint, restore_shard, save_sharded_checkpoint
from .collection import ShardedBatch, ShardedEmbeddingCollection
from .sharding import SHARD_FILE, SHARDING_VERSION, claim_shard, shard_of, split_by_owner

__all__ = ["ShardedEmbeddingCollection", "ShardedBatch", "SHARDING_VERSION", "SHARD_FILE", "shard_of", "split_by_owner",
           "claim_shard", "save_sharded_checkpoint", "latest_sharded_checkpoint", "restore_shard"]
