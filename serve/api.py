"""The HTTP API's request and error shapes: OpenAI's Images API plus the cascade's own fields.

`POST /v1/images/generations` takes OpenAI's fields (`prompt`, `model`, `n`, `size`,
`response_format`, `user`, `stream`) and extension fields named like the `ifserve generate` flags
(`negative_prompt`, `seed`, `stage1_steps`, ...), which the official client sends through `extra_body`.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from stages.params import GenerationParams

SIZES = {"64x64": 64, "256x256": 256, "1024x1024": 1024}
MAX_IMAGES = 8


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1
    size: Literal["64x64", "256x256", "1024x1024"] = "1024x1024"  # where the cascade stops
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: Annotated[str, Field(max_length=256)] | None = None
    stream: bool = False  # server-sent events: a preview per finished stage, then the image
    partial_images: Annotated[int, Field(ge=0, le=3)] | None = None  # accepted; previews are one per stage
    output_format: Literal["png"] = "png"
    # Accepted so that generic OpenAI clients work; they have no effect on this model.
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None

    # Extension fields, as the `ifserve generate` flags. Unset ones take GenerationParams' defaults;
    # an unset seed is drawn at random and returned with each image.
    negative_prompt: str | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63 - MAX_IMAGES)] | None = None
    stage1_steps: int | None = None
    stage1_timesteps: str | None = None
    stage1_guidance: float | None = None
    stage2_steps: int | None = None
    stage2_timesteps: str | None = None
    stage2_guidance: float | None = None
    stage2_noise_level: int | None = None
    stage3_steps: int | None = None
    stage3_guidance: float | None = None
    stage3_noise_level: int | None = None

    def generation_params(self) -> list[GenerationParams]:
        """One GenerationParams per image: image i uses seed + i. Raises InvalidParameter."""
        fields = {
            name: value
            for name, value in self.model_dump(include=set(GenerationParams.model_fields)).items()
            if value is not None
        }
        fields["size"] = SIZES[self.size]
        fields["seed"] = seed = self.seed if self.seed is not None else secrets.randbelow(2**31)
        first = GenerationParams.parse(**fields)
        return [first.model_copy(update={"seed": seed + i}) for i in range(self.n)]


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    kind: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    body: dict[str, Any] = error_body(message, param=param, kind=kind, code=code)
    return JSONResponse(body, status_code=status, headers=headers)


RETRY_AFTER_S = 2


def retry_later(message: str, code: str) -> JSONResponse:
    """503 with Retry-After: the server is not ready, or a stage shed the request."""
    return error_response(503, message, kind="server_error", code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


def error_body(message: str, *, param: str | None = None, kind: str = "invalid_request_error", code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
