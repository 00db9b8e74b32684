"""Request parameters, declared once per family as per-stage groups.

A family declares one small pydantic model per stage (`StageParams`: steps, guidance, and where the
stage has them a timestep list and a noise level, each with its default and description) and
`request_params` flattens them into the family's request model with fields `<stage>_<field>`
(`stage1_steps`, `stage2_noise_level`, ...). The engine's validation, the HTTP schema
(`serve/openai_api.py`) and the `ifserve generate` flags (`serve/cli.py`) are all derived from that one
model, so a field, its bounds and its default are written in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from stages.errors import InvalidParameter

MAX_STEPS = 1000
MAX_PROMPT_CHARS = 2000

Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Guidance = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)]
NoiseLevel = Annotated[int, Field(ge=0, lt=1000)]
Strength = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]


def expected_steps(steps: int, timesteps: Sequence[int] | None, strength: float | None) -> int:
    """The steps a stage runs: its timestep list's length (or `steps`), of which a strength keeps the last part.
    One rule for fair share, admission, tenant limits and the planner."""
    n = len(timesteps) if timesteps else steps
    return n if strength is None else max(1, min(int(n * strength), n))


def invalid_parameter(err: ValidationError, prefix: str = "") -> InvalidParameter:
    """pydantic's first error as an InvalidParameter naming the field by its dotted path."""
    first = err.errors()[0]
    param = prefix + ".".join(str(p) for p in first["loc"]) or "request"
    message = first["msg"].removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    return InvalidParameter(param, message)


class StageParams(BaseModel):
    """One stage's parameters. Subclasses declare `steps` and `guidance` (and, where the stage has them,
    `timesteps` and `noise_level`) with the reference's defaults; `TIMESTEP_LISTS` names the timestep
    lists the stage accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    TIMESTEP_LISTS: ClassVar[dict[str, list[int]]] = {}

    def expected_steps(self) -> int:
        """The denoising steps this stage will run for these parameters."""
        order = self.work_order()
        return expected_steps(order["steps"], order["timesteps"], order["strength"])

    def work_order(self) -> dict[str, Any]:
        """The fields of this stage's `StageRequest`: a named timestep list becomes its values."""
        name = getattr(self, "timesteps", None)
        return dict(
            steps=self.steps,
            guidance_scale=self.guidance,
            timesteps=None if name is None else list(self.TIMESTEP_LISTS[name]),
            noise_level=getattr(self, "noise_level", None),
            strength=getattr(self, "strength", None),
        )

    @classmethod
    def known_timesteps(cls, value: str | None) -> str | None:
        if value is not None and value not in cls.TIMESTEP_LISTS:
            raise ValueError(f"unknown timestep list {value!r}; known: {', '.join(sorted(cls.TIMESTEP_LISTS))}")
        return value


class RequestParams(BaseModel):
    """What every family's request has; `request_params` adds `size` and the stage groups' fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    STAGES: ClassVar[dict[str, type[StageParams]]] = {}

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to draw")]
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = Field(
        None, description="what to steer away from, used by every stage"
    )
    seed: Annotated[int, Field(ge=0, lt=2**63)] = Field(0, description="seed of the generator the stages share")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @classmethod
    def parse(cls, **fields):
        """Validate, turning pydantic's error into an InvalidParameter naming the first bad field."""
        try:
            return cls(**fields)
        except ValidationError as err:
            raise invalid_parameter(err) from None

    def stage(self, name: str) -> StageParams:
        """One stage's group, read back from the flat fields."""
        group = self.STAGES[name]
        return group(**{field: getattr(self, f"{name}_{field}") for field in group.model_fields})


def request_params(
    name: str, stages: dict[str, type[StageParams]], sizes: Sequence[int], *, module: str
) -> type[RequestParams]:
    """A family's request model: prompt, negative prompt, seed, `size` (one of `sizes`, the largest by
    default) and every stage group's fields as `<stage>_<field>`, with their bounds, defaults and
    descriptions. Field validators of the groups (e.g. known timestep lists) apply to the flat fields.
    Assign the model to `name` in `module`, so that it pickles by reference."""
    fields: dict[str, Any] = {
        "size": (Literal[tuple(sizes)], Field(max(sizes), description="pixels per side: where the cascade stops"))
    }
    validators = {}
    for stage, group in stages.items():
        for field, info in group.model_fields.items():
            fields[f"{stage}_{field}"] = (info.annotation, info)
        if "timesteps" in group.model_fields:
            validators[f"_{stage}_timesteps"] = field_validator(f"{stage}_timesteps")(_timesteps_check(group))
    model = create_model(name, __base__=RequestParams, __validators__=validators, __module__=module, **fields)
    model.STAGES = dict(stages)
    return model


def _timesteps_check(group: type[StageParams]):
    def check(cls, value: str | None) -> str | None:
        return group.known_timesteps(value)

    return check
