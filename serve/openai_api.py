"""The OpenAI shapes of the HTTP API, in one place: the image-generation request (OpenAI's Images API
fields plus the family's own parameters), the response, errors, and the streaming events.

`POST /v1/images/generations` takes OpenAI's fields (`prompt`, `model`, `n`, `size`, `response_format`,
`user`, `stream`) and, as extension fields that the official client sends through `extra_body`, every
field of the family's request parameters but the prompt and size (`negative_prompt`, `seed`,
`stage1_steps`, ...), derived from them with their bounds and descriptions, so nothing is declared twice.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Annotated, Any, ClassVar, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from stages.errors import InvalidParameter
from stages.images import png_bytes, to_pil
from stages.params import RequestParams, invalid_parameter

MAX_IMAGES = 8
RETRY_AFTER_S = 2
OPENAI_FIELDS = ("prompt", "size", "seed")  # family fields the OpenAI part of the request declares itself


class ImageRequestBase(BaseModel):
    """OpenAI's own fields; `image_request_model` adds the family's."""

    model_config = ConfigDict(extra="forbid")
    PARAMS: ClassVar[type[RequestParams]]  # the family's request parameters (set on the derived class)

    prompt: str
    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1
    size: str = "1024x1024"  # where the cascade stops; the derived model lists the family's sizes
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
    seed: Annotated[int, Field(ge=0, lt=2**63 - MAX_IMAGES)] | None = Field(
        None, description="seed of image 0 (image i uses seed + i); random if unset, returned per image"
    )

    def generation_params(self) -> list[RequestParams]:
        """One RequestParams per image: image i uses seed + i. Raises InvalidParameter."""
        names = set(self.PARAMS.model_fields) - set(OPENAI_FIELDS)
        fields = {k: v for k, v in self.model_dump(include=names).items() if v is not None}
        fields.update(self.shorthands(fields))
        fields["prompt"] = self.prompt
        fields["size"] = int(self.size.partition("x")[0])
        fields["seed"] = seed = self.seed if self.seed is not None else secrets.randbelow(2**31)
        first = self.PARAMS.parse(**fields)
        return [first.model_copy(update={"seed": seed + i}) for i in range(self.n)]

    def shorthands(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {}


class ImageEditRequestBase(ImageRequestBase):
    """`POST /v1/images/edits`: the generation fields (sent as multipart form fields, beside the `image`
    and `mask` files), OpenAI's edit-only fields, and `strength`, shorthand for `stage1_strength`."""

    input_fidelity: str | None = None  # accepted; no effect on this model
    output_compression: int | None = None
    strength: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        None, description="how much of the picture the first stage redraws (its `<stage>_strength`)"
    )

    def shorthands(self, fields: dict[str, Any]) -> dict[str, Any]:
        if self.strength is None:
            return {}
        first = next((f for f in self.PARAMS.model_fields if f.endswith("_strength")), None)
        if first is None:
            raise InvalidParameter("strength", "this model's edits take no strength")
        if first in fields:
            raise InvalidParameter("strength", f"give strength or {first}, not both")
        return {first: self.strength}


def image_request_model(
    params: type[RequestParams], title: str = "ImageGenerationRequest", base: type[ImageRequestBase] = ImageRequestBase
) -> type[ImageRequestBase]:
    """The request model for a family: OpenAI's fields, `size` as the family's "WxH" sizes, and each
    family field, optional, with its bounds and description (unset: the family's default)."""
    sizes = tuple(f"{s}x{s}" for s in params.model_fields["size"].annotation.__args__)
    fields: dict[str, Any] = {"size": (Literal[sizes], Field(sizes[-1], description="where the cascade stops"))}
    for name, info in params.model_fields.items():
        if name not in OPENAI_FIELDS:
            fields[name] = (info.annotation | None, FieldInfo.merge_field_infos(info, default=None))
    model = create_model(title, __base__=base, **fields)
    model.PARAMS = params
    return model


