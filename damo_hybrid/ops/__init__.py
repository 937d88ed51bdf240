"""The hot ops of the worker stage, and the one-time choice of backend.

:mod:`damo_hybrid.ops.cpu` (numpy) holds every op; :mod:`damo_hybrid.ops.cuda` (CuPy, kernels
from ``ops/kernels/*.cu``, shipped as package data) holds the CUDA twin of each op the device
tier runs. The backend is resolved once, at construction of whatever uses the ops, with
:func:`resolve_backend`; hot loops call the chosen module's functions and never probe for
CUDA again. Pure functions: safe from any thread.

Ops:
    reduce_by_key(grads, inverse, n_unique) -> summed rows, in order of appearance  (CPU paths)
    optimizer_step(opt, w, state, g, count, lr)  (in place; CPU and CUDA)
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

__all__ = ["Backend", "KERNELS", "resolve_backend", "get_ops", "cuda_available"]

KERNELS = Path(__file__).resolve().parent / "kernels"  # the .cu sources, package data of the wheel


class Backend(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def cuda_available() -> bool:
    """True when torch sees a CUDA device and CuPy imports (the kernels need both)."""
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy  # type: ignore[import-not-found]

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # CuPy present but no driver or no device
        return False


def resolve_backend(backend: Backend | str = Backend.AUTO) -> Backend:
    """``auto`` -> ``cuda`` where CUDA and CuPy work, else ``cpu``.

    Raises:
        ValueError: an unknown name, or ``cuda`` where CUDA/CuPy is unavailable.
    """
    try:
        b = Backend(backend)
    except ValueError:
        raise ValueError(f"backend must be 'auto', 'cpu' or 'cuda', got {backend!r}") from None
    if b is Backend.AUTO:
        return Backend.CUDA if cuda_available() else Backend.CPU
    if b is Backend.CUDA and not cuda_available():
        raise ValueError(
            "backend='cuda' was asked for, but CUDA is unavailable (CuPy missing or no device): "
            "install the GPU extra with pip install 'damo-hybrid[gpu]' on a CUDA machine, or use backend='cpu'"
        )
    return b


def get_ops(backend: Backend | str) -> ModuleType:
    """The op module of a resolved backend (``cpu`` or ``cuda``)."""
    b = resolve_backend(backend)
    return importlib.import_module(f"damo_hybrid.ops.{b.value}")
