"""The served models as the API sees them, and one image request from checked fields to OpenAI's
response body: shared by the HTTP routes (serve/http_app.py) and the batch runner (serve/batch), so a
batch line's body is exactly what /v1/images/generations would have answered."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from serve.blob_store import BlobStore, UrlSigner
from serve.config import ModelGraph, ServeConfig, StorageConfig, model_slug
from serve.database import Database, shared_secret
from serve.openai_api import (
    ImageEditRequestBase,
    ImageRequestBase,
    final_png,
    image_item,
    image_request_model,
    images_response,
    parse_request,
    requested_model,
    safety_fields,
)
from serve.orchestrator import Orchestrator
from serve.workers import PICTURES, run_on
from stages.errors import InvalidParameter
from stages.fair_share import Share
from stages.family import ModelFamily
from stages.params import RequestParams
from stages.pictures import read_edit
from stages.task import EditImages

IMAGE_ROUTE = "/v1/images/files"


class UnknownModel(InvalidParameter):
    """The request names a model not served here (the API answers 404)."""


@dataclass
class ServedModel:
    """One model as the API serves it: its card, request models, checkpoint limits and orchestrator."""

    id: str
    family: ModelFamily
    orchestrator: Orchestrator
    request_model: type[ImageRequestBase]
    edit_models: dict[str, type[ImageEditRequestBase]]  # by edit kind (their defaults differ)
    limits: dict[str, float]

    @classmethod
    def of(cls, graph: ModelGraph, orchestrator: Orchestrator, default: bool) -> ServedModel:
        # The default model's schemas are ImageGenerationRequest, ImageEditRequest and ImageEditMaskRequest;
        # another model's carry its id, e.g. ImageGenerationRequest_decidiffusion_tiny.
        suffix = "" if default else "_" + model_slug(graph.model.id)
        family = graph.family
        edit_models = {
            kind.name: image_request_model(
                kind.params,
                ("ImageEditMaskRequest" if kind.mask else "ImageEditRequest") + suffix,
                ImageEditRequestBase,
            )
            for kind in family.edit_kinds
        }
        return cls(
            graph.model.id,
            family,
            orchestrator,
            image_request_model(family.params, "ImageGenerationRequest" + suffix),
            edit_models,
            family.checkpoint_limits(graph.checkpoint_root()),
        )

    def units(self, images: list[RequestParams]) -> float:
        """What the images count against a tenant's images-per-minute limit: each one, or the standard
        images (the family's defaults at its largest size) its cost makes when it costs more."""
        standard = self.family.standard_cost()
        return sum(max(1.0, self.family.cost(params) / standard) for params in images)

    @property
    def card(self) -> dict:
        sizes = [f"{s}x{s}" for s in self.family.sizes]
        kinds = [kind.name for kind in self.family.kinds]
        return {"id": self.id, "object": "model", "created": 0, "owned_by": "ifserve", "family": self.family.name,
                "sizes": sizes, "kinds": kinds}  # fmt: skip


class ServedModels(dict[str, ServedModel]):
    """Every served model by id; the config's first is the default."""

    @classmethod
    def of(cls, config: ServeConfig, orchestrators: dict[str, Orchestrator]) -> ServedModels:
        return cls(
            (graph.model.id, ServedModel.of(graph, orchestrators[graph.model.id], default=i == 0))
            for i, graph in enumerate(config.graphs)
        )

    def named(self, model: str | None) -> ServedModel:
        """The model a request names (unset: the default)."""
        if model is None:
            return next(iter(self.values()))
        if model not in self:
            raise UnknownModel("model", f"{model!r} is not served here; GET /v1/models lists the models")
        return self[model]

    def generation(self, fields: dict[str, Any]) -> tuple[ServedModel, ImageRequestBase, list[RequestParams]]:
        """A generation request's fields, checked: its model, body and images (InvalidParameter if bad)."""
        target = self.named(requested_model(fields))
        body = parse_request(target.request_model, fields)
        images = body.generation_params()
        target.family.check_params(images[0], target.limits)
        return target, body, images

    def edit(
        self, fields: dict[str, Any], image: bytes | BinaryIO, mask: bytes | BinaryIO | None, max_pixels: int
    ) -> tuple[ServedModel, ImageRequestBase, list[RequestParams], EditImages]:
        """An edit's fields and pictures, checked: its model, body, images and what it starts from."""
        target = self.named(requested_model(fields))
        kind = target.family.edit_for(mask=mask is not None)
        body = parse_request(target.edit_models[kind.name], fields)
        images = body.generation_params()
        target.family.check_params(images[0], target.limits)
        return target, body, images, read_edit(image, mask, max_pixels=max_pixels)

    def edit_json(
        self, fields: dict[str, Any], max_pixels: int
    ) -> tuple[ServedModel, ImageRequestBase, list[RequestParams], EditImages]:
        """An edit as a JSON body (a batch line): `image` and the optional `mask` as base64, or data URLs."""
        fields = dict(fields)
        image = _picture_bytes("image", fields.pop("image", None))
        mask = fields.pop("mask", None)
        return self.edit(fields, image, None if mask is None else _picture_bytes("mask", mask), max_pixels)


def _picture_bytes(field: str, value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        raise InvalidParameter(field, "is required: the picture as base64, or a data: URL (data:image/png;base64,...)")
    if value.startswith("data:"):
        header, sep, value = value.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidParameter(field, "a data: URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameter(field, "is not valid base64") from None


BATCH_IMAGE_PREFIX = "batchreq_"  # the request ids of batch lines, which name their images


class ImageLinks:
    """`response_format: url` images: kept in the blob store under their tenant, linked by signed URLs
    that expire (`storage.url_ttl_s`), so a browser opens them without a key. A batch line's images (named
    by its request id) are kept, and their links work, as long as the batch's output file that lists them
    can exist: the completion window plus `batch.output_ttl_s` from when they were made."""

    def __init__(self, blobs: BlobStore, signer: UrlSigner, batch_ttl_s: float):
        self.blobs, self.signer, self.batch_ttl_s = blobs, signer, batch_ttl_s

    @classmethod
    def of(cls, config: ServeConfig, database: Database) -> ImageLinks:
        """The config's store and the signer every replica shares."""
        window = 24 * 3600.0  # the one completion window (serve/batch/store.py)
        return cls(BlobStore(config.storage.url), url_signer(config.storage, database),
                   window + config.batch.output_ttl_s)  # fmt: skip

    @staticmethod
    def owner(tenant_id: str) -> str:
        """A tenant's folder: a digest of its id, so no tenant's name or id is a path."""
        return hashlib.sha256(tenant_id.encode()).hexdigest()[:32]

    def key(self, owner: str, name: str) -> str:
        return f"images/{owner}/{name}"

    def ttl_s(self, name: str) -> float:
        return self.batch_ttl_s if name.startswith(BATCH_IMAGE_PREFIX) else self.signer.ttl_s

    def save(self, tenant_id: str, name: str, picture: bytes, base_url: str) -> str:
        owner = self.owner(tenant_id)
        self.blobs.write(self.key(owner, name), picture)
        return base_url.rstrip("/") + self.signer.sign(f"{IMAGE_ROUTE}/{owner}/{name}", ttl_s=self.ttl_s(name))

    def sweep(self) -> int:
        """Delete the images whose links have expired."""
        return self.blobs.sweep("images", lambda key: self.ttl_s(key.rsplit("/", 1)[-1]))

    def delete_tenant(self, tenant_id: str) -> None:
        self.blobs.delete(f"images/{self.owner(tenant_id)}")


def url_signer(storage: StorageConfig, database: Database) -> UrlSigner:
    """The signer every replica shares: its secret from `storage.url_secret_env`, or the database's (read
    when first needed, so a replica starts while the database is down)."""
    if storage.url_secret_env:
        secret = os.environ.get(storage.url_secret_env)
        if not secret:
            raise ValueError(f"storage.url_secret_env: the environment variable {storage.url_secret_env} is not set")
        return UrlSigner(secret.encode(), storage.url_ttl_s)
    return UrlSigner(lambda: shared_secret(database, "url_signing_key"), storage.url_ttl_s)


Publish = Callable[[str, bytes], Awaitable[str]]  # (file name, PNG) -> its URL


async def generate(
    target: ServedModel,
    request_id: str,
    body: ImageRequestBase,
    images: list[RequestParams],
    edit: EditImages | None,
    share: Share,
    publish: Publish,
    deadline: float | None = None,
) -> dict:
    """Run the request through the serving graph; OpenAI's response body (`b64_json`, or `url` through
    `publish`). Errors are the orchestrator's (InvalidParameter, Overloaded, StageFailure)."""
    results = await target.orchestrator.images(request_id, images, edit, share, deadline)
    data = []
    for i, (params, result) in enumerate(zip(images, results, strict=True)):
        picture = await run_on(PICTURES, final_png, result)
        flags = safety_fields(result)
        if body.response_format == "url":
            url = await publish(f"{request_id}-{i}.png", picture)
            data.append(image_item(params.seed, result.timings(), url=url, **flags))
        else:
            data.append(image_item(params.seed, result.timings(), picture, **flags))
    return images_response(request_id, target.id, data)
