"""Model side of ifserve, no Ray: model families (`stages/families/`, DeepFloyd IF first), their
step-batched stage engines, the per-stage scheduler, executor and loop, the graph walk and the
in-process cascade."""

from stages.errors import CheckpointError, InvalidParameter, StageFailure

__all__ = ["CheckpointError", "InvalidParameter", "StageFailure"]
