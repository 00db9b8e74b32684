"""Model families: which encoder and which denoising stages make up a cascade, in order.

The serving graph is built from this description, not hard-coded: a family names its text encoder,
its stages (folder, output size, whether the stage consumes the shared text embeddings) and how
each stage's inputs are formed from the previous stage's output. A second family (a latent
text-to-image model: CLIP -> UNet -> VAE) is one more entry here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stages.engine import DenoisingStage
from stages.errors import InvalidParameter
from stages.params import GenerationParams
from stages.task import StageOutput, StageRequest, TextEmbeddings


@dataclass(frozen=True)
class StageSpec:
    name: str  # "stage1": also the prefix of its request parameters
    title: str  # "StageI": its deployment name
    folder: str  # pipeline folder inside the checkpoint directory
    output_size: int  # pixels per side of what it produces
    uses_embeddings: bool  # consumes the family's shared text embeddings


@dataclass(frozen=True)
class ModelFamily:
    name: str
    encoder_folder: str  # pipeline folder the text encoder is loaded from
    stages: tuple[StageSpec, ...]
    load_encoder: Callable[..., object]
    load_stage: Callable[..., DenoisingStage]
    # Upper bounds on request fields that depend on the checkpoint, read without loading weights, so
    # a request is refused at the edge rather than after its first stages ran.
    checkpoint_limits: Callable[[Path], dict[str, float]] = lambda root: {}

    def check_params(self, params: GenerationParams, limits: dict[str, float]) -> None:
        for name, upper in limits.items():
            value = getattr(params, name, None)
            if value is not None and value > upper:
                raise InvalidParameter(name, f"must be at most {upper:g} for these checkpoints, got {value}")

    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise KeyError(f"stage: {self.name} has no stage {name!r}; it has {', '.join(s.name for s in self.stages)}")

    def stages_for(self, size: int) -> tuple[StageSpec, ...]:
        """The stages that run for an image of `size` px: the cascade stops at the first that makes it."""
        chosen = []
        for spec in self.stages:
            chosen.append(spec)
            if spec.output_size >= size:
                return tuple(chosen)
        raise ValueError(f"size: {self.name} produces at most {self.stages[-1].output_size} px, not {size}")


def stage_request(
    stage: str | StageSpec,
    request_id: str,
    params: GenerationParams,
    *,
    embeddings: TextEmbeddings | None = None,
    previous: StageOutput | None = None,
    **inputs,
) -> StageRequest:
    """The work order of `params` for one stage. The first stage starts the generator from the seed;
    later ones take the previous stage's image and continue its generator. `inputs` (image,
    generator_state, seed) override what `previous` gives, e.g. to feed a reference image."""
    spec = stage if isinstance(stage, StageSpec) else DEEPFLOYD_IF.stage(stage)
    name = spec.name
    fields = dict(
        steps=getattr(params, f"{name}_steps"),
        guidance_scale=getattr(params, f"{name}_guidance"),
        timesteps=getattr(params, f"{name}_timesteps", None),
        noise_level=getattr(params, f"{name}_noise_level", None),
    )
    if spec.uses_embeddings:
        fields["embeddings"] = embeddings
    else:  # the stage encodes the prompt with its own text encoder (the x4 upscaler's CLIP)
        fields.update(prompt=params.prompt, negative_prompt=params.negative_prompt)
    if previous is not None:
        fields.update(image=previous.image, generator_state=previous.generator_state)
    fields.update(inputs)
    if fields.get("generator_state") is None and "seed" not in fields:
        fields["seed"] = params.seed
    return StageRequest(request_id=request_id, **fields)


def _load_if_encoder(path, **kw):
    from stages.cascade import load_text_encoder

    return load_text_encoder(path, **kw)


def _load_if_stage(stage: str, path, **kw) -> DenoisingStage:
    from stages.cascade import load_stage

    return load_stage(stage, path, **kw)


def _if_limits(root: Path) -> dict[str, float]:
    index = Path(root) / "x4-upscaler" / "model_index.json"
    try:
        return {"stage3_noise_level": json.loads(index.read_text())["max_noise_level"]}
    except (OSError, ValueError, KeyError):
        return {}  # the stage itself still refuses it


DEEPFLOYD_IF = ModelFamily(
    name="deepfloyd-if",
    encoder_folder="IF-I",
    stages=(
        StageSpec("stage1", "StageI", "IF-I", 64, uses_embeddings=True),
        StageSpec("stage2", "StageII", "IF-II", 256, uses_embeddings=True),
        StageSpec("stage3", "StageIII", "x4-upscaler", 1024, uses_embeddings=False),
    ),
    load_encoder=_load_if_encoder,
    load_stage=_load_if_stage,
    checkpoint_limits=_if_limits,
)

FAMILIES: dict[str, ModelFamily] = {DEEPFLOYD_IF.name: DEEPFLOYD_IF}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"family: unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
