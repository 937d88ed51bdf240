"""Stage 1 of the data flow: feature values -> uint64 keys.

:func:`hash_feature` turns ints, strings or bytes of one field into stable, vectorized
uint64 keys; :func:`as_keys` validates key arrays at every public entry point. Pure
functions, safe from any thread.
"""

from .hashing import as_keys, fnv1a64, hash_feature, mix64

__all__ = ["as_keys", "fnv1a64", "hash_feature", "mix64"]
