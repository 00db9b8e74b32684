"""The one walk through a family's graph, shared by the in-process cascade (stages/cascade.py) and the
served orchestrator (serve/orchestrator.py): the text encoder, then the stages the image's size needs,
each fed the previous one's output. How a step is carried out (a local stage loop, a Ray Serve call)
is the caller's: it passes `encode` and `run_stage`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from stages.family import ModelFamily, StageSpec
from stages.params import RequestParams

Encode = Callable[[RequestParams], Awaitable[Any]]
RunStage = Callable[[StageSpec, RequestParams, Any, Any], Awaitable[Any]]  # (spec, params, embeddings, previous)
OnStage = Callable[[StageSpec, Any], Awaitable[None]]


async def walk(
    family: ModelFamily,
    params: RequestParams,
    *,
    encode: Encode,
    run_stage: RunStage,
    on_stage: OnStage | None = None,
) -> Any:
    """The last stage's result for one image. `on_stage` sees every earlier stage's result (previews)."""
    specs = family.stages_for(params.size)
    embeddings = await encode(params) if any(spec.uses_embeddings for spec in specs) else None
    previous = None
    for spec in specs:
        previous = await run_stage(spec, params, embeddings if spec.uses_embeddings else None, previous)
        if on_stage is not None and spec is not specs[-1]:
            await on_stage(spec, previous)
    return previous
