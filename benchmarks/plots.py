"""Draw the benchmark plots (PNG, into benchmarks/) from the JSON the benchmarks write.

    python benchmarks/plots.py --train bench_out/train_sweep.json --soak bench_out/soak.json

``--train``: ``damo-hybrid bench --train --fractions ... --json FILE``: throughput and hit rate
against cache budget, and the step-time breakdown by stage. ``--soak``: ``benchmarks/soak.py
--out FILE``: resident memory and throughput over the soak. Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("plots need matplotlib: pip install 'damo-hybrid[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def train_plots(res: dict, out: Path, machine: str) -> list[Path]:
    plt = _plt()
    runs = sorted((r for r in res["damo"] if "error" not in r), key=lambda r: r["fraction"])
    x = [100 * r["fraction"] for r in runs]
    torch_sps = res["torch"]["samples_per_s"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(x, [r["samples_per_s"] for r in runs], "o-", label="damo_hybrid (RocksDB + host cache)")
    ax.axhline(torch_sps, color="grey", ls="--", label=f"in-memory torch ({torch_sps:,.0f})")
    ax.set_xlabel("host-cache budget, % of the in-memory table's bytes")
    ax.set_ylabel("samples/s (median)")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(x, [r["hit_rate"] for r in runs], "s:", color="tab:orange", label="hit rate")
    ax2.set_ylabel("cache hit rate")
    ax2.set_ylim(0, 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    ax.set_title(f"DeepFM training throughput vs cache budget\n{machine}", fontsize=9)
    fig.tight_layout()
    p1 = out / "cache_budget.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    stages = ("load", "prepare", "compute", "apply")
    steps = res["steps"]
    bottom = [0.0] * len(runs)
    for s in stages:
        v = [1000 * r["stage_s"][s] / steps for r in runs]
        ax.bar([f"{xi:g}%" for xi in x], v, bottom=bottom, label=s + (" (host manager, overlapped)" if s == "prepare"
                                                                     else " (loader, overlapped)" if s == "load" else ""))
        bottom = [b + vi for b, vi in zip(bottom, v)]
    ax.set_xlabel("host-cache budget")
    ax.set_ylabel("ms per step, summed per stage")
    ax.legend(fontsize=8)
    ax.set_title(f"Step time by pipeline stage\n{machine}", fontsize=9)
    fig.tight_layout()
    p2 = out / "stage_breakdown.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def soak_plots(res: dict, out: Path, machine: str) -> list[Path]:
    plt = _plt()
    s = res["samples"]
    keys = [x["distinct_keys"] / 1e6 for x in s]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(keys, [x["rss_anon_mb"] for x in s], label="anonymous RSS (cache, RocksDB memtables/block cache, Python)")
    ax.plot(keys, [x["rss_file_mb"] for x in s], label="mapped SST pages (page cache, reclaimable)")
    ax.axhline(res["cache_mb"], color="grey", ls="--", label=f"cache budget {res['cache_mb']:,.0f} MiB")
    ax.set_xlabel("distinct keys streamed (millions)")
    ax.set_ylabel("MiB")
    ax.legend(fontsize=7)
    ax.set_title(f"Soak: resident memory\n{machine}", fontsize=9)
    fig.tight_layout()
    p1 = out / "soak_rss.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(keys, [x["keys_per_s"] / 1e3 for x in s], label="keys/s (thousands, median per sample)")
    ax.set_xlabel("distinct keys streamed (millions)")
    ax.set_ylabel("thousand keys/s")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(keys, [x["compacting_share"] for x in s], color="tab:red", alpha=0.5, label="share of steps with a compaction running")
    ax2.set_ylim(0, 1.05)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    ax.set_title(f"Soak: throughput and RocksDB compaction\n{machine}", fontsize=9)
    fig.tight_layout()
    p2 = out / "soak_throughput.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", help="JSON of damo-hybrid bench --train --json")
    p.add_argument("--soak", help="JSON of benchmarks/soak.py --out")
    p.add_argument("--machine", default="2 CPUs, 24 GiB RAM, local disk, no GPU")
    p.add_argument("--out", default=str(HERE))
    a = p.parse_args(argv)
    out = Path(a.out)
    made = []
    if a.train:
        made += train_plots(json.loads(Path(a.train).read_text()), out, a.machine)
    if a.soak:
        made += soak_plots(json.loads(Path(a.soak).read_text()), out, a.machine)
    for m in made:
        print(f"wrote {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
