"""Stages 2 and 3 driven together: the three-stage pipeline, the trainer and its checkpoints.

- :mod:`.stages`: :class:`Pipeline`, the loader and host-manager threads ahead of the worker.
- :mod:`.trainer`: :class:`Trainer`, the training loop (pipelined, or the sequential
  reference), evaluation and checkpoints.
- :mod:`.checkpoint`: atomic training checkpoints (store snapshot + dense state + marker).

Threads: the loader thread owns batch building, the host-manager thread owns residency
(``prepare``), the caller's thread is the worker; queues between them are bounded.
"""

from .stages import Pipeline, PipelineStats

__all__ = ["Pipeline", "PipelineStats"]
