"""Write an IF preset as three diffusers-format pipeline folders with random weights:

    DIR/IF-I          IFPipeline                       (T5 text encoder, tokenizer, UNet, scheduler, and with
                                                        `safety_checker=True` IF's safety checker, feature
                                                        extractor and watermarker)
    DIR/IF-II         IFSuperResolutionPipeline        (tokenizer, UNet, schedulers; no text encoder)
    DIR/x4-upscaler   StableDiffusionUpscalePipeline   (CLIP text encoder, tokenizer, UNet, VAE, schedulers)

The folders are saved by diffusers' own pipeline classes, so `DiffusionPipeline.from_pretrained`
loads them exactly as it loads the released checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    IFPipeline,
    IFSuperResolutionPipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.deepfloyd_if import IFSafetyChecker, IFWatermarker
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from stages.families.deepfloyd_if.presets import Preset, get_preset
from stages.tokenizers import keep_tokenizer_sources, train_clip_tokenizer, train_t5_tokenizer

FOLDERS = {"stage1": "IF-I", "stage2": "IF-II", "stage3": "x4-upscaler"}  # the text encoder is in IF-I


def _scheduler(cls, config: dict):
    return cls.from_config({k: v for k, v in config.items() if k != "_class_name"})


def build_text_encoder(preset: Preset, vocab_size: int | None = None) -> T5EncoderModel:
    cfg = preset.config("t5")
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    return T5EncoderModel(T5Config(**cfg))


def build_unet(preset: Preset, stage: str) -> UNet2DConditionModel:
    return UNet2DConditionModel(**preset.config(f"{stage}_unet"))


def build_vae(preset: Preset) -> AutoencoderKL:
    return AutoencoderKL(**preset.config("stage3_vae"))


def build_clip_text_encoder(preset: Preset, vocab_size: int | None = None) -> CLIPTextModel:
    cfg = preset.config("stage3_text_encoder")
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    return CLIPTextModel(CLIPTextConfig(**cfg))


SAFETY_COMPONENTS = ("safety_checker", "feature_extractor", "watermarker")
SAFETY_SEED = 1234  # the safety modules draw from their own generator: the other weights stay as they were
NEVER_FLAGS = -10.0  # the checker heads' bias: a random checker that flags nothing (tests raise it)


def build_safety_modules() -> dict:
    """IF's safety checker (a CLIP vision tower with an NSFW head and a watermark head), its feature
    extractor and its watermarker, tiny and random, in diffusers' layout, for every preset (the released
    checker's configuration is not among the reference configs). The watermark is a visible ring."""
    with torch.random.fork_rng():
        torch.manual_seed(SAFETY_SEED)
        tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        config = CLIPConfig(
            text_config=dict(tower, vocab_size=128),
            vision_config=dict(tower, image_size=32, patch_size=8, projection_dim=16),
            projection_dim=16,
        )
        checker = IFSafetyChecker(config)
        for head in (checker.p_head, checker.w_head):
            head.bias.data.fill_(NEVER_FLAGS)
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    watermarker = IFWatermarker()
    ring = torch.zeros(62, 62, 4)
    ring[4:58, 4:58, :3] = 255.0
    ring[4:58, 4:58, 3] = 255.0
    ring[12:50, 12:50, 3] = 0.0
    watermarker.watermark_image.copy_(ring)
    return {"safety_checker": checker, "feature_extractor": extractor, "watermarker": watermarker}


def _vocab(preset: Preset, component: str, tokenizer) -> int | None:
    # `full` keeps the released embedding tables; smaller presets size them to the trained tokenizer.
    return None if preset.name == "full" else len(tokenizer)


def _cast(pipeline, dtype: torch.dtype):
    return pipeline if dtype == torch.float32 else pipeline.to(dtype)


def write_pipelines(
    preset_name: str,
    out: Path,
    *,
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
    safety_checker: bool = False,
) -> None:
    """Write the three pipeline folders into `out` (a scratch folder: `stages.checkpoints` moves them
    into place once all are written). Weights come from torch's global generator, seeded by the caller.
    `safety_checker` adds IF's safety modules to IF-I. They are opt-in because stock
    `DiffusionPipeline.from_pretrained` cannot load IF's checker with transformers 5 (safety.py says
    why); this project's loader can."""
    preset = get_preset(preset_name)
    save = dict(safe_serialization=True, variant=variant)
    paths = {stage: out / folder for stage, folder in FOLDERS.items()}
    _write_pipelines(preset, paths, out, save, dtype, progress, safety_checker)


