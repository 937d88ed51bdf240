"""``damo-hybrid train`` launched by ``torchrun``: one rank of a run whose tables are sharded.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous (``MASTER_ADDR``,
``MASTER_PORT``). With ``WORLD_SIZE`` above 1, :func:`distributed_run` joins the process group
(gloo on the CPU, NCCL with CUDA), gives this rank its own store under ``--store``
(``rank-RRRRR-of-WWWWW``) with the checkpoints of all ranks under one directory (``--store``'s
``.ckpt``, or ``--checkpoint-dir``), hands it its slice of every global batch of
``--batch-size`` rows, and lets rank 0 alone print.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

__all__ = ["Ranks", "distributed_run", "launch_local_ranks", "check_store_root", "LAUNCHED"]

#: set in the environment of the ranks that ``train --nproc N`` launches
LAUNCHED = "DAMO_HYBRID_LOCAL_RANKS"

_RANK_DIR = re.compile(r"^rank-(\d{5})-of-(\d{5})$")


@dataclass
class Ranks:
    """This process's place in the run."""

    rank: int
    world: int

    def part(self, batch_fn: Callable[[int], Any] | None) -> Callable[[int], Any] | None:
        """``batch_fn`` reduced to this rank's rows of each global batch."""
        if batch_fn is None or getattr(batch_fn, "own_part", False):  # a stream of this rank's own part
            return batch_fn
        rank, world = self.rank, self.world

        def mine(i: int) -> Any:
            b = batch_fn(i)
            n = len(b.label)
            s = slice(rank * n // world, (rank + 1) * n // world)
            return type(b)({f: k[s] for f, k in b.sparse.items()}, b.dense[s], b.label[s])
        return mine

    def clear_other_worlds(self, root: Path) -> None:
        """Once every rank has built its copy of the checkpoint beside its store in ``root`` (the
        ``--store``): rank 0 deletes what the checkpoint supersedes there, a one-process store and
        the rank stores of a run on another number of ranks, so that the run's stores read as one
        afterwards; every rank waits for the copies before, and for rank 0 after."""
        import torch.distributed as dist

        from ..dist.exchange import lost_rank_as_error

        with lost_rank_as_error("restore's barrier"):
            dist.barrier()  # nothing is deleted before every rank's new state is in place
        if self.rank == 0 and root.is_dir():
            if (root / "meta.json").exists():  # a one-process store: its files go, the ranks' copies stay
                aside = root.with_name(f".{root.name}.one-process")
                shutil.rmtree(aside, ignore_errors=True)
                aside.mkdir()
                for p in sorted(root.iterdir(), key=lambda p: p.name != "meta.json"):  # no longer a store first
                    if not (_RANK_DIR.match(p.name) or p.name.startswith(".rank-")):
                        p.rename(aside / p.name)
                shutil.rmtree(aside)
            for p in root.iterdir():
                m = _RANK_DIR.match(p.name)
                if m and int(m.group(2)) != self.world:
                    shutil.rmtree(p)
        with lost_rank_as_error("restore's barrier"):
            dist.barrier()


def check_store_root(store_dir: Path, ranks: Ranks | None) -> None:
    """Refuse to start a run (not restored from a checkpoint) on a ``--store`` of the other kind.

    Raises:
        ValueError: ranks given a one-process store, or one process given a sharded run's stores.
    """
    root = store_dir.parent if ranks is not None else store_dir
    if ranks is not None and (root / "meta.json").exists():
        raise ValueError(f"--store {root} holds a one-process store, and this run is on {ranks.world} ranks: give it "
                         "another --store, or --resume from a checkpoint of that store (it re-shards the rows)")
    if ranks is None and root.is_dir() and any(_RANK_DIR.match(p.name) for p in root.iterdir()):
        raise ValueError(f"--store {root} holds a sharded run's stores: run on its number of ranks (--nproc), "
                         "or --resume from its checkpoint (the rows are merged), or give another --store")


def launch_local_ranks(args: argparse.Namespace) -> int:
    """``train --nproc N``: the same command on N local ranks, launched by torchrun with a standalone
    rendezvous; returns torchrun's exit status. An interrupt (Ctrl-C, SIGTERM) is passed on as
    SIGTERM, on which torchrun stops its ranks and each flushes what it trained.

    Raises:
        ValueError: already one rank of a torchrun launch.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--nproc under torchrun: torchrun already launched the ranks; drop --nproc")
    argv, skip = [], False
    for a in args.argv:  # every option but --nproc (or its abbreviation): torchrun's parser refuses them
        name = a.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) >= 4 and "--nproc".startswith(name):
            skip = "=" not in a
        else:
            argv.append(a)
    cmd = [sys.executable, "-m", "damo_hybrid.cli.torchrun", "--standalone", "--nproc-per-node", str(args.nproc),
           "-m", "damo_hybrid.cli", *argv]  # torchrun, with one line for a rank's failure (cli.torchrun)
    # each rank runs once, whatever --nproc a config file gives it
    proc = subprocess.Popen(cmd, env={**os.environ, LAUNCHED: str(args.nproc)})
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise


@contextlib.contextmanager
def distributed_run(args: argparse.Namespace) -> Iterator[Ranks | None]:
    """Join the torchrun process group when there is one of more than one rank (see the module doc);
    None (and nothing changed) otherwise.

    ``--resume`` restores every rank from the newest complete checkpoint, a sharded run's on this
    or another number of ranks or one process's (:func:`damo_hybrid.dist.checkpoint.restore_shard`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield None
        return
    import torch
    import torch.distributed as dist

    from ..ops import Backend, resolve_backend

    cuda = resolve_backend(args.backend) is Backend.CUDA
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=600))
    ranks = Ranks(dist.get_rank(), dist.get_world_size())
    try:
        if args.store:
            root = Path(args.store)
            if not args.checkpoint_dir:  # one directory for every rank's part of a checkpoint
                args.checkpoint_dir = str(root.with_name(root.name + ".ckpt"))
            args.store = str(root / f"rank-{ranks.rank:05d}-of-{ranks.world:05d}")
        if ranks.rank:
            args.quiet, args.json = True, None
        out = contextlib.redirect_stdout(io.StringIO()) if ranks.rank else contextlib.nullcontext()
        with out:
            yield ranks
    finally:
        dist.destroy_process_group()
