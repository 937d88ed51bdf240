"""Re-export of :mod:`damo_hybrid.nn.models` (the import path the docs use)."""

from .nn.models import DLRM, MODELS, DCNv2, DeepFM, WideAndDeep, mlp

__all__ = ["DCNv2", "DLRM", "DeepFM", "MODELS", "WideAndDeep", "mlp"]
