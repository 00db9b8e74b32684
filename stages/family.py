"""What a model family is: its text encoder, its stages in order, its request parameters, its presets
and checkpoint limits, and how a request becomes each stage's work order.

Everything outside a family's own module reads this description; nothing else names a family's stages
or folders. The typed interfaces a family's components implement are here too: `TextEncoder` (prompts
to conditioning) and `StepEngine` (a stage that admits work orders into tasks, runs a batched step over
them and finishes them), which the scheduler's executor drives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from stages.errors import CheckpointError, InvalidParameter
from stages.params import RequestParams
from stages.task import EditImages, StageOutput, StageRequest

TEXT_TO_IMAGE = "text-to-image"


@runtime_checkable
class TextEncoder(Protocol):
    """A family's text encoder: one conditioning per prompt, batched, each as if encoded alone."""

    batch_invariant: bool

    def encode(self, prompts: list[str], negative_prompts: list[str | None] | None = None) -> list[Any]: ...


@runtime_checkable
class StepEngine(Protocol):
    """A stage the scheduler can drive. `admit` turns work orders into tasks (validating them: bad
    input raises InvalidParameter before any task is built); `predict` is the batched model call, one
    output per task, changing no task, so it can be retried task by task; `advance` applies one output
    to its task (one scheduler step); a task is finished when `task.done`, and `finish` makes its output."""

    name: str
    batch_invariant: bool

    def admit(self, requests: list[Any]) -> list[Any]: ...
    def predict(self, tasks: list[Any]) -> list[Any]: ...
    def advance(self, task: Any, output: Any) -> None: ...
    def finish(self, task: Any) -> Any: ...


@dataclass(frozen=True)
class StageSpec:
    name: str  # also the prefix of its request parameters (name "base": fields base_steps, ...)
    title: str  # its deployment name
    folder: str  # its pipeline folder inside the family's checkpoint directory
    output_size: int  # pixels per side of what it produces
    uses_embeddings: bool  # consumes the family's shared text embeddings (else it is given the prompt)
    # (path, *, name, device, torch_dtype, variant, batch_invariant: a mode or a bool) -> the stage's engine
    load: Callable[..., StepEngine]
    edits: bool = False  # an edit's picture and mask go to this stage (its tasks start from them)


@dataclass(frozen=True)
class TaskKind:
    """What a request asks a family to do, with its own request model (an edit kind's defaults are its
    diffusers pipelines' defaults, e.g. a strength per stage)."""

    name: str  # "text-to-image", "image-to-image", "inpainting"
    params: type[RequestParams]
    image: bool = False  # starts from a given picture
    mask: bool = False  # ... and repaints it only where a mask says so


