"""The sparse step of one table's resident rows, staged on copies so that checking can refuse it.

:func:`stage_rows` is what :meth:`EmbeddingCollection.apply_gradients
<damo_hybrid.nn.collection.EmbeddingCollection.apply_gradients>` runs per table before it
stores anything: the optimizer step on copies of the rows, then the table's NaN/Inf policy on
the gradients and the results. Storing is the returned callable.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..cache.device import DeviceBatch
from ..cache.tiers import TableTiers

__all__ = ["stage_rows"]


def stage_rows(tiers: TableTiers, slots: np.ndarray, device: DeviceBatch | None, keys: np.ndarray,
               grad: torch.Tensor, lr: float) -> tuple[list[np.ndarray | None], Callable[[], None]]:
    """Step a batch's resident rows on copies and check them.

    Args:
        tiers: the table's tiers.
        slots: int64 (N,) the rows' pinned host slots (host tier).
        device: the batch's device-tier state, or None on the host tier.
        keys: uint64 (N,) the rows' keys, in slot order.
        grad: float32 (N, dim) their summed gradients.
        lr: this step's learning rate.
    Returns:
        ``(keep masks, store the step)``: the ``skip`` policy's bool rows kept (None: all).
    Raises:
        NonFiniteGradientError: under the ``raise`` policy; nothing was stored.
    """
    table = tiers.table
    if device is not None:
        dev = tiers.device
        assert dev is not None
        g = grad.to(torch.float32)
        w, st, cnt = dev.stage(device, g, lr)
        finite = torch.isfinite(g).all() & torch.isfinite(w).all() & torch.isfinite(st).all()
        if bool(finite):  # the step's one host sync
            return [], lambda: dev.commit(device, w, st, cnt)
        # rare path: the table's NaN/Inf policy (raise, or drop and count) on host copies
        _, _, keep_g = table.check_gradients(keys, g.cpu().numpy())
        keep = np.ones(len(keys), bool) if keep_g is None else keep_g.copy()
        k = torch.from_numpy(keep).to(w.device)
        keep_r = table.check_results(keys[keep], w[k].cpu().numpy(), st[k].cpu().numpy())
        if keep_r is not None:
            keep[np.nonzero(keep)[0][~keep_r]] = False
        return [keep_g, keep_r], lambda: dev.commit(device, w, st, cnt, keep)
    host = tiers.host
    g_np = np.ascontiguousarray(grad.numpy(), dtype=np.float32)
    if grad.dtype == torch.float32 and g_np.shape == (len(keys), table.dim):
        fused = host.stage_checked(slots, g_np, lr)
        if fused is not None:  # every gradient and result finite: nothing for the policy to do
            w, st, cnt = fused
            return [None, None], lambda: host.commit_slots(slots, w, st, cnt)
    _, g2, keep_g = table.check_gradients(keys, g_np)
    if keep_g is not None:
        slots, keys, g2 = slots[keep_g], keys[keep_g], g2[keep_g]
    w, st, cnt = host.stage_slots(slots, g2, lr)
    keep_r = table.check_results(keys, w, st)
    return [keep_g, keep_r], lambda: host.commit_slots(slots, w, st, cnt, keep_r)
