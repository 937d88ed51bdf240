"""``train --nproc N``'s launcher: torchrun, told in one line.

``python -m damo_hybrid.cli.torchrun ARGS`` takes torchrun's own arguments and runs the ranks as
torchrun does, but keeps its logs (the rendezvous, the thread banner, "sending SIGTERM", the
failure report with its traceback) to itself. When a rank fails it prints one line naming the rank
that stopped first and how (a signal, or an exit status, whose own error the rank printed above),
and what to do: run the same command with ``--resume`` (or, for a refusal, fix what it names). Its
exit status is then 3 (the system stopped a rank: a signal) or the failed rank's own status.

The ranks it launches print nothing of their own for what the launcher reports: an exchange that
failed because another rank stopped, or the SIGTERM torchrun sends the others
(see :func:`quiet_failure`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "first_failure", "quiet_failure"]

_QUIET = 75  # a rank's exit status for an error this launcher reports (EX_TEMPFAIL)


def quiet_failure(e: BaseException) -> int | None:
    """For a rank under this launcher: the exit status with which to stop silently on ``e`` (an
    exchange lost to another rank, torchrun's SIGTERM), or None to report ``e`` as usual."""
    from ..errors import ExchangeError
    from .distributed import LAUNCHED
    from .signals import Terminated

    if LAUNCHED not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if isinstance(e, KeyboardInterrupt):  # the launcher says it was interrupted, once
        return 143 if isinstance(e, Terminated) else 130
    cur: BaseException | None = e
    for _ in range(8):  # the pipeline's error carries the stage's as its cause
        if cur is None:
            break
        if isinstance(cur, ExchangeError):
            return _QUIET
        cur = cur.__cause__
    return None


def first_failure(failures: dict[int, object]) -> tuple[int, int]:
    """The rank to blame among torchrun's ``{rank: ProcessFailure}`` and its exit code: a rank a
    signal other than torchrun's own SIGTERM ended, else one whose error is its own (not a lost exchange or torchrun's SIGTERM),
    else the lowest rank."""
    def code(f: object) -> int:
        return int(getattr(f, "exitcode", 1))

    ranks = sorted(failures)
    for want in (lambda c: c < 0 and c != -15, lambda c: c not in (_QUIET, 143, -15)):  # -15: torchrun's SIGTERM
        hit = [r for r in ranks if want(code(failures[r]))]
        if hit:
            return hit[0], code(failures[hit[0]])
    return ranks[0], code(failures[ranks[0]])


def _signal_name(code: int) -> str:
    import signal

    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    for name in ("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger().setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets, without its banner
    world = args.nproc_per_node
    try:
        run(args)
    except ChildFailedError as e:
        rank, code = first_failure(e.failures)
        resume = ("what the last checkpoint holds is safe: run the same command with --resume to go on from "
                  "it")
        if code < 0:
            how, status = f"was stopped by {_signal_name(code)}", 3
        elif code in (_QUIET, 143):
            how, status = "lost the other ranks", 3
        else:  # the rank's own error is above, with the status it chose (2 a refusal, 3 the system, 70 a bug)
            how, status = f"failed with exit status {code} (its error is above)", code if code in (1, 2, 3, 70) else 2
            resume = "fix what it names" if status == 2 else resume
        print(f"damo-hybrid train: error: rank {rank} of {world} {how}, and the run stopped; {resume}", file=sys.stderr)
        return status
    except SignalException as e:  # the launcher was asked to stop (SIGTERM from `train --nproc`)
        return 128 + int(e.sigval)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
