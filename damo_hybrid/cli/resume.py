"""``train --resume``: find the newest checkpoint that verifies, check that it belongs to this run,
and put its copy of the store in place of ``--store`` without a moment where no usable store exists.

A run's identity (:func:`run_identity`) is every option that changes what the run computes: the
model, the data and how it is read, the batch size, the seed, the dense learning rate, the store.
A checkpoint records it; a resume whose options differ is refused with one line naming each value
of both, unless ``--allow-run-change`` is given (then each difference is printed). A checkpoint
written before identities were recorded is resumed as before.

The store swap: the checkpoint's copy is built in ``.<store>.restoring`` beside the store, then the
old store is renamed ``.<store>.old`` and the copy renamed into place, with SIGINT and SIGTERM held
back between the two renames. A ``kill -9`` between them leaves the old store at ``.<store>.old``,
which :func:`recover_swap` (run at the start of every ``train --store``) puts back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigConflictError, DamoHybridError
from ..storage.files import aside_path, recover_dir, swap_dir

__all__ = ["run_identity", "check_identity", "recover_swap", "swap_in", "staging_dir", "IDENTITY_OVERRIDE"]

IDENTITY_OVERRIDE = "--allow-run-change"
_VALUE_CHARS = 80  # a value longer than this (a long path) is cut in messages


def run_identity(args: argparse.Namespace, store_root: Path) -> dict[str, Any]:
    """What a run computes depends on, keyed by the option that sets it (``store`` is the
    ``--store`` given, resolved: the ranks' stores live under it)."""
    ident: dict[str, Any] = {
        "--store": str(store_root.resolve()),
        "--model": args.model,
        "--dim": args.dim,
        "--dense-mode": args.dense_mode,
        "--batch-size": args.batch_size,
        "--seed": args.seed,
        "--dense-lr": args.dense_lr,
        "--min-count": args.min_count,
    }
    if args.data:
        ident.update({"--data": os.path.realpath(args.data), "--format": args.format, "--stream": bool(args.stream),
                      "--shuffle-buffer": args.shuffle_buffer, "--eval-fraction": args.eval_fraction})
        if getattr(args, "schema", None):  # a csv/parquet file's columns, from --config
            ident["[schema]"] = json.dumps(args.schema, sort_keys=True, default=str)
    else:
        ident.update({"--data": "synthetic", "--vocab-min": args.vocab_min, "--vocab-max": args.vocab_max})
    return ident


def _show(v: Any) -> str:
    s = "on" if v is True else "off" if v is False else str(v)
    return s if len(s) <= _VALUE_CHARS else "..." + s[-(_VALUE_CHARS - 3):]


def check_identity(ck: Path, saved: dict[str, Any] | None, current: dict[str, Any], allow: bool,
                   log: Callable[[str], None]) -> None:
    """Refuse to resume checkpoint ``ck`` (whose run had identity ``saved``) with a run of identity
    ``current`` where they differ, unless ``allow``; then print each difference through ``log``.

    The store counts only where ``current``'s store exists: restoring into a new folder moves the run.

    Raises:
        ConfigConflictError: one line naming each differing option with both values.
    """
    if not isinstance(saved, dict):
        return  # written before checkpoints recorded their run
    store = Path(current["--store"])
    exists = store.is_dir() and any(store.iterdir())
    diffs = [k for k in current if k in saved and saved[k] != current[k] and (k != "--store" or exists)]
    if not diffs:
        return
    said = "; ".join(f"{k} {_show(saved[k])} (this run: {_show(current[k])})" for k in diffs)
    if allow:
        for k in diffs:
            log(f"note: resuming {ck.name} with {k} {_show(current[k])} instead of its {_show(saved[k])} "
                f"({IDENTITY_OVERRIDE})")
        return
    what = "it would replace another run's rows" if diffs == ["--store"] else "resume with its values"
    raise ConfigConflictError(f"checkpoint {ck.name} is another run's: {said}; {what}, or pass {IDENTITY_OVERRIDE}")


def staging_dir(store_dir: Path) -> Path:
    """Where the checkpoint's copy of ``store_dir`` is built."""
    return store_dir.with_name(f".{store_dir.name}.restoring")


def recover_swap(store_dir: Path, log: Callable[[str], None]) -> None:
    """Finish or undo a swap that a kill interrupted: put the old store back where the new one
    never arrived (:func:`~damo_hybrid.storage.files.recover_dir`), and remove what a finished or
    abandoned swap left beside the store."""
    if not store_dir.exists() and aside_path(store_dir).is_dir():
        log(f"note: a resume was stopped while it replaced {store_dir}; put its earlier store back")
    recover_dir(store_dir)
    shutil.rmtree(staging_dir(store_dir), ignore_errors=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block are delivered when it ends (main thread only;
    elsewhere the block runs as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for n in got:
            os.kill(os.getpid(), n)


def swap_in(staging: Path, store_dir: Path) -> None:
    """Replace ``store_dir`` (if any) by ``staging`` (:func:`~damo_hybrid.storage.files.swap_dir`),
    with an interrupt held back until both renames are done (see the module doc)."""
    with _signals_held():
        swap_dir(staging, store_dir)


def restore_failed(ck: Path, staging: Path, e: BaseException) -> DamoHybridError:
    """A restore's error, told in the checkpoint's name (not the hidden folder it was built in)."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0].replace(str(staging), str(ck))
    return DamoHybridError(f"checkpoint {ck} cannot be restored: {first[:200]}")
