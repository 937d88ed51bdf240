"""The worker's dense compute in two halves on two threads: a 2-core machine's second core.

On 2 cores the pipeline leaves the worker one torch thread (the other core is the host side's,
:func:`~damo_hybrid.pipeline.stages.worker_threads`), yet the host side keeps that core busy
only part of each step. :class:`SplitDense` runs the dense part of a step (a model's
:meth:`~damo_hybrid.nn.models.DeepFM.dense_part`: the FM term, MLPs, crosses; most of a CPU step)
forward and backward as two half-batches at once, one on the worker's thread and one on a
helper thread, each with that one torch thread. When the host side leaves its core idle the
second half takes it; when it does not, the halves share the cores with it as plain threads.
Two intra-op threads instead would form an OpenMP team whose threads spin and wait for each other
at every op while the host side holds a core (measured slower than one thread).

The embeddings are gathered once for the whole batch; each half's dense part reads its rows of them
through a leaf of its own. Each half's gradients are computed apart (``torch.autograd.grad``:
nothing accumulates from two threads) and summed in a fixed order, the first half's plus the
second's; then one backward of the gathered embeddings hands their gradient to the rows (and
to AutoDis). So a run is reproducible bit for bit, and the pipelined run equals the sequential
one, which splits the same way; against one unsplit backward, the sums differ by the order of
float additions (~1e-7 relative).

The trainer splits by default only where the halves do not oversubscribe the cores: 2 cores and
one torch thread (what the CLI and the benchmarks set with a pipeline), the exact built-in model
classes, the CPU, one process, a batch of at least :data:`MIN_SPLIT`, the default loss and no
autocast; ``Trainer(split=True)`` also takes a subclass that overrides only ``dense_part``.

Thread safety: :meth:`SplitDense.forward_backward` is called by the worker only; its helper
thread lives until :meth:`SplitDense.close` (the trainer closes it at the end of each ``fit``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SplitDense", "dense_parts", "MIN_SPLIT"]

MIN_SPLIT = 256  # a batch smaller than this runs whole: two threads cost more than they save


def dense_parts(cores: int | None = None) -> int:
    """How many parts a batch's dense part runs in: 2 on a 2-core machine (each part on one core,
    one torch thread each), else 1 (the worker's intra-op threads already use the cores)."""
    cores = cores or os.cpu_count() or 1
    return 2 if cores == 2 else 1


def splittable(model: torch.nn.Module, built_in: bool = False) -> bool:
    """Whether ``model``'s step is its embeddings, then a row-wise ``dense_part``: a model of
    :data:`~damo_hybrid.nn.models.MODELS` (``built_in``: exactly one of those classes, what the
    trainer splits by default), or a subclass that overrides ``dense_part`` but not ``forward``."""
    from ..nn.models import MODELS, _SparseCTR

    if built_in:
        return type(model) in MODELS.values()
    cls = type(model)
    return isinstance(model, _SparseCTR) and cls.dense_part is not _SparseCTR.dense_part and \
        cls.forward is _SparseCTR.forward


class SplitDense:
    """A model's step as two halves of its dense part on two threads (see the module doc).

    Args:
        model: a model with ``embeddings_and_dense`` and a row-wise ``dense_part`` (:func:`splittable`).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._pool: ThreadPoolExecutor | None = None

    def forward_backward(self, batch: Any, dense: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one batch: the mean binary cross-entropy's gradients land in
        the dense parameters' ``.grad`` (set, or added to) and in the rows' leaves.

        Args:
            batch: what the model's ``prepare`` returned.
            dense: float32 (B, n_dense); label: float32 (B,).
        Returns:
            The loss (mean over the batch), a detached scalar.
        """
        return self.halves(self.model.embeddings_and_dense(batch, dense), dense, label)

    def halves(self, gathered: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor], dense: torch.Tensor,
               label: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_backward` after the gather: ``gathered`` is what the model's
        ``embeddings_and_dense`` returned for the batch."""
        e, first, dense_in = gathered
        n = len(label)
        cut = n // 2
        params = [p for p in self.model.parameters() if p.requires_grad]  # as of this step
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="damo-worker")
        second = self._pool.submit(self._half, params, e, first, dense, dense_in, label, cut, n, n)
        try:
            loss0, g0 = self._half(params, e, first, dense, dense_in, label, 0, cut, n)
        finally:
            # joined even when the first half failed (then its error is raised, this one's as context)
            loss1, g1 = second.result()
        k = len(params)
        for p, a, b in zip(params, g0[:k], g1[:k]):
            g = a if b is None else b if a is None else a + b
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        # the gathered embeddings (and first-order sums) hand their gradient on to the rows
        pairs = [(e, torch.cat([g0[k], g1[k]]))]
        if first is not None and first.requires_grad:
            pairs.append((first, torch.cat([g0[k + 1], g1[k + 1]])))
        pairs = [(r, g) for r, g in pairs if r.requires_grad]
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
        return loss0 + loss1

    def _half(self, params: list[torch.nn.Parameter], e: torch.Tensor, first: torch.Tensor | None,
              dense: torch.Tensor, dense_in: torch.Tensor, label: torch.Tensor, lo: int, hi: int,
              n: int) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """Rows ``lo:hi``: their share of the mean loss, and its gradients for the parameters,
        the embeddings and the first-order sums of those rows (None where one does not reach).
        Grad mode is thread-local: a training step has it on, on either thread."""
        with torch.enable_grad():
            eh = e.detach()[lo:hi].requires_grad_()
            fh = None
            if first is not None:
                fh = first.detach()[lo:hi].requires_grad_(first.requires_grad)
            logits = self.model.dense_part(eh, fh, dense[lo:hi], dense_in[lo:hi])
            loss = F.binary_cross_entropy_with_logits(logits, label[lo:hi], reduction="sum") / n
            wrt = [*params, eh] + ([fh] if fh is not None and fh.requires_grad else [])
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        return loss.detach(), grads

    def close(self) -> None:
        """Stop the helper thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
