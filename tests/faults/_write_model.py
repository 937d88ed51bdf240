"""The small seed-style model that ``_write_child.py save-model`` saves and the save/load tests
train (importable by its name, ``faults._write_model``, in the tests and in the child, so
``torch.load`` finds its class), with its input and its logits."""

from __future__ import annotations

import torch
from torch import nn

from damo_hybrid.compat.torch import Embedding


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.v = Embedding(4, 0, initializer={"name": "uniform"}, optimizer={"name": "adamw", "gamma": 0.05})
        self.out = nn.Linear(12, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.v(ids).flatten(1))


IDS = torch.arange(1, 31).view(10, 3)


def logits(model: nn.Module) -> torch.Tensor:
    """The model's outputs on :data:`IDS`, in eval mode."""
    model.eval()
    with torch.no_grad():
        return model(IDS)
