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
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

__all__ = ["Ranks", "distributed_run", "launch_local_ranks"]


@dataclass
class Ranks:
    """This process's place in the run."""

    rank: int
    world: int

    def part(self, batch_fn: Callable[[int], Any] | None) -> Callable[[int], Any] | None:
        """``batch_fn`` reduced to this rank's rows of each global batch."""
        if batch_fn is None:
            return None
        rank, world = self.rank, self.world

        def mine(i: int) -> Any:
            b = batch_fn(i)
            n = len(b.label)
            s = slice(rank * n // world, (rank + 1) * n // world)
            return type(b)({f: k[s] for f, k in b.sparse.items()}, b.dense[s], b.label[s])
        return mine

    def has_checkpoint(self, root: Path) -> bool:
        """Whether ``root`` holds a complete sharded checkpoint."""
        from ..dist.checkpoint import latest_sharded_checkpoint

        return latest_sharded_checkpoint(root) is not None

    def latest(self, root: Path) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete sharded checkpoint under ``root`` and its trainer state, or None."""
        from ..dist.checkpoint import latest_sharded_checkpoint
        from ..pipeline.checkpoint import load_trainer_state

        found = latest_sharded_checkpoint(root)
        return None if found is None else (found[0], load_trainer_state(found[0]))

    def restore(self, ck: Path, dest: Path, config: Any) -> None:
        """This rank's store at ``dest`` (a new directory) from sharded checkpoint ``ck``, saved by
        this number of ranks (a copy of the shard) or another (the rows re-sharded)."""
        from ..dist.checkpoint import restore_shard

        restore_shard(ck, dest, self.rank, self.world, config).close()


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
    for a in args.argv:  # every option but --nproc
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    # each rank runs once: a trailing --nproc 1 wins over a config file's nproc and an abbreviation
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           "-m", "damo_hybrid.cli", *argv, "--nproc", "1"]
    proc = subprocess.Popen(cmd)
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

    ``--resume`` restores every rank from the newest complete sharded checkpoint, on this or
    another number of ranks (:func:`damo_hybrid.dist.checkpoint.restore_shard`).
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
