"""Child process of ``test_write_interrupts.py``: runs one write of the package with a signal
armed at the ``nth`` call of ``hook`` (``module:attr`` or ``module:Class.method``, as in
``_kill_child.arm``), sent just before that call is made. ``nth`` 0 arms nothing (the reference
run). Exits with the write's own status (0, or the CLI's) if the hook never fired.

    python _write_child.py HOOK NTH SIGNAL WRITER ARGS...

Writers: ``dump STORE OUT`` (npz), ``seed STORE OUT`` (the seed's 1.0 dump), ``cli ARGV...``
(``damo-hybrid ARGV``), ``damo-checkpoint DIR OUT`` (one more push, then ``Damo.checkpoint``),
``damo-load DIR FILE`` (``Damo.load``), ``pystorage-restore DIR CKPT``
(``PyStorage.load_from_checkpoint``), ``close DIR`` (a step, then the store's close: its meta
files), ``save-model SRC WORKDIR OUT`` (``load_model(SRC)``, a step, ``save_model(OUT)``).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import numpy as np

DAMO = {"ttl": 0, "embeddings": [{"dim": 4, "group": 0, "optimizer": {"name": "sgd", "gamma": 0.5}}]}
KEYS = np.arange(1, 65, dtype=np.int64)


def push(d, scale: float) -> None:
    d.push(0, KEYS, np.full((len(KEYS), 4), scale, np.float32))


def run(writer: str, args: list[str], armed: Callable[[], None]) -> int:
    if writer in ("dump", "seed"):
        from damo_hybrid import EmbeddingStore

        with EmbeddingStore(args[0], read_only=True) as s:
            armed()
            if writer == "dump":
                s.dump(args[1])
            else:
                from damo_hybrid.compat.seed_format import dump_seed_format

                dump_seed_format(s, args[1])
        return 0
    if writer == "cli":
        from damo_hybrid.cli import main

        armed()
        return main(args)
    if writer in ("damo-checkpoint", "damo-load"):
        from damo_hybrid.compat import Damo

        with Damo({"dir": args[0], **DAMO}) as d:
            if writer == "damo-checkpoint":
                push(d, 1.0)
                armed()
                d.checkpoint(args[1])
            else:
                armed()
                d.load(args[1])
        return 0
    if writer == "pystorage-restore":
        import damo_hybrid.compat as damo

        with damo.PyStorage(args[0]) as s:
            armed()
            s.load_from_checkpoint(args[1])
        return 0
    if writer == "close":
        from damo_hybrid import AdmissionConfig, EmbeddingStore, OptimizerConfig, TableConfig

        tables = [TableConfig("t", 4, optimizer=OptimizerConfig.sgd(0.5), admission=AdmissionConfig(min_count=1))]
        s = EmbeddingStore(args[0], tables)
        s.apply_gradients("t", KEYS.view(np.uint64) + np.uint64(1000), np.ones((len(KEYS), 4), np.float32))
        armed()
        s.close()
        return 0
    if writer == "save-model":
        import torch

        from damo_hybrid.compat.torch import load_model, save_model

        torch.manual_seed(0)
        model = load_model(args[0], workdir=args[1])
        ids = torch.arange(1, 31).view(10, 3)
        model.train()
        model(ids).pow(2).mean().backward()  # the rows step in backward
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25)
        armed()
        save_model(model, args[2])
        return 0
    raise SystemExit(f"unknown writer {writer}")


if __name__ == "__main__":
    from _kill_child import arm  # this file's folder is the script's first import path

    hook, nth, sig, writer, *rest = sys.argv[1:]
    sys.exit(run(writer, rest, lambda: arm(hook, int(nth), getattr(signal, sig))))
