"""Training loop for CTR models with disk-backed embeddings (sequential reference mode).

The loop per step: make the batch's rows resident (host manager's work), forward and
backward (worker), apply the sparse optimizer to the touched rows and the dense optimizer to
the MLP. Each phase runs inside ``torch.profiler.record_function`` and its time is counted in
:class:`StageTimes`.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from ..cache.host import CacheStats
from ..data.metrics import auc, logloss
from ..data.source import EndOfData
from ..data.synthetic import Batch
from ..errors import NonFiniteGradientError
from ..nn.collection import PreparedBatch
from ..timing import CLOCK
from .checkpoint import check_model_class, latest_checkpoint, prune_checkpoints, save_training_checkpoint
from .split import MIN_SPLIT, SplitDense, dense_parts, splittable
from .stages import Pipeline, PipelineStats

__all__ = ["Trainer", "StageTimes", "TrainSummary"]

log = logging.getLogger(__name__)


@dataclass
class StageTimes:
    """Seconds spent per stage."""

    load: float = 0.0
    prepare: float = 0.0
    compute: float = 0.0
    apply: float = 0.0


@dataclass
class TrainSummary:
    steps: int
    samples: int
    seconds: float
    samples_per_s: float
    train_logloss: float
    auc: float | None
    logloss: float | None
    hit_rate: float
    evictions: int
    peak_rss_mb: float
    stages: StageTimes = field(default_factory=StageTimes)
    device_hit_rate: float | None = None  # with a device tier: the share of keys found on the device

    def as_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["stages"] = dict(self.stages.__dict__)
        return d


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Trainer:
    """Runs a model of :mod:`damo_hybrid.models` (anything with ``sparse``, ``prepare``,
    ``forward(prepared, dense)`` and ``apply_sparse_gradients``) over batches.

    Args:
        model: the model (its ``sparse`` collection holds the caches).
        dense_optimizer: any ``torch.optim`` optimizer over the model's dense parameters.
        train_batch: batch index -> :class:`~damo_hybrid.data.synthetic.Batch`.
        eval_batch: batch index -> held-out batch (optional).
        split: run each batch's dense part (FM, MLPs, crosses) forward and backward as
            two halves on two threads (:mod:`damo_hybrid.pipeline.split`). Default: on a 2-core
            machine with torch on one thread (as the CLI sets it), for the built-in model classes
            on the CPU in one process (the halves' gradients are summed in a fixed order, so runs
            repeat bit for bit; an unsplit step differs by the order of float additions). A batch
            under ``MIN_SPLIT`` samples, a ``loss_fn`` other than the default mean
            ``BCEWithLogitsLoss``, or CPU autocast runs whole.
        identity: what this run's result depends on (options and their values), saved with every
            checkpoint as ``state()["run"]`` so that a resume can refuse another run's checkpoint
            (the command line's ``damo_hybrid.cli.resume.check_identity``).
    Raises:
        ValueError: ``split=True`` for a model without a row-wise dense part, a sharded one, or
            one on a GPU.
    """

    def __init__(self, model: torch.nn.Module, dense_optimizer: torch.optim.Optimizer,
                 train_batch: Callable[[int], Batch], eval_batch: Callable[[int], Batch] | None = None,
                 split: bool | None = None, identity: dict[str, Any] | None = None) -> None:
        self.model = model
        self.identity = identity
        # a model whose embeddings are a module of its own (DHE, in-memory tables) has no rows to serve
        sparse = getattr(model, "sparse", None)
        self.sparse = sparse if sparse is not None else _NoRows(model)
        self.device = self.sparse.device  # chosen once by the collection's backend
        model.to(self.device)  # the dense layers; the sparse rows live in the caches
        # tables sharded over ranks (damo_hybrid.dist): the dense layers are data-parallel, their
        # gradients averaged over the ranks by DDP during backward (its construction broadcasts
        # rank 0's initial weights)
        self._train_forward: torch.nn.Module = model
        self._sharded = getattr(self.sparse, "world", 1) > 1
        if self._sharded:
            from torch.nn.parallel import DistributedDataParallel

            self._train_forward = DistributedDataParallel(
                model, device_ids=None if self.device.type == "cpu" else [self.device])
        self.opt = dense_optimizer
        self.train_batch = train_batch
        self.eval_batch = eval_batch
        self.step = 0
        # the dense step follows the tables' NaN/Inf decision: skipped (and counted) when every
        # table drops bad rows, else a non-finite dense gradient refuses the whole step
        tiers = self.sparse.tiers.values()  # (none for a model without tables: a bad dense step raises)
        self.skip_nonfinite = bool(tiers) and all(t.table.skip_nonfinite for t in tiers)
        self.skipped_dense_steps = 0
        self.samples = 0
        self.times = StageTimes()
        self.pipeline_stats: PipelineStats | None = None
        self.loss_fn = torch.nn.BCEWithLogitsLoss()
        # set to a list to collect (stage, start, end) perf_counter intervals of every stage
        self.timeline: list[tuple[str, float, float]] | None = None
        # the dense part's forward and backward in two halves on two threads (a 2-core machine's second
        # core, damo_hybrid.pipeline.split); decided once, so both loops compute the same sums
        one_cpu = self.device.type == "cpu" and not self._sharded
        if split is None:  # where the halves get a core each: 2 cores, one torch thread
            split = one_cpu and splittable(model, built_in=True) and dense_parts() == 2 and torch.get_num_threads() == 1
        elif split and not (one_cpu and splittable(model)):
            raise ValueError("split=True needs a built-in model (or a subclass that overrides only its row-wise "
                             "dense_part), on the CPU, in one process")
        self.split = SplitDense(model) if split else None

    def train_step(self, index: int) -> float:
        """One sequential step: load, prepare, compute, apply."""
        t0 = time.perf_counter()
        with record_function("damo.load"):
            b = self.train_batch(index)
        t1 = time.perf_counter()
        with record_function("damo.prepare"):
            prepared = self.model.prepare(b.sparse)
        self.times.load += t1 - t0
        self.times.prepare += time.perf_counter() - t1
        return self._compute_apply(b, prepared)

    def _compute_apply(self, b: Batch, prepared: PreparedBatch) -> float:
        t2 = time.perf_counter()
        try:
            with record_function("damo.compute"):
                self.model.train()
                if self.split is not None and len(b.label) >= MIN_SPLIT and self._default_loss() and not _autocast():
                    dense = self._to_device(b.dense)
                    with CLOCK("forward"):  # the gather; each half's forward runs with its backward
                        gathered = self.model.embeddings_and_dense(prepared, dense)
                    self.opt.zero_grad(set_to_none=True)
                    with CLOCK("backward"):
                        loss = self.split.halves(gathered, dense, self._to_device(b.label))
                else:
                    with CLOCK("forward"):
                        logits = self._train_forward(prepared, self._to_device(b.dense))
                        loss = self.loss_fn(logits, self._to_device(b.label))
                    self.opt.zero_grad(set_to_none=True)
                    with CLOCK("backward"):
                        self._by_rows(loss, logits, len(b.label)).backward()
        except BaseException as e:
            self.sparse.release(prepared)  # a failed forward or backward keeps no rows pinned
            if self._train_forward is not self.model and isinstance(e, RuntimeError):
                from ..dist.exchange import (
                    as_exchange_error,  # DDP's all-reduce lost a rank
                )

                err = as_exchange_error(e, "dense gradients' all-reduce")
                if err is not e:
                    raise err from e
            raise
        t3 = time.perf_counter()
        with record_function("damo.apply"):
            dense_finite = self._dense_finite()
            if not dense_finite and not self.skip_nonfinite:
                self.sparse.release(prepared)
                raise NonFiniteGradientError(
                    f"the dense gradients hold NaN or Inf at step {self.step}; nothing was written. Lower "
                    "the learning rate or clip gradients, or give every table nonfinite='skip' to skip such steps.")
            with CLOCK("sparse_step"):
                self.model.apply_sparse_gradients()  # checks every table before it stores anything
            if dense_finite:
                with CLOCK("dense_step"):
                    self.opt.step()
            else:  # the tables' skip policy: the dense step is skipped and counted, like the bad rows
                self.skipped_dense_steps += 1
                log.warning("step %d: the dense gradients hold NaN or Inf; the dense step was skipped", self.step)
        t4 = time.perf_counter()
        self.times.compute += t3 - t2
        self.times.apply += t4 - t3
        if self.timeline is not None:
            self.timeline += [("compute", t2, t3), ("apply", t3, t4)]
        self.step += 1
        self.samples += len(b.label)
        return float(loss.detach()) if len(b.label) else 0.0

    def _by_rows(self, loss: torch.Tensor, logits: torch.Tensor, n: int) -> torch.Tensor:
        """The loss to differentiate: on ranks, this rank's mean weighted by its share of the global
        batch's rows, so that after the ranks' gradients are averaged (DDP, and the sharded tables'
        ``1 / W``) any slicing of the global batch, uneven or empty, equals one process on all of it."""
        if not self._sharded:
            return loss
        import torch.distributed as dist

        from ..dist.exchange import lost_rank_as_error

        rows = torch.tensor([float(n)], dtype=torch.float64, device=self.device)
        with lost_rank_as_error("count of the step's rows"):
            dist.all_reduce(rows)  # every rank's count of this step: a global batch may be split unevenly
        total = float(rows.item())
        if n == 0 or total == 0:
            return logits.sum() * 0.0  # no rows here: no gradient, but every collective still runs
        return loss * (n * self.sparse.world / total)

    def _default_loss(self) -> bool:
        """Whether the loss is the one the split computes: mean BCE with logits, unweighted."""
        f = self.loss_fn
        return (type(f) is torch.nn.BCEWithLogitsLoss and f.reduction == "mean" and f.weight is None
                and f.pos_weight is None)

    def _dense_finite(self) -> bool:
        """Whether every dense gradient is finite (one reduction, one host sync)."""
        grads = [p.grad for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device, non_blocking=True)

    # ------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """Dense model, dense optimizer, position and RNG states (sparse rows live in the store)."""
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                "samples": self.samples, "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                "model_class": type(self.model).__name__, "run": self.identity,
                # what rebuilds a built-in model for export (damo-hybrid export --onnx)
                "model_spec": {"fields": list(getattr(self.model, "fields", [])),
                               "n_dense": getattr(self.model, "n_dense", None),
                               "dense_mode": getattr(self.model, "dense_mode", "raw"),
                               "field_tables": dict(getattr(self.model, "field_tables", {}))},
                # a streamed input's position at the next batch (resumes without re-reading)
                "data": self.train_batch.state(self.step) if hasattr(self.train_batch, "state") else None}

    def load_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state`.

        Raises:
            ValueError: the state was saved from another model class, or dense layers of other shapes.
        """
        check_model_class(state, type(self.model).__name__, getattr(self.model, "dense_mode", "raw"),
                          getattr(self.model, "field_tables", None))
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(f"the checkpoint's dense layers do not fit this {type(self.model).__name__} ({first}); "
                             "resume with the options of the run that wrote it") from None
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.samples = int(state["step"]), int(state["samples"])
        if state.get("data") is not None and hasattr(self.train_batch, "load_state"):
            self.train_batch.load_state(state["data"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])

    def checkpoint(self, root: str | os.PathLike[str], keep: int = 2) -> Path:
        """Flush the caches and write ``root/step-<step>`` atomically; keep the ``keep`` newest."""
        if self.sparse.store is None:
            raise ValueError("this model's embeddings are a module of its own, not rows in a store: save "
                             "model.state_dict() (and the optimizer's) instead of a training checkpoint")
        self.sparse.flush()
        if self._sharded:  # every rank's shard, the trainer state once (damo_hybrid.dist.checkpoint)
            from ..dist.checkpoint import (
                prune_sharded_checkpoints,
                save_sharded_checkpoint,
            )

            state = self.state()  # on every rank: a stream split by file gathers every rank's position
            path = save_sharded_checkpoint(root, self.step, self.sparse.store,
                                           state if self.sparse.rank == 0 else None)
            prune_sharded_checkpoints(root, keep, self.sparse.rank)
            return path
        path = save_training_checkpoint(root, self.step, self.sparse.store, self.state())
        prune_checkpoints(root, keep)
        return path

    def _has_checkpoint(self, root: str | os.PathLike[str]) -> bool:
        if self._sharded:
            from ..dist.checkpoint import latest_sharded_checkpoint

            return latest_sharded_checkpoint(root) is not None
        return latest_checkpoint(root) is not None

    def _run(self, steps: int, prefetch: bool, progress: Callable[[int, float], None] | None,
             losses: list[float], checkpoint_every: int = 0, checkpoint_dir: str | os.PathLike[str] | None = None,
             eval_every: int = 0, on_eval: Callable[[int, float, float], None] | None = None) -> None:
        end = self.step + steps
        if checkpoint_every and checkpoint_dir is not None and not self._has_checkpoint(checkpoint_dir):
            # the starting state first: a run killed before its first periodic checkpoint was
            # complete may have changed the store (that checkpoint's flush), so resuming needs it
            self.checkpoint(checkpoint_dir)
        while self.step < end:
            # checkpoints and evaluations fall between pipeline runs: no stage is in flight then
            seg = end - self.step
            for every in (checkpoint_every, eval_every):
                if every:
                    seg = min(seg, every - self.step % every)
            before = self.step
            self._run_segment(seg, prefetch, progress, losses)
            if checkpoint_every and checkpoint_dir is not None and self.step % checkpoint_every == 0 and self.step > before:
                self.checkpoint(checkpoint_dir)
            if eval_every and on_eval is not None and self.step % eval_every == 0 and self.step > before:
                on_eval(self.step, *self.evaluate(self.EVAL_EVERY_BATCHES))
            if self.step < before + seg:  # the data ran out (its epochs are done)
                return

    def _run_segment(self, steps: int, prefetch: bool, progress: Callable[[int, float], None] | None,
                     losses: list[float]) -> None:
        if prefetch:
            sparse = self.sparse
            with Pipeline(self.train_batch, lambda b: self.model.prepare(b.sparse), sparse.release,
                          self.step, self.step + steps, timeline=self.timeline) as pipe:
                self.pipeline_stats = pipe.stats  # live: a progress callback may read it
                for _, b, prepared in pipe:
                    losses.append(self._compute_apply(b, prepared))
                    if progress is not None:
                        progress(self.step, losses[-1])
            self.pipeline_stats = pipe.stats
            self.times.load += pipe.stats.load
            self.times.prepare += pipe.stats.prepare
        else:
            for _ in range(steps):
                try:
                    losses.append(self.train_step(self.step))
                except EndOfData:
                    return
                if progress is not None:
                    progress(self.step, losses[-1])

    @torch.no_grad()
    def evaluate(self, n_batches: int) -> tuple[float, float]:
        """AUC and logloss over ``n_batches`` held-out batches (no updates); on a sharded model,
        over every rank's slice of them."""
        if self.eval_batch is None or n_batches <= 0:
            raise ValueError("no eval data")
        was = self.model.training
        self.model.eval()
        labels, probs = [], []
        try:
            for i in range(n_batches):
                try:
                    b = self.eval_batch(i)
                except EndOfData:  # a streamed eval set read to its end
                    break
                prepared = self.model.prepare(b.sparse)
                try:
                    p = torch.sigmoid(self.model(prepared, self._to_device(b.dense))).cpu().numpy()
                finally:
                    self.sparse.release(prepared)
                labels.append(b.label)
                probs.append(p)
        finally:
            # training goes on in training mode: the next segment's first prepare (admission
            # counting) runs in the host thread before any compute sets it
            self.model.train(was)
        y, p = np.concatenate(labels), np.concatenate(probs)
        if self._sharded:  # every rank's slice of the held-out batches: the figures of them all
            import torch.distributed as dist

            from ..dist.exchange import lost_rank_as_error

            parts: list = [None] * dist.get_world_size()
            with lost_rank_as_error("gathering of the held-out scores"):
                dist.all_gather_object(parts, (y, p))
            y, p = np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
        return auc(y, p), logloss(y, p)

    EVAL_EVERY_BATCHES = 20  # held-out batches of each evaluation during training (eval_every)

    def fit(self, steps: int, eval_batches: int = 0, progress: Callable[[int, float], None] | None = None,
            prefetch: bool = True, checkpoint_every: int = 0,
            checkpoint_dir: str | os.PathLike[str] | None = None, eval_every: int = 0,
            on_eval: Callable[[int, float, float], None] | None = None) -> TrainSummary:
        """Train ``steps`` steps, then evaluate.

        Args:
            steps: batches to train (fewer if the data ends first: a streamed input's epochs).
            eval_batches: held-out batches to evaluate after training.
            progress: called as ``progress(step, loss)`` after every step.
            prefetch: run the loader and host manager ahead in their own threads
                (:class:`~damo_hybrid.pipeline.Pipeline`); ``False`` is the sequential
                reference loop. Both give the same weights.
            checkpoint_every: write a checkpoint whenever the global step is a multiple of this.
            checkpoint_dir: where (``step-<N>`` directories; the two newest are kept). Where it
                holds no complete checkpoint yet, the starting state is saved first.
            eval_every: evaluate on at most :attr:`EVAL_EVERY_BATCHES` held-out batches whenever
                the global step is a multiple of this, calling ``on_eval(step, auc, logloss)``.
        """
        self.model.train()  # before the host thread's first prepare (admission counts training batches)
        t0 = time.perf_counter()
        samples0, step0 = self.samples, self.step
        losses: list[float] = []
        try:
            self._run(steps, prefetch, progress, losses, checkpoint_every, checkpoint_dir, eval_every, on_eval)
        except BaseException:
            # Ctrl-C or a failed stage: keep the work of the steps that completed
            try:
                self.sparse.flush()
            except Exception:  # the store itself may be what failed
                log.exception("could not flush the caches after an error")
            raise
        finally:
            if self.split is not None:
                self.split.close()  # its helper thread lives as long as one fit
        secs = time.perf_counter() - t0
        self.sparse.flush()
        a = ll = None
        if eval_batches:
            a, ll = self.evaluate(eval_batches)
        stats = list(self.sparse.cache_stats().values())
        dstats = list(self.sparse.device_cache_stats().values())
        n = self.samples - samples0
        return TrainSummary(
            steps=self.step - step0, samples=n, seconds=secs, samples_per_s=n / secs if secs else 0.0,
            train_logloss=float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else float("nan"),
            auc=a, logloss=ll, hit_rate=_hit_rate(stats),
            evictions=sum(s.evictions for s in stats),
            peak_rss_mb=peak_rss_mb(), stages=self.times,
            device_hit_rate=_hit_rate(dstats) if dstats else None,
        )


def _autocast() -> bool:
    """Whether CPU autocast is on (thread-local: the split's helper thread would not inherit it)."""
    try:
        return bool(torch.is_autocast_enabled("cpu"))
    except TypeError:  # torch before 2.4
        return bool(torch.is_autocast_cpu_enabled())


class _NoRows:
    """What the trainer asks of a model's collection, for a model without one (its embedding
    module is trained by the dense optimizer): no rows to release, flush or count."""

    store = None
    tiers: dict = {}

    def __init__(self, model: torch.nn.Module) -> None:
        p = next(model.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")

    def release(self, prepared: object = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def cache_stats(self) -> dict:
        return {}

    def device_cache_stats(self) -> dict:
        return {}


def _hit_rate(stats: list[CacheStats]) -> float:
    hits = sum(s.hits for s in stats)
    look = hits + sum(s.misses for s in stats)
    return hits / look if look else 0.0
