"""Model side of ifserve: load the DeepFloyd IF cascade from diffusers checkpoints and run its
stages step-batched over tasks. Nothing here imports Ray."""

from stages.errors import CheckpointError, InvalidParameter
from stages.params import GenerationParams

__all__ = ["CheckpointError", "GenerationParams", "InvalidParameter"]
