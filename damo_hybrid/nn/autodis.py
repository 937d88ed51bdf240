"""AutoDis (Guo et al., KDD 2021): embeddings of continuous features by learned soft discretization.

A continuous feature's value is not cut into fixed buckets (whose edges lose information and
whose rare buckets train poorly): each field has ``H`` meta-embeddings, and a small network turns
the value into a soft assignment over them. For field ``j`` and value ``x``:

    h = LeakyReLU(w_j * x)                  (H,)
    s = W_j h + alpha * h                   (H,), a skip connection of strength alpha
    p = softmax(s / tau)                    (H,), tau the temperature
    e = sum_h p_h * ME_j[h]                 (D,)

Everything is a dense parameter (``n_fields * (H * D + H * H + H)`` floats), trained by the dense
optimizer. The output joins the categorical embeddings as ``n_fields`` more fields.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AutoDis"]


class AutoDis(nn.Module):
    """Embeddings of ``n_fields`` continuous features.

    Args:
        n_fields: continuous features.
        dim: embedding width D.
        meta: meta-embeddings per field (``H``; the paper uses 20 to 40).
        temperature: softmax temperature ``tau`` (lower: closer to a hard bucket).
        alpha: the skip connection's strength.
    """

    def __init__(self, n_fields: int, dim: int, meta: int = 20, temperature: float = 1e-1, alpha: float = 0.1) -> None:
        super().__init__()
        if n_fields < 1 or dim < 1 or meta < 2 or not temperature > 0:
            raise ValueError(f"need n_fields >= 1, dim >= 1, meta >= 2, temperature > 0; got {n_fields}, {dim}, "
                             f"{meta}, {temperature}")
        self.n_fields, self.dim, self.meta, self.temperature, self.alpha = n_fields, dim, meta, temperature, alpha
        self.meta_emb = nn.Parameter(torch.randn(n_fields, meta, dim) * 0.01)
        self.w = nn.Parameter(torch.randn(n_fields, meta) * 0.1)
        self.proj = nn.Parameter(torch.eye(meta).repeat(n_fields, 1, 1) + 0.01 * torch.randn(n_fields, meta, meta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings float32 (B, n_fields, D) of values float32 (B, n_fields)."""
        if not torch.jit.is_tracing() and (x.ndim != 2 or x.shape[1] != self.n_fields):  # (the ONNX export traces)
            raise ValueError(f"expected values (B, {self.n_fields}), got {tuple(x.shape)}")
        return torch.einsum("bfh,fhd->bfd", self.assignment(x), self.meta_emb)

    def assignment(self, x: torch.Tensor) -> torch.Tensor:
        """The soft bucket weights float32 (B, n_fields, H) (what the embeddings mix)."""
        h = nn.functional.leaky_relu(x.unsqueeze(-1) * self.w)  # (B, F, H)
        s = torch.einsum("fhk,bfk->bfh", self.proj, h) + self.alpha * h
        return torch.softmax(s / self.temperature, -1)
