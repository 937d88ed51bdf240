"""Row-wise sparse optimizers and learning-rate schedules.

Each optimizer updates a batch of distinct rows at once, in float32:
``w`` is (N, dim), ``state`` is (N, state_width(dim)), ``g`` is (N, dim), and
``count`` (N,) is each row's update count *including* this update. One call is
one step per row.

Bias correction (adam, adamw) and adagrad's ``lr_decay`` use the row's own
``count``, not the global step: a row updated for the first time at global
step 10,000 gets the same first step as at step 1. The seed project does the
same, and it is what makes a sparse row's first updates well scaled. The
learning-rate *schedule* uses the table's global step.

Update rules (``lr`` is the scheduled rate, ``t`` the row's ``count``):

- sgd: ``g += wd * w``; ``w -= lr * g`` (with ``wd = 0`` this is exactly
  ``w - float32(lr) * g``).
- adagrad: ``g += wd * w``; ``s += g*g``; ``w -= lr / (1 + (t-1) lr_decay) * g / (sqrt(s) + eps)``
  (as ``torch.optim.Adagrad``).
- rowwise_adagrad: one accumulator per row, ``s += mean(g*g)``.
- adam: ``g += wd * w``; ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``;
  ``w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`` (as ``torch.optim.Adam``).
- adamw: as adam without the L2 term, after ``w *= 1 - lr * wd`` (as ``torch.optim.AdamW``).
- ftrl: FTRL-proximal (McMahan et al. 2013), state ``z, n``, ``alpha = lr``:
  ``sigma = (sqrt(n + g^2) - sqrt(n)) / alpha``; ``z += g - sigma w``; ``n += g^2``;
  ``w = 0`` if ``|z| <= l1`` else ``-(z - sign(z) l1) / ((beta + sqrt(n)) / alpha + l2)``.
- lion: ``c = b1 m + (1-b1) g``; ``w -= lr (sign(c) + wd w)``; ``m = b2 m + (1-b2) g``.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import OptimizerConfig, OptimizerKind, ScheduleConfig, ScheduleKind

__all__ = ["RowOptimizer", "state_width", "scheduled_lr"]


def state_width(kind: OptimizerKind, dim: int) -> int:
    """Number of float32 optimizer-state values stored per row."""
    return {
        OptimizerKind.SGD: 0,
        OptimizerKind.ADAGRAD: dim,
        OptimizerKind.ROWWISE_ADAGRAD: 1,
        OptimizerKind.ADAM: 2 * dim,
        OptimizerKind.ADAMW: 2 * dim,
        OptimizerKind.FTRL: 2 * dim,
        OptimizerKind.LION: dim,
    }[OptimizerKind(kind)]


def scheduled_lr(lr0: float, s: ScheduleConfig, step: int) -> float:
    """Learning rate at global step ``step`` (see :class:`ScheduleConfig`)."""
    t, T = float(step), float(s.decay_steps)
    k = s.kind
    if k is ScheduleKind.CONSTANT:
        lr = lr0
    elif k is ScheduleKind.EXPONENTIAL:
        p = math.floor(t / T) if s.staircase else t / T
        lr = lr0 * s.decay_rate ** p
    elif k is ScheduleKind.POLYNOMIAL:
        tc = min(t, T)
        lr = (lr0 - s.end_lr) * (1.0 - tc / T) ** s.power + s.end_lr
    elif k is ScheduleKind.NATURAL_EXPONENTIAL:
        lr = lr0 * math.exp(-s.decay_rate * t / T)
    elif k is ScheduleKind.INVERSE_TIME:
        lr = lr0 / (1.0 + s.decay_rate * t / T)
    elif k is ScheduleKind.COSINE:
        tc = min(t, T)
        lr = lr0 * (s.alpha + (1.0 - s.alpha) * 0.5 * (1.0 + math.cos(math.pi * tc / T)))
    elif k is ScheduleKind.LINEAR_COSINE:
        tc = min(t, T)
        linear = (T - tc) / T
        cosine = 0.5 * (1.0 + math.cos(2.0 * math.pi * s.num_periods * tc / T))
        lr = lr0 * ((s.alpha + linear) * cosine + s.beta)
    else:  # pragma: no cover - enum is closed
        raise AssertionError(k)
    if s.warmup_steps > 0:
        lr *= min(1.0, (t + 1.0) / s.warmup_steps)
    return lr


class RowOptimizer:
    """The update rule of one table, decomposed from its config once.

    Args:
        config: the table's optimizer config.
        dim: row width.
    """

    def __init__(self, config: OptimizerConfig, dim: int) -> None:
        self.kind = config.kind
        self.dim = dim
        self.width = state_width(config.kind, dim)
        self.lr0 = float(config.lr)
        self.schedule = config.schedule
        self.wd = np.float32(config.weight_decay)
        self.lr_decay = float(config.lr_decay)
        self.eps = np.float32(config.eps)
        self.b1, self.b2 = float(config.beta1), float(config.beta2)
        self.init_acc = np.float32(config.initial_accumulator)
        self.ftrl_beta = np.float32(config.ftrl_beta)
        self.l1, self.l2 = np.float32(config.l1), np.float32(config.l2)
        self._update = {
            OptimizerKind.SGD: self._sgd,
            OptimizerKind.ADAGRAD: self._adagrad,
            OptimizerKind.ROWWISE_ADAGRAD: self._rowwise_adagrad,
            OptimizerKind.ADAM: self._adam,
            OptimizerKind.ADAMW: self._adam,
            OptimizerKind.FTRL: self._ftrl,
            OptimizerKind.LION: self._lion,
        }[self.kind]

    def lr(self, step: int) -> float:
        """Scheduled learning rate at global step ``step``."""
        return scheduled_lr(self.lr0, self.schedule, step)

    def initial_state(self, n: int) -> np.ndarray:
        """float32 (n, width) state of rows never updated."""
        s = np.zeros((n, self.width), dtype=np.float32)
        if self.kind in (OptimizerKind.ADAGRAD, OptimizerKind.ROWWISE_ADAGRAD):
            s[:] = self.init_acc
        return s

    def update(self, w: np.ndarray, state: np.ndarray, g: np.ndarray, count: np.ndarray, lr: float) -> None:
        """Step each row once, in place.

        Args:
            w: float32 (N, dim), updated in place.
            state: float32 (N, width), updated in place.
            g: float32 (N, dim) summed gradient per row (not modified).
            count: int64 (N,) update count of each row including this step (>= 1).
            lr: scheduled learning rate.

        An overflow yields Inf/NaN quietly; the caller checks the results
        (:meth:`~damo_hybrid.rows.table.Table.check_results`) before storing them.
        """
        if len(w):
            with np.errstate(over="ignore", invalid="ignore"):
                self._update(w, state, g, count, np.float32(lr))

    def _l2(self, w: np.ndarray, g: np.ndarray) -> np.ndarray:
        return g + self.wd * w if self.wd != 0 else g

    def _sgd(self, w, state, g, count, lr):  # type: ignore[no-untyped-def]
        w -= lr * self._l2(w, g)

    def _adagrad(self, w, state, g, count, lr):  # type: ignore[no-untyped-def]
        g = self._l2(w, g)
        state += g * g
        clr = (lr / (1.0 + (count.astype(np.float64) - 1.0) * self.lr_decay)).astype(np.float32)[:, None]
        w -= clr * g / (np.sqrt(state) + self.eps)

    def _rowwise_adagrad(self, w, state, g, count, lr):  # type: ignore[no-untyped-def]
        g = self._l2(w, g)
        state += np.mean(g * g, axis=1, keepdims=True, dtype=np.float32)
        clr = (lr / (1.0 + (count.astype(np.float64) - 1.0) * self.lr_decay)).astype(np.float32)[:, None]
        w -= clr * g / (np.sqrt(state) + self.eps)

    def _adam(self, w, state, g, count, lr):  # type: ignore[no-untyped-def]
        d = self.dim
        m, v = state[:, :d], state[:, d:]
        if self.kind is OptimizerKind.ADAMW:
            if self.wd != 0:
                w *= np.float32(1.0) - lr * self.wd
        else:
            g = self._l2(w, g)
        m += np.float32(1.0 - self.b1) * (g - m)
        v *= np.float32(self.b2)
        v += np.float32(1.0 - self.b2) * g * g
        t = count.astype(np.float64)
        bc1 = 1.0 - self.b1 ** t
        bc2_sqrt = np.sqrt(1.0 - self.b2 ** t)
        step_size = (float(lr) / bc1).astype(np.float32)[:, None]
        denom = np.sqrt(v) / bc2_sqrt.astype(np.float32)[:, None] + self.eps
        w -= step_size * m / denom

    def _ftrl(self, w, state, g, count, lr):  # type: ignore[no-untyped-def]
        d = self.dim
        z, n = state[:, :d], state[:, d:]
        n_new = n + g * g
        sigma = (np.sqrt(n_new) - np.sqrt(n)) / lr
        z += g - sigma * w
        n[:] = n_new
        denom = (self.ftrl_beta + np.sqrt(n)) / lr + self.l2
        # |z| > l1 implies n > 0, so the masked-out quotients are the only 0/0 ones
        with np.errstate(divide="ignore", invalid="ignore"):
            new_w = -(z - np.sign(z) * self.l1) / denom
        new_w[np.abs(z) <= self.l1] = 0.0
        w[:] = new_w

    def _lion(self, w, state, g, count, lr):  # type: ignore[no-untyped-def]
        m = state
        c = np.float32(self.b1) * m + np.float32(1.0 - self.b1) * g
        upd = np.sign(c)
        if self.wd != 0:
            upd = upd + self.wd * w
        w -= lr * upd
        m *= np.float32(self.b2)
        m += np.float32(1.0 - self.b2) * g
