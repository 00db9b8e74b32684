"""Errors the engines raise: bad input names the parameter or folder at fault; a failure inside a stage
names the stage and the phase it failed in."""

from __future__ import annotations


class InvalidParameter(ValueError):
    """A request parameter is out of range or malformed; `param` names it (API field / CLI flag)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message

    def __reduce__(self):  # crosses process boundaries (Ray) with its fields intact
        return type(self), (self.param, self.message)


class CheckpointError(ValueError):
    """A checkpoint folder is missing, empty, unreadable or not a diffusers pipeline."""


class StageFailure(RuntimeError):
    """A task failed inside a stage through no fault of its request's parameters (out of memory, a
    broken kernel, a poisoned input): the server's fault, reported as such. `phase` is one of
    `PHASES`; the message names the stage, the phase and the cause, never a traceback or an address."""

    PHASES = ("admitting", "denoising", "scheduler step", "finishing", "replica")

    def __init__(self, stage: str, phase: str, cause: str):
        super().__init__(f"{stage}: {phase} failed: {cause}")
        self.stage = stage
        self.phase = phase
        self.cause = cause

    @classmethod
    def of(cls, stage: str, phase: str, err: BaseException) -> StageFailure:
        return cls(stage, phase, f"{type(err).__name__}: {err}")

    def __reduce__(self):
        return type(self), (self.stage, self.phase, self.cause)


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before its work was done; `stage` names where it was dropped."""

    def __init__(self, stage: str, message: str = "the request's deadline passed"):
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message

    def __reduce__(self):
        return type(self), (self.stage, self.message)
