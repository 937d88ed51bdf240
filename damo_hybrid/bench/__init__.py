"""Benchmark harnesses behind ``damo-hybrid bench``; nothing in the library imports them.

- :mod:`.store`: store lookup/apply keys/s straight from RocksDB.
- :mod:`.train`: training throughput against in-memory torch embeddings.
- :mod:`.gpu`: the GPU tier against every row in accelerator memory.
- :mod:`.quality`: AUC/logloss parity with in-memory torch on the shared real datasets.
- :mod:`.baseline`: the in-memory torch embeddings those comparisons train against.
"""
