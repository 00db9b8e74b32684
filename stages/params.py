"""Request parameters of one image through the cascade, validated once at the edge.

Field names are shared by the `ifserve generate` flags (with dashes) and the HTTP API. Defaults are
those of the seed's reference code: stage I 100 steps / guidance 7.0, stage II 50 / 4.0 / noise 250,
stage III 75 / 9.0 / noise 100.
"""

from __future__ import annotations

from typing import Annotated, Literal

from diffusers.pipelines.deepfloyd_if import timesteps as _if_timesteps
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stages.errors import InvalidParameter

# Named timestep lists shipped with diffusers (fast27, smart50, super100, ...).
TIMESTEP_LISTS: dict[str, list[int]] = {
    name.removesuffix("_timesteps"): list(getattr(_if_timesteps, name))
    for name in dir(_if_timesteps)
    if name.endswith("_timesteps")
}

SIZES = (64, 256, 1024)
MAX_STEPS = 1000
MAX_PROMPT_CHARS = 2000

Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Guidance = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)]
NoiseLevel = Annotated[int, Field(ge=0, lt=1000)]


def timestep_list(name: str | None) -> list[int] | None:
    return None if name is None else TIMESTEP_LISTS[name]


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    size: Literal[64, 256, 1024] = 1024
    stage1_steps: Steps = 100
    stage1_timesteps: str | None = None
    stage1_guidance: Guidance = 7.0
    stage2_steps: Steps = 50
    stage2_timesteps: str | None = None
    stage2_guidance: Guidance = 4.0
    stage2_noise_level: NoiseLevel = 250
    stage3_steps: Steps = 75
    stage3_guidance: Guidance = 9.0
    stage3_noise_level: NoiseLevel = 100

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("stage1_timesteps", "stage2_timesteps")
    @classmethod
    def _known_timesteps(cls, value: str | None) -> str | None:
        if value is not None and value not in TIMESTEP_LISTS:
            raise ValueError(f"unknown timestep list {value!r}; known: {', '.join(sorted(TIMESTEP_LISTS))}")
        return value

    @classmethod
    def parse(cls, **fields) -> GenerationParams:
        """Validate, turning pydantic's error into an InvalidParameter naming the first bad field."""
        try:
            return cls(**fields)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or "request"
            raise InvalidParameter(param, first["msg"].removeprefix("Value error, ")) from None