def json_object(body: bytes) -> dict[str, Any]:
    """A JSON request body, which must be an object of text that can be stored and encoded."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidParameter("body", f"not valid JSON: {err}") from None
    except RecursionError:
        raise InvalidParameter("body", "not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidParameter("body", "must be a JSON object")
    check_text(data)
    return data


def _unsafe(text: str) -> bool:
    """Whether a string holds what no database column, tokenizer or UTF-8 encoder takes: a NUL, or a lone
    surrogate (valid in JSON as "\\ud800", but not text)."""
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def shown(text: str, limit: int = 64) -> str:
    """A client's string as it may appear in an error message: escaped to ASCII, and cut short."""
    escaped = text.encode("ascii", "backslashreplace").decode()
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def unsafe_text(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (a key or a value) in parsed JSON that is not storable text
    (`_unsafe`), None if there is none."""
    if isinstance(value, str):
        return (path or "body") if _unsafe(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}.{shown(str(key))}" if path else shown(str(key))
        if isinstance(key, str) and _unsafe(key):
            return where
        found = unsafe_text(item, where)
        if found is not None:
            return found
    return None


def check_text(fields: dict[str, Any]) -> None:
    """InvalidParameter naming the first field that is not storable text (a JSON body, a form's fields)."""
    bad = unsafe_text(fields)
    if bad is not None:
        raise InvalidParameter(bad, "must be text without NUL characters or lone surrogates")


def requested_model(fields: dict[str, Any]) -> str | None:
    """The `model` a request names, before its model-specific fields are read (they depend on it)."""
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidParameter("model", "must be a string")
    return model


def parse_request(model: type[ImageRequestBase], fields: dict[str, Any]) -> ImageRequestBase:
    """A request's fields, from a JSON object or a multipart form (all strings there: "2", "true", "0.5"
    convert as JSON's would)."""
    try:
        return model.model_validate(fields)
    except ValidationError as err:
        raise invalid_parameter(err) from None


# ---- responses and errors -------------------------------------------------------------------------------
class AsciiJSONResponse(JSONResponse):
    """JSON escaped to ASCII: a client's string echoed back (a lone surrogate in a field name, say) can
    never fail to encode and turn a 400 into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_body(message: str, *, param: str | None = None, kind: str = "invalid_request_error", code=None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    kind: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(message, param=param, kind=kind, code=code)
    return AsciiJSONResponse(body, status_code=status, headers=headers)


def retry_later(message: str, code: str) -> JSONResponse:
    """503 with Retry-After: the server is not ready, or a stage shed the request."""
    return error_response(503, message, kind="server_error", code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


# ---- images ---------------------------------------------------------------------------------------------
def png(image) -> bytes:
    """A (1, 3, H, W) image in [-1, 1] as PNG bytes."""
    return png_bytes(to_pil(image))


def final_png(result) -> bytes:
    """A stage result's final picture: as the safety checker left it, when it ran."""
    return png_bytes(result.presented.picture) if result.presented is not None else png(result.output.image)


def safety_fields(result) -> dict[str, bool]:
    """`nsfw_detected` and `watermark_detected` (diffusers' names) when the safety checker ran: a flagged
    image is black."""
    presented = result.presented
    if presented is None:
        return {}
    return {"nsfw_detected": presented.nsfw_detected, "watermark_detected": presented.watermark_detected}


def image_item(seed: int, stages: list[dict], picture: bytes | None = None, url: str | None = None, **extra) -> dict:
    item: dict[str, Any] = {"revised_prompt": None, "seed": seed, "stages": stages, **extra}
    if url is not None:
        item["url"] = url
    else:
        item["b64_json"] = base64.b64encode(picture).decode()
    return item


def images_response(request_id: str, model: str, data: list[dict]) -> dict:
    return {"created": int(time.time()), "model": model, "id": request_id, "data": data}


def image_event(
    kind: str, index: int, seed: int, picture: bytes, size: int, prefix="image_generation", **extra
) -> dict:
    """One streaming event, shaped like OpenAI's `image_generation.partial_image` / `.completed` (with
    `prefix="image_edit"`, its `image_edit.*` events)."""
    return {
        "type": f"{prefix}.{kind}",
        "index": index,
        "seed": seed,
        "b64_json": base64.b64encode(picture).decode(),
        "size": f"{size}x{size}",
        "created_at": int(time.time()),
        "output_format": "png",
        "quality": "auto",
        "background": "opaque",
        **extra,
    }
