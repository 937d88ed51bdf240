"""Fault injection. Here: kill -9 at random points, a real full disk, bad input files.
Elsewhere: concurrent open and corrupt values (test_rocksdb_store), NaN/Inf gradients
(test_store_contract, test_host_cache), a failing pipeline stage and Ctrl-C (test_pipeline)."""