def _write_pipelines(
    preset: Preset, paths: dict[str, Path], tmp: Path, save: dict, dtype, progress, safety_checker: bool
) -> None:
    t5_dir, clip_dir = tmp / "tokenizer-t5", tmp / "tokenizer-clip"
    t5_tokenizer = train_t5_tokenizer(t5_dir, preset.t5_pieces)
    clip_tokenizer = train_clip_tokenizer(clip_dir, preset.clip_merges)

    progress(f"IF-I ({preset.name}): T5 text encoder + stage I UNet")
    stage1 = IFPipeline(
        tokenizer=t5_tokenizer,
        text_encoder=build_text_encoder(preset, _vocab(preset, "t5", t5_tokenizer)),
        unet=build_unet(preset, "stage1"),
        scheduler=_scheduler(DDPMScheduler, preset.config("stage1_scheduler")),
        **(build_safety_modules() if safety_checker else dict.fromkeys(SAFETY_COMPONENTS)),
        requires_safety_checker=safety_checker,
    )
    _cast(stage1, dtype).save_pretrained(paths["stage1"], **save)
    keep_tokenizer_sources(t5_dir, paths["stage1"], ("spiece.model",))
    del stage1

    progress(f"IF-II ({preset.name}): stage II UNet")
    stage2 = IFSuperResolutionPipeline(
        tokenizer=t5_tokenizer,
        text_encoder=None,  # stage II reuses stage I's embeddings (text_encoder=None in the reference)
        unet=build_unet(preset, "stage2"),
        scheduler=_scheduler(DDPMScheduler, preset.config("stage2_scheduler")),
        image_noising_scheduler=_scheduler(DDPMScheduler, preset.config("stage2_image_noising_scheduler")),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    _cast(stage2, dtype).save_pretrained(paths["stage2"], **save)
    keep_tokenizer_sources(t5_dir, paths["stage2"], ("spiece.model",))
    del stage2

    progress(f"x4-upscaler ({preset.name}): CLIP text encoder + UNet + VAE")
    stage3 = StableDiffusionUpscalePipeline(
        vae=build_vae(preset),
        text_encoder=build_clip_text_encoder(preset, _vocab(preset, "clip", clip_tokenizer)),
        tokenizer=clip_tokenizer,
        unet=build_unet(preset, "stage3"),
        low_res_scheduler=_scheduler(DDPMScheduler, preset.config("stage3_low_res_scheduler")),
        scheduler=_scheduler(DDIMScheduler, preset.config("stage3_scheduler")),
        max_noise_level=350,
    )
    _cast(stage3, dtype).save_pretrained(paths["stage3"], **save)
    keep_tokenizer_sources(clip_dir, paths["stage3"], ("vocab.json", "merges.txt"))


def parameter_counts(preset_name: str) -> dict[str, int]:
    """Parameters per model, built on the meta device (no memory, no weights written)."""
    preset = get_preset(preset_name)
    builders = {
        "t5_encoder": lambda: build_text_encoder(preset),
        "stage1_unet": lambda: build_unet(preset, "stage1"),
        "stage2_unet": lambda: build_unet(preset, "stage2"),
        "stage3_unet": lambda: build_unet(preset, "stage3"),
        "stage3_vae": lambda: build_vae(preset),
        "stage3_text_encoder": lambda: build_clip_text_encoder(preset),
    }
    counts = {}
    with torch.device("meta"):
        for name, build in builders.items():
            counts[name] = sum(p.numel() for p in build().parameters())
    return counts


# ---- random weights in memory, on the device (no checkpoint folder) -----------------------------------


def as_loaded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` in `dtype` as `from_pretrained(torch_dtype=dtype)` holds it: in float16 the modules a model
    keeps in float32 (`_keep_in_fp32_modules`: T5's feed-forward output layers `wo`) stay float32, so
    that float16 T5 counts at its real size."""
    torch.nn.Module.to(model, dtype)  # the plain cast: diffusers' own `to` warns of what is done next
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype == torch.float16 and keep:
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in keep:
                module.to(torch.float32)
    return model.eval().requires_grad_(False)


def build_pipelines(
    preset_name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, object]:
    """The three pipelines `write_pipelines` saves, built in memory instead, by stage: random weights
    made on `device` (each model initialised there in float32, then cast to `dtype` as loading casts
    it), nothing written to disk. For `full` in float16 on a GPU, the 45 GB that the released weights
    and a written checkpoint would take on disk are never needed. Weights come from torch's global
    generator (seed it first); the tokenizers are the presets' trained ones."""
    import tempfile

    preset = get_preset(preset_name)
    with tempfile.TemporaryDirectory(prefix="if-tokenizers-") as tmp:
        t5_tokenizer = train_t5_tokenizer(Path(tmp) / "t5", preset.t5_pieces)
        clip_tokenizer = train_clip_tokenizer(Path(tmp) / "clip", preset.clip_merges)

    def build(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        with torch.device(device):
            model = make()
        return as_loaded(model, dtype)

    progress(f"IF-I ({preset.name}, {dtype}, on {device}): T5 text encoder + stage I UNet")
    stage1 = IFPipeline(
        tokenizer=t5_tokenizer,
        text_encoder=build(lambda: build_text_encoder(preset, _vocab(preset, "t5", t5_tokenizer))),
        unet=build(lambda: build_unet(preset, "stage1")),
        scheduler=_scheduler(DDPMScheduler, preset.config("stage1_scheduler")),
        **dict.fromkeys(SAFETY_COMPONENTS),
        requires_safety_checker=False,
    )
    progress(f"IF-II ({preset.name}): stage II UNet")
    stage2 = IFSuperResolutionPipeline(
        tokenizer=t5_tokenizer,
        text_encoder=None,
        unet=build(lambda: build_unet(preset, "stage2")),
        scheduler=_scheduler(DDPMScheduler, preset.config("stage2_scheduler")),
        image_noising_scheduler=_scheduler(DDPMScheduler, preset.config("stage2_image_noising_scheduler")),
        **dict.fromkeys(SAFETY_COMPONENTS),
        requires_safety_checker=False,
    )
    progress(f"x4-upscaler ({preset.name}): CLIP text encoder + UNet + VAE")
    stage3 = StableDiffusionUpscalePipeline(
        vae=build(lambda: build_vae(preset)),
        text_encoder=build(lambda: build_clip_text_encoder(preset, _vocab(preset, "clip", clip_tokenizer))),
        tokenizer=clip_tokenizer,
        unet=build(lambda: build_unet(preset, "stage3")),
        low_res_scheduler=_scheduler(DDPMScheduler, preset.config("stage3_low_res_scheduler")),
        scheduler=_scheduler(DDIMScheduler, preset.config("stage3_scheduler")),
        max_noise_level=350,
    )
    pipes = {"stage1": stage1, "stage2": stage2, "stage3": stage3}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def _sharing(pipe, **replace):
    """A pipeline of `pipe`'s class over the same models (no copy of any weight), with its own copies of
    the schedulers and tokenizers, and `replace`'s components instead of those."""
    import copy

    components = {
        name: value if value is None or isinstance(value, torch.nn.Module) else copy.deepcopy(value)
        for name, value in pipe.components.items()
    }
    extra = {"max_noise_level": pipe.config.max_noise_level} if "max_noise_level" in pipe.config else {}
    if "requires_safety_checker" in pipe.config:
        extra["requires_safety_checker"] = False
    shared = type(pipe)(**{**components, **replace}, **extra)
    shared.set_progress_bar_config(disable=True)
    return shared


def random_engines(
    preset_name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_invariant: bool | str = True,
    progress: Callable[[str], None] = lambda message: None,
) -> tuple[object, dict[str, object], tuple[object, object, object]]:
    """IF's text encoder and stage engines over random weights built on `device` (`build_pipelines`), as
    the loaders make them from a checkpoint folder (the encoder's pipeline without the UNet, stage I's
    without T5), and the seed's three reference pipelines (stages/reference.py) over the same models:
    (encoder, {stage name: engine}, (stage_1, stage_2, stage_3))."""
    from stages.encoding import PipelineTextEncoder
    from stages.families.deepfloyd_if.pixel_stages import StageI, StageII
    from stages.families.deepfloyd_if.upscaler import StageIII

    pipes = build_pipelines(preset_name, device=device, dtype=dtype, progress=progress)
    encoder = PipelineTextEncoder(_sharing(pipes["stage1"], unet=None), batch_invariant)
    engines = {
        "stage1": StageI(_sharing(pipes["stage1"], text_encoder=None), batch_invariant, "stage1"),
        "stage2": StageII(_sharing(pipes["stage2"]), batch_invariant, "stage2"),
        # Built before the reference pipelines run: it keeps the VAE in float32 as the upscaler pipeline
        # does for its decode (force_upcast), so the reference finds it so and leaves it.
        "stage3": StageIII(_sharing(pipes["stage3"]), batch_invariant, "stage3"),
    }
    return encoder, engines, (pipes["stage1"], pipes["stage2"], pipes["stage3"])
