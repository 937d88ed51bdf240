"""Variable-length all-to-all over one ``torch.distributed`` process group.

Every exchange of a sharded step (keys to their owners, rows back, gradients to the owners) is
one ``all_to_all_single`` whose split sizes the ranks agreed on beforehand (:meth:`Exchange.counts`):
gloo on CPU tensors, NCCL on CUDA tensors, no protocol of our own. An exchange moves what it sends
to its group's device (:func:`exchange_device`) and hands back what it received on the device the
data came from, so the keys (numpy on the host) and the rows (on the model's device) travel over
either backend.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ExchangeError

__all__ = ["Exchange", "as_exchange_error", "exchange_device", "lost_rank_as_error"]

# how gloo and NCCL word a lost peer or a timeout (they raise plain RuntimeErrors); an error of
# the model's own code that merely mentions a timeout or a socket is not one of them
_COMM_FAILURE = ("connection closed by peer", "connection reset by peer", "connection refused", "timed out",
                 "application timeout caused pair closure", "socket timeout", "broken pipe", "processgroupgloo",
                 "processgroupnccl", "nccl error", "gloo/transport", "third_party/gloo",
                 "watchdog caught collective operation timeout")


def exchange_device(backend: str) -> torch.device:
    """Where a collective of ``backend`` takes its tensors: the current CUDA device for NCCL,
    the host for gloo (and any other CPU backend)."""
    if str(backend).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def as_exchange_error(e: RuntimeError, what: str, timeout: timedelta | None = None, sure: bool = False) -> Exception:
    """The :class:`~damo_hybrid.errors.ExchangeError` to raise for a collective's failure ``e``
    (``sure``: ``e`` came from a collective itself), or ``e`` itself where it does not read as
    one (an error of the model's own code during a backward that also all-reduced, say)."""
    text = str(e).strip()
    if not sure and not any(m in text.lower() for m in _COMM_FAILURE):
        return e
    rank = f"rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_initialized() else "this rank"
    wait = f" within {timeout.total_seconds():g} s" if timeout is not None else ""
    return ExchangeError(f"{rank}: the {what} with the other ranks failed ({_cause(text, type(e).__name__)}): a "
                         f"rank stopped or did not answer{wait}; this step was not stored: run the same command "
                         "with --resume")


@contextlib.contextmanager
def lost_rank_as_error(what: str) -> Iterator[None]:
    """Run a collective (a barrier, an all-reduce) whose failure for a lost or silent rank is an
    :class:`~damo_hybrid.errors.ExchangeError` naming ``what``, as every exchange's is."""
    try:
        yield
    except RuntimeError as e:
        err = as_exchange_error(e, what, sure=True)
        if err is e:
            raise
        raise err from e


# where gloo and NCCL say which source line raised: "[/path/to/gloo/transport/tcp/pair.cc:534] "
_SOURCE_LINE = re.compile(r"\[[^\]\s]*\.(?:cc|cpp|cu|h|hpp|py):\d+\]\s*")
_CAUSE_CHARS = 100


def _cause(text: str, fallback: str) -> str:
    """The first line of a backend's error, without build paths, cut at a word (at most 100 characters)."""
    first = _SOURCE_LINE.sub("", text.splitlines()[0] if text else "").strip() or fallback
    if len(first) > _CAUSE_CHARS:
        first = first[:_CAUSE_CHARS].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return first


class Exchange:
    """All-to-all of rows split by destination rank.

    Args:
        group: the process group (each thread that exchanges has its own, so collectives of
            concurrent pipeline stages never interleave).
    """

    def __init__(self, group: dist.ProcessGroup | None, what: str = "exchange", timeout: timedelta | None = None) -> None:
        self.group, self.what, self.timeout = group, what, timeout
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = exchange_device(dist.get_backend(group))
        # what this rank sent to the other ranks (not to itself) and the seconds spent in the collectives
        self.bytes_sent = 0
        self.seconds = 0.0
        self.calls = 0

    def counts(self, send: np.ndarray) -> np.ndarray:
        """int64 (world, K) what this rank sends each rank -> int64 (world, K) what each sends it."""
        t = torch.from_numpy(np.ascontiguousarray(send, np.int64).reshape(-1)).to(self.device)
        out = torch.empty_like(t)
        t0 = time.perf_counter()
        self._all_to_all(out, t)
        self._count(t0, 8 * send.size * (self.world - 1) // self.world)  # the rows to the other ranks
        return out.cpu().numpy().reshape(send.shape)

    def _all_to_all(self, out: torch.Tensor, data: torch.Tensor, out_splits: list[int] | None = None,
                    in_splits: list[int] | None = None) -> None:
        try:
            dist.all_to_all_single(out, data, out_splits, in_splits, group=self.group)
        except RuntimeError as e:  # gloo and NCCL report a lost peer or a timeout as RuntimeError
            raise as_exchange_error(e, self.what, self.timeout, sure=True) from e

    def _count(self, t0: float, nbytes: int) -> None:
        self.seconds += time.perf_counter() - t0
        self.bytes_sent += nbytes
        self.calls += 1

    def send(self, data: torch.Tensor, send_counts: np.ndarray, recv_counts: np.ndarray) -> torch.Tensor:
        """Rows of ``data`` (N, ...) grouped by destination, ``send_counts[r]`` to rank ``r``;
        returns the rows received, grouped by source, ``recv_counts[r]`` from rank ``r``, on
        ``data``'s device (they travel on the group's, :attr:`device`)."""
        out = torch.empty((int(recv_counts.sum()), *data.shape[1:]), dtype=data.dtype, device=self.device)
        t0 = time.perf_counter()
        self._all_to_all(out, data.to(self.device).contiguous(), [int(x) for x in recv_counts],
                         [int(x) for x in send_counts])
        row = data.element_size() * int(np.prod(data.shape[1:]))
        self._count(t0, row * int(send_counts.sum() - send_counts[self.rank]))
        return out.to(data.device)
