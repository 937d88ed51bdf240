"""Quality parity on the shared real datasets: damo_hybrid vs in-memory torch embeddings.

    python benchmarks/quality/run.py --data-root ../shared/data --out bench_out/quality.json

Same as ``damo-hybrid bench --quality``. See :mod:`damo_hybrid.bench.quality` for the protocol.
"""

from __future__ import annotations

import sys

from damo_hybrid.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--quality", *sys.argv[1:]]))
