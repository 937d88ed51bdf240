"""Draw the benchmark plots (PNG, into benchmarks/) from the JSON the benchmarks write.

    python benchmarks/plots.py --train bench_out/train_sweep.json --soak bench_out/soak.json

``--compression``: ``damo-hybrid bench --compression --json FILE``: AUC against bytes per dataset.
``--gpu``: ``damo-hybrid bench --gpu --json FILE``: samples/s of the three sides and the stage
timeline of a device-cache run.
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


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def train_plots(res: dict, out: Path, machine: str) -> list[Path]:
    plt = _plt()
    ok = [r for r in res["damo"] if "error" not in r]
    runs = sorted((r for r in ok if r.get("storage", "rocksdb") == "rocksdb"), key=lambda r: r["fraction"])
    ceiling = sorted((r for r in ok if r.get("storage") == "memory"), key=lambda r: r["fraction"])
    x = [100 * r["fraction"] for r in runs]
    torch_sps = res["torch"]["samples_per_s"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(x, [r["samples_per_s"] for r in runs], "o-", label="damo_hybrid (RocksDB + host cache)")
    if ceiling:  # bench --train --storages rocksdb,memory: the same run with the rows in a dict
        ax.plot([100 * r["fraction"] for r in ceiling], [r["samples_per_s"] for r in ceiling], "^--",
                color="tab:green", label="rows in memory instead of RocksDB (ceiling)")
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
    p1 = _save(plt, fig, out / "cache_budget.png")

    fig, ax = plt.subplots(figsize=(9.0, 4.6))
    # per step, in steady state, each stage's time in its own thread: host manager, writer, worker
    groups = [("host manager", ("dedup", "index", "victims", "evict", "overlay", "rocksdb_read", "decode", "init")),
              ("writer", ("encode", "rocksdb_write")),
              ("worker", ("forward", "backward", "sparse_step", "dense_step"))]  # split: the dense forward in backward
    width = 0.26
    for gi, (gname, stages) in enumerate(groups):
        bottom = [0.0] * len(runs)
        pos = [i + (gi - 1) * width for i in range(len(runs))]
        for s in stages:
            v = [r["per_step_ms"][s] for r in runs]
            ax.bar(pos, v, width, bottom=bottom, label=f"{gname}: {s}")
            bottom = [b + vi for b, vi in zip(bottom, v)]
    ax.axhline(1000 * 4096 / torch_sps, color="grey", ls="--", label="in-memory torch, whole step")
    ax.set_xticks(range(len(runs)), [f"{xi:g}%" for xi in x])
    ax.set_ylabel("ms per step (each stage in its own thread)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("host-cache budget")
    ax.set_title(f"Steady-state step: host manager, writer and worker, by stage\n{machine}", fontsize=9)
    p2 = _save(plt, fig, out / "stage_breakdown.png")
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
    p1 = _save(plt, fig, out / "soak_rss.png")

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
    p2 = _save(plt, fig, out / "soak_throughput.png")
    return [p1, p2]


_LANES = {"load": (0, "loader thread"), "prepare": (1, "host manager"), "compute": (2, "worker: forward+backward"),
          "apply": (3, "worker: sparse+dense step")}


def gpu_plots(res: dict, out: Path, machine: str) -> list[Path]:
    """Throughput of the three sides per (model, batch), and the stage timeline of the first device run."""
    plt = _plt()
    runs = res["runs"]
    sides = [s for s in ("hbm", "device", "cpu") if any(s in r for r in runs)]
    labels = {"hbm": "all rows in HBM (torch)", "device": f"damo device cache {res['device_fraction']:.0%}",
              "cpu": "damo CPU-only"}
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.8 / len(sides)
    for j, side in enumerate(sides):
        xs = [i + j * w for i, r in enumerate(runs) if side in r]
        ax.bar(xs, [r[side]["samples_per_s"] for r in runs if side in r], w, label=labels[side])
    ax.set_xticks([i + w * (len(sides) - 1) / 2 for i in range(len(runs))],
                  [f"{r['model']}\nbatch {r['batch_size']:,}" for r in runs])
    ax.set_ylabel("samples/s (median)")
    ax.set_title(f"GPU tier: {res['rows']:,}-row tables\n{machine}", fontsize=9)
    ax.legend(fontsize=8)
    p1 = _save(plt, fig, out / "gpu_tiers.png")
    made = [p1]
    run = next((r for r in runs if r.get("device", {}).get("timeline")), None)
    if run is not None:
        fig, ax = plt.subplots(figsize=(8, 2.8))
        colors = {"load": "tab:blue", "prepare": "tab:orange", "compute": "tab:green", "apply": "tab:red"}
        for stage, t0, t1 in run["device"]["timeline"]:
            lane, _ = _LANES[stage]
            ax.broken_barh([(1e3 * t0, 1e3 * (t1 - t0))], (lane - 0.4, 0.8), color=colors[stage])
        ax.set_yticks([v[0] for v in _LANES.values()], [v[1] for v in _LANES.values()])
        ax.invert_yaxis()
        ax.set_xlabel("ms")
        ax.set_title(f"Stage timeline, {run['model']} batch {run['batch_size']:,}, device-cache run "
                     f"({run['device']['backend']})\n{machine}", fontsize=9)
        p2 = _save(plt, fig, out / "gpu_timeline.png")
        made.append(p2)
    return made


def merge_studies(studies: list[dict]) -> dict:
    """Several compression studies as one: per dataset, the first study's runs, then the others'
    runs of methods not seen yet (each study's own full-table run is its baseline; the first one's
    is kept)."""
    out = json.loads(json.dumps(studies[0]))
    for st in studies[1:]:
        for name, d in st["datasets"].items():
            mine = out["datasets"].setdefault(name, d)
            if mine is d:
                continue
            seen = {r["method"] for r in mine["runs"]}
            mine["runs"] += [r for r in d["runs"] if r["method"] not in seen]
    return out


def compression_plot(res: dict, out: Path, machine: str) -> list[Path]:
    """AUC against bytes of embedding state (log x), one panel per dataset, one line per method."""
    plt = _plt()
    names = list(res["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.6), squeeze=False)
    styles = {"hashing": "o--", "qr_mult": "s-", "qr_concat": "^-", "binary_code": "d-", "double_hash": "v-", "dhe": "x-",
              "float16": "P", "bfloat16": "X", "int16": "h"}
    for ax, name in zip(axes[0], names):
        runs = res["datasets"][name]["runs"]
        full = next(r for r in runs if r["method"] == "full")
        ax.axhline(full["auc"], color="grey", ls=":", label="full table")
        ax.plot([full["bytes"]], [full["auc"]], "k*", ms=9)
        for m, st in styles.items():
            pts = sorted((r["bytes"], r["auc"]) for r in runs if r["method"] == m)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], st, label=m, ms=4)
        ax.set_xscale("log")
        ax.set_title(f"{name} ({res['datasets'][name]['vocab']:,} ids)", fontsize=9)
        ax.set_xlabel("bytes of embedding state")
    axes[0][0].set_ylabel("held-out AUC (mean of seeds)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Compressed tables: quality against bytes (DeepFM, dim 16)\n{machine}", fontsize=9)
    return [_save(plt, fig, out / "compression.png")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", help="JSON of damo-hybrid bench --train --json")
    p.add_argument("--soak", help="JSON of benchmarks/soak.py --out")
    p.add_argument("--gpu", help="JSON of damo-hybrid bench --gpu --json")
    p.add_argument("--compression", help="JSON of damo-hybrid bench --compression --json (several, comma-separated: "
                                         "their runs are drawn together, the first file's full table kept)")
    p.add_argument("--machine", default="2 CPUs, 24 GiB RAM, local disk, no GPU")
    p.add_argument("--out", default=str(HERE))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    if a.train:
        made += train_plots(json.loads(Path(a.train).read_text()), out, a.machine)
    if a.soak:
        made += soak_plots(json.loads(Path(a.soak).read_text()), out, a.machine)
    if a.gpu:
        made += gpu_plots(json.loads(Path(a.gpu).read_text()), out, a.machine)
    if a.compression:
        made += compression_plot(merge_studies([json.loads(Path(f).read_text()) for f in a.compression.split(",")]),
                                 out, a.machine)
    for m in made:
        print(f"wrote {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
