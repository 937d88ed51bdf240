"""GPU tier benchmark: all rows in HBM vs damo_hybrid's device cache vs CPU-only.

Same as ``damo-hybrid bench --gpu``; see :mod:`damo_hybrid.bench.gpu`. Example (an H100/H200):

    python benchmarks/gpu_bench.py --gpu-rows 100000000 --gpu-batches 8192,65536 \
        --json gpu.json --trace-dir traces
"""

import sys

from damo_hybrid.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--gpu", *sys.argv[1:]]))
