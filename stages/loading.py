"""Find and load diffusers pipeline folders: a local path or a Hugging Face cache entry, never a
download. Everything that can go wrong is reported as a CheckpointError naming the folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from stages.errors import CheckpointError


def resolve_checkpoint(location: str | Path, param: str = "checkpoint") -> Path:
    """A local pipeline folder, or a repo id already in the Hugging Face cache (offline)."""
    path = Path(location).expanduser()
    if not path.exists() and "/" in str(location) and not str(location).startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(location), local_files_only=True))
        except Exception:  # noqa: BLE001 - any miss means: not cached
            raise CheckpointError(
                f"{param}: {location} is neither a folder nor a model in the local Hugging Face cache "
                "(nothing is downloaded at run time; run `ifserve checkpoints` or fetch it first)"
            ) from None
    if not path.is_dir():
        raise CheckpointError(f"{param}: checkpoint folder {path} does not exist")
    index = path / "model_index.json"
    if not index.is_file():
        what = "is empty" if not any(path.iterdir()) else "has no model_index.json"
        raise CheckpointError(f"{param}: {path} {what}; it is not a diffusers pipeline folder")
    try:
        json.loads(index.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{param}: cannot read {index}: {err}") from None
    return path


def pipeline_class(path: Path) -> str:
    return json.loads((path / "model_index.json").read_text()).get("_class_name", "?")


def load_pipeline(
    location: str | Path,
    *,
    expect: tuple[str, ...],
    exclude: tuple[str, ...] = (),
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    device: str | torch.device = "cpu",
    param: str = "checkpoint",
    cpu_offload: bool = False,
    components: dict | None = None,
) -> DiffusionPipeline:
    """Load the pipeline in `location`, leaving out the components in `exclude` (set to None) and using
    the given `components` instead of loading them. With `cpu_offload` its models stay in CPU memory and
    each moves to the GPU `device` only while it runs (diffusers' model CPU offload)."""
    if cpu_offload and torch.device(device).type == "cpu":
        raise CheckpointError(f"{param}: cpu_offload needs a GPU device, not {device}")
    path = resolve_checkpoint(location, param)
    found = pipeline_class(path)
    if found not in expect:
        raise CheckpointError(f"{param}: {path} holds a {found}; expected {' or '.join(expect)}")
    try:
        pipe = DiffusionPipeline.from_pretrained(
            path,
            local_files_only=True,
            torch_dtype=torch_dtype,
            variant=variant,
            **dict.fromkeys(exclude),
            **(components or {}),
        )
    except Exception as err:  # noqa: BLE001 - diffusers raises many types for broken folders
        raise CheckpointError(f"{param}: cannot load {found} from {path}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)
