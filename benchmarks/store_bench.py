"""Store benchmark script; same as ``damo-hybrid bench``.

    python benchmarks/store_bench.py --rows 10000000 --dims 16,64 --batches 4096,65536
"""

import sys

from damo_hybrid.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
