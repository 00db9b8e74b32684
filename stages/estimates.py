"""`ifserve estimate`: a one-GPU profile of a family from its model configs alone, until a measured one
exists. The models are built on torch's meta device (no weights, no GPU); each deployment's calls are
run there, counting FLOPs (torch's FlopCounterMode), the peak of the activations alive at once and the
kernels launched; a step's time is its FLOPs at a sustained rate or its launches at a fixed cost each,
whichever is longer. A family offers it through `ModelFamily.estimate_calls`. No Ray.
"""

from __future__ import annotations

from typing import Any

from stages.errors import InvalidParameter
from stages.families import get_family
from stages.profiling import Profile, StageProfile

ENCODER = "text_encoder"
GIB = 1 << 30

# The ops batch invariance's "split" runs once per task (stages/batch_invariance.py: linear, convolution,
# group and layer norm, scaled-dot-product attention), as the aten ops they reach.
_SPLIT_OPS = frozenset(
    {
        "linear",
        "conv1d",
        "conv2d",
        "group_norm",
        "layer_norm",
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "convolution",
        "native_group_norm",
        "native_layer_norm",
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    }
)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def loaded_bytes(model: Any, dtype: str) -> int:
    """Bytes of `model`'s parameters and buffers once `from_pretrained(torch_dtype=dtype)` has loaded it.
    transformers 5 keeps in float32 the weights whose names match the model's `_keep_in_fp32_modules`
    when it loads in float16 only, and those matching `_keep_in_fp32_modules_strict` in float16 and
    bfloat16 (modeling_utils `_get_dtype_plan`, matched by regular-expression search on the weight's
    name). T5's list is ["wo"], its feed-forward output layers: in float16 they stay float32, in
    bfloat16 nothing does."""
    import itertools
    import re

    keep = list(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype == "float16" else []
    if dtype in ("float16", "bfloat16"):
        keep += list(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    kept = re.compile("|".join(keep)) if keep else None
    total = 0
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if not tensor.is_floating_point():
            size = tensor.element_size()
        elif kept is not None and kept.search(name):
            size = 4
        else:
            size = _DTYPE_BYTES[dtype]
        total += tensor.numel() * size
    return total


class _Tally:
    """Runs calls on the meta device and keeps, per call: its FLOPs (torch's FlopCounterMode), the peak
    bytes of the tensors it made that were alive at once (its activations), the kernels it launches (ops
    that are not views) and how many of them batch invariance's "split" runs once per task."""

    def __init__(self) -> None:
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        tally = self

        class Live(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                returns = func._schema.returns
                if not (returns and returns[0].alias_info is not None):  # a view launches nothing
                    tally.ops += 1
                    tally.split_ops += func.overloadpacket.__name__ in _SPLIT_OPS
                for tensor in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(tensor, torch.Tensor):
                        tally._hold(tensor, weakref)
                return out

        self._mode = Live
        self.live: dict[int, list[int]] = {}
        self.now = self.peak = self.ops = self.split_ops = 0

    def _hold(self, tensor: Any, weakref: Any) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        weakref.finalize(tensor, self._drop, key)

    def _drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]

    def run(self, call) -> dict[str, float]:
        """One call's FLOPs, activation peak (bytes), launched ops and split ops."""
        import gc

        import torch
        from torch.utils.flop_counter import FlopCounterMode

        self.live.clear()
        self.now = self.peak = self.ops = self.split_ops = 0
        # The counter beneath: this mode sees the ops as the model calls them (a linear layer, one kernel),
        # the counter their decompositions (its matrix product), which is where its FLOPs formulas are.
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), torch.device("meta"), counter, self._mode():
            call()
        gc.collect()
        return {"flops": counter.get_total_flops(), "peak": self.peak, "ops": self.ops, "split_ops": self.split_ops}


def _call_s(tally: dict[str, float], tasks: int, mode: str, tflops: float, launch_us: float) -> float:
    """One call's time: its FLOPs at the sustained rate, or its kernel launches, whichever is longer (the
    host queues kernels while the GPU runs earlier ones). "split" launches its batch-sensitive ops once
    per task; "per_task" makes a whole call per task (`tally` is then one task's)."""
    gpu_s = tally["flops"] / (tflops * 1e12)
    if mode == "per_task":
        return tasks * max(gpu_s, tally["ops"] * launch_us * 1e-6)
    launches = tally["ops"] + (tasks - 1) * tally["split_ops"] if mode == "split" else tally["ops"]
    return max(gpu_s, launches * launch_us * 1e-6)


def weights_bytes(family_name: str = "deepfloyd-if", preset: str = "full", dtype: str = "float16",
                  text_encoder_dtype: str | None = None) -> dict[str, int]:  # fmt: skip
    """Each deployment's weights as loading holds them (`loaded_bytes`), from the family's model configs
    built on the meta device: for IF's full preset, T5-v1.1-XXL's encoder is 11.5 GB in float16 (its `wo`
    layers stay float32) and 9.5 GB in bfloat16."""
    calls = _estimate_calls(family_name, preset, dtype, text_encoder_dtype or dtype)
    return {node: sum(loaded_bytes(m, d) for m, d in models) for node, (models, *_) in calls.items()}


def _estimate_calls(family_name: str, preset: str, dtype: str, encoder_dtype: str):
    family = get_family(family_name)
    if family.estimate_calls is None:
        raise InvalidParameter("--family", f"no estimate for {family.name}: profile it (`ifserve profile`)")
    if preset not in family.presets:
        known = ", ".join(family.presets)
        raise InvalidParameter("--preset", f"{family.name} has no preset {preset!r}; it has {known}")
    return family.estimate_calls(preset, dtype, encoder_dtype)


def estimate_profile(
    family_name: str = "deepfloyd-if",
    *,
    preset: str = "full",
    dtype: str = "float16",
    text_encoder_dtype: str | None = None,
    invariance: str = "split",
    batch_sizes: list[int] = (1, 2, 4, 8, 16),
    gpu_name: str = "NVIDIA H100 80GB HBM3",
    gpu_memory_gib: float = 79.0,
    tflops: float = 200.0,
    launch_us: float = 10.0,
    cores: int = 16,
    command: str = "",
) -> Profile:
    """A one-GPU profile of the family from its model configs alone (see the module's docstring): step
    times from FLOPs at `tflops` sustained (float16/bfloat16; float32 at a quarter) or kernel launches
    at `launch_us` each, whichever is longer; peak memory as weights plus the activations' peak; a PNG's
    cost measured on this machine. An estimate: profile the GPU (`ifserve profile --device cuda`) to
    replace it."""
    import time as clock
    from datetime import UTC, datetime

    import torch

    from stages.images import png_bytes, to_pil
    from stages.profiling import Hardware

    if invariance not in ("split", "per_task", "off"):
        raise InvalidParameter("--batch-invariance", f"one of split, per_task, off, got {invariance!r}")
    encoder_dtype = text_encoder_dtype or dtype
    calls = _estimate_calls(family_name, preset, dtype, encoder_dtype)
    tally = _Tally()
    batches = sorted({1, *batch_sizes})

    def rate(of_dtype: str) -> float:
        return tflops if of_dtype != "float32" else tflops / 4

    png: dict[int, float] = {}
    stages: dict[str, StageProfile] = {}
    for node, (models, step, once_calls, size) in calls.items():
        weights = sum(loaded_bytes(m, d) for m, d in models)
        step_rate = rate(models[0][1])
        step_s, peak = {}, {}
        for b in batches:
            measured = tally.run(step(1 if invariance == "per_task" else b))
            step_s[b] = _call_s(measured, b, invariance, step_rate, launch_us)
            peak[b] = weights + measured["peak"]
        once = {"admit": 0.0, "finish": 0.0}
        for what, (call, of_dtype) in once_calls.items():
            measured = tally.run(call)
            once[what] = _call_s(measured, 1, "off", rate(of_dtype), launch_us)
            peak = {b: max(v, weights + measured["peak"]) for b, v in peak.items()}
        if size and size not in png:
            picture = to_pil(torch.rand(1, 3, size, size) * 2 - 1)
            start = clock.perf_counter()
            for _ in range(3):
                png_bytes(picture)
            png[size] = (clock.perf_counter() - start) / 3
        stages[node] = StageProfile(
            output_size=size,
            step_s={1: step_s},
            admit_s={1: once["admit"]},
            finish_s={1: once["finish"]},
            deliver_s={1: png.get(size, 0.0)},
            peak_memory_bytes=peak,
            weights_bytes=weights,
        )
    dtypes = dtype if encoder_dtype == dtype else f"{dtype}, text encoder {encoder_dtype}"
    name = (
        f"{gpu_name} (estimate: {tflops:g} TFLOPS sustained, {launch_us:g} us a kernel launch, {dtypes}, "
        f"batch invariance {invariance})"
    )
    return Profile(
        hardware=Hardware(
            device="cuda",
            name=name,
            cores=cores,
            accelerators=1,
            accelerator_memory_bytes=int(gpu_memory_gib * GIB),
            torch=torch.__version__,
        ),
        family=family_name,
        preset=preset,
        dtype=dtype,
        batch_invariant=invariance != "off",
        **({"invariance": invariance} if "invariance" in Profile.model_fields else {}),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        command=command,
        encoder=stages.pop(ENCODER),
        stages=stages,
    )
