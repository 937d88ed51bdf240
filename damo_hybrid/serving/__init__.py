"""Serving: export a trained model to ONNX plus a compact key map, and predict from raw keys.

:func:`export_onnx` needs only torch; :class:`Predictor` needs the ``serve`` extra (onnxruntime).
"""

from .onnx import IndexedRows, export_onnx
from .predictor import Predictor

__all__ = ["export_onnx", "IndexedRows", "Predictor"]
