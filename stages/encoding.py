"""A family's text encoder as a one-step stage, so that the same scheduler, executor and loop batch its
prompts, cancel waiting ones and keep a failing prompt from failing the others in its batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.errors import InvalidParameter
from stages.family import TextEncoder


@dataclass(frozen=True)
class EncodeRequest:
    prompt: str
    negative_prompt: str | None = None


@dataclass(eq=False)
class EncodeTask:
    request: EncodeRequest
    result: Any = None

    @property
    def done(self) -> bool:
        return self.result is not None


class EncoderEngine:
    """`StepEngine` over a `TextEncoder`: a task's one step is its share of one batched forward."""

    def __init__(self, encoder: TextEncoder, name: str = "text_encoder"):
        self.encoder = encoder
        self.name = name

    @property
    def batch_invariant(self) -> bool:
        return self.encoder.batch_invariant

    def admit(self, requests: list[EncodeRequest]) -> list[EncodeTask]:
        for request in requests:
            if not isinstance(request.prompt, str) or not request.prompt.strip():
                raise InvalidParameter("prompt", "must be a non-empty string")
        return [EncodeTask(request) for request in requests]

    def predict(self, tasks: list[EncodeTask]) -> list[Any]:
        return self.encoder.encode([t.request.prompt for t in tasks], [t.request.negative_prompt for t in tasks])

    def advance(self, task: EncodeTask, output: Any) -> None:
        task.result = output

    def finish(self, task: EncodeTask) -> Any:
        return task.result