def _no_limits(root: Path) -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class ModelFamily:
    name: str
    encoder_folder: str  # pipeline folder the text encoder loads from
    load_encoder: Callable[..., TextEncoder]  # (path, *, device, torch_dtype, variant, batch_invariant)
    stages: tuple[StageSpec, ...]
    params: type[RequestParams]  # the request model: `request_params(...)` over the stages' groups
    presets: tuple[str, ...] = ()
    # (preset, scratch folder, *, dtype, variant, progress): write every folder of the family there.
    write_pipelines: Callable[..., None] | None = None
    # Upper bounds on request fields that depend on the checkpoint, read without loading weights, so a
    # request is refused at the edge rather than after its first stages ran.
    checkpoint_limits: Callable[[Path], dict[str, float]] = _no_limits
    # Request fields for a quick look on a CPU (`ifserve demo`), e.g. fewer steps than the defaults.
    quick_params: dict[str, Any] = field(default_factory=dict)
    edit_kinds: tuple[TaskKind, ...] = ()  # what it does besides text-to-image (`params`)
    encoder_title: str = "TextEncoder"  # the text encoder's deployment name
    # The loaders' optional switches the family has (IF: "safety_checker").
    options: tuple[str, ...] = ()
    # (preset, *, device, dtype, batch_invariant, progress) -> (encoder, {stage: engine}, reference or None):
    # every engine over random weights built in memory on the device (stages/random_weights.py).
    build_random: Callable[..., tuple] | None = None
    # (preset, dtype, encoder_dtype) -> per deployment its models and calls on the meta device
    # (stages/estimates.py, `ifserve estimate`).
    estimate_calls: Callable[..., dict] | None = None

    def __post_init__(self) -> None:
        names = [spec.name for spec in self.stages]
        if not names or len(set(names)) != len(names) or "text_encoder" in names:
            raise ValueError(f"stages: {self.name} needs stages with distinct names other than text_encoder: {names}")

    def option_error(self, option: str) -> str | None:
        """Why the family cannot take an optional switch (None: it can)."""
        return None if option in self.options else f"{self.name} has no {option.replace('_', ' ')}"

    def check_option(self, option: str) -> None:
        error = self.option_error(option)
        if error:
            raise InvalidParameter(option, error)

    @property
    def kinds(self) -> tuple[TaskKind, ...]:
        return (TaskKind(TEXT_TO_IMAGE, self.params), *self.edit_kinds)

    def kind(self, name: str) -> TaskKind:
        for kind in self.kinds:
            if kind.name == name:
                return kind
        raise InvalidParameter(
            "kind", f"{self.name} does not do {name}; it does {', '.join(k.name for k in self.kinds)}"
        )

    def kind_of(self, params: RequestParams) -> TaskKind:
        for kind in self.kinds:
            if type(params) is kind.params:
                return kind
        raise InvalidParameter("params", f"{type(params).__name__} is not a request model of {self.name}")

    def edit_for(self, *, mask: bool) -> TaskKind:
        """The edit kind for a picture with or without a mask."""
        for kind in self.edit_kinds:
            if kind.image and kind.mask == mask:
                return kind
        raise InvalidParameter(
            "mask" if mask else "image", f"{self.name} has no {'inpainting' if mask else 'image-to-image'}"
        )

    @property
    def folders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([self.encoder_folder, *(s.folder for s in self.stages)]))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s.output_size for s in self.stages)

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
        raise InvalidParameter("size", f"{self.name} produces at most {self.stages[-1].output_size} px, not {size}")

    def cost(self, params: RequestParams) -> float:
        """An image's cost: the steps each of its stages runs x the pixels that stage makes. The one cost
        of the system: fair share, admission and tenant limits all count it."""
        return float(sum(spec.output_size**2 * params.stage(spec.name).expected_steps()
                         for spec in self.stages_for(params.size)))  # fmt: skip

    def standard_cost(self) -> float:
        """The cost of a "standard image": the family's defaults at its largest size (what a tenant's
        images-per-minute limit counts; a costlier image counts as several)."""
        return self.cost(self.params(prompt="a standard image"))

    def check_params(self, params: RequestParams, limits: dict[str, float]) -> None:
        for name, upper in limits.items():
            value = getattr(params, name, None)
            if value is not None and value > upper:
                raise InvalidParameter(name, f"must be at most {upper:g} for these checkpoints, got {value}")

    def stage_request(
        self,
        spec: StageSpec,
        request_id: str,
        params: RequestParams,
        *,
        embeddings: Any = None,
        previous: StageOutput | None = None,
        edit: EditImages | None = None,
        **inputs: Any,
    ) -> StageRequest:
        """The work order of `params` for one stage. The first stage starts the generator from the seed;
        later ones take the previous stage's image and continue its generator. An edit's picture and mask
        go to the stages that take them (`StageSpec.edits`). `inputs` (image, generator_state, seed, ...)
        override what `previous` gives, e.g. to feed a reference image."""
        kind = self.kind_of(params)
        fields: dict[str, Any] = dict(params.stage(spec.name).work_order(), seed=params.seed)
        if spec.edits and kind.image:
            if edit is None or (kind.mask and edit.mask is None):
                raise InvalidParameter("mask" if edit is not None else "image", f"{kind.name} needs it")
            fields.update(init_image=edit.image, mask=edit.mask if kind.mask else None)
        elif spec.edits and edit is not None:
            raise InvalidParameter("image", f"{kind.name} takes no image")
        if spec.uses_embeddings:
            fields["embeddings"] = embeddings
        else:  # the stage encodes the prompt with its own text encoder (IF's x4 upscaler: CLIP)
            fields.update(prompt=params.prompt, negative_prompt=params.negative_prompt)
        if previous is not None:
            fields.update(image=previous.image, generator_state=previous.generator_state)
        fields.update(inputs)
        return StageRequest(request_id=request_id, **fields)

    # ---- checkpoints --------------------------------------------------------------------------------
    def checkpoint_folders(self, root: str | Path, folders: Sequence[str] | None = None) -> dict[str, Path]:
        """The family's pipeline folders under `root`, by folder name; a missing one is a CheckpointError."""
        root = Path(root).expanduser()
        hint = f"make one with `ifserve checkpoints --preset tiny --out {root}`" if self.presets else "see its docs"
        if not root.is_dir():
            raise CheckpointError(f"checkpoints: {root} does not exist ({hint})")
        paths = {folder: root / folder for folder in (folders or self.folders)}
        missing = [name for name, path in paths.items() if not path.is_dir()]
        if missing:
            raise CheckpointError(f"checkpoints: {root} has no {', '.join(missing)} folder ({hint})")
        return paths

    def load_encoder_from(self, root: str | Path, **kw: Any) -> TextEncoder:
        return self.load_encoder(self.checkpoint_folders(root, [self.encoder_folder])[self.encoder_folder], **kw)

    def load_stage(self, name: str, root: str | Path, **kw: Any) -> StepEngine:
        spec = self.stage(name)
        return spec.load(self.checkpoint_folders(root, [spec.folder])[spec.folder], name=name, **kw)
