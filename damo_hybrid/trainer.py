"""Re-export of :mod:`damo_hybrid.pipeline.trainer` (the import path the docs use)."""

from .pipeline.trainer import StageTimes, Trainer, TrainSummary, peak_rss_mb

__all__ = ["StageTimes", "TrainSummary", "Trainer", "peak_rss_mb"]
