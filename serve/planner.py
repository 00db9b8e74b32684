"""`ifserve plan`: a profile (stages/profiling.py), a load and objectives in; each stage's batch size,
threads or GPUs, replicas and autoscaling bounds out, as a config `ifserve up` runs, with the arithmetic
printed as a table a person can check.

The model, per stage i of the family:
- demand: p_i images per request reach it (a 64 px request stops after stage I), each with s_i steps on
  average, and a share f_i of them is final there (delivered as a PNG);
- cost: one replica with t threads (or one GPU) running full batches of b spends, per image,
      c_i(b, t) = s_i * step_i(b, t) / b + admit_i(t) + finish_i(t) + f_i * deliver_i(t)   seconds;
- choice: the batch where the per-image cost stops falling (within `flat` of the cheapest: batching that
  saves less only adds latency), at the thread count that costs the fewest core-seconds per image,
  unless the latency objective needs more threads;
- throughput: on a CPU every replica shares the machine's cores, so the service saturates at
      X = min( cores / sum_i p_i * t_i * c_i ,  min_i r_i / (p_i * c_i) )   requests/s
  (the OS shares the cores among busy replicas, so a stage may have more replicas than its share of
  cores, and should: one that has too few caps the service); on GPUs every replica has its own, so
  X = min_i r_i / (p_i * c_i);
- the compute bound: every core (or GPU) busy and every stage at its cheapest per-image cost in
  core-seconds (GPU-seconds), whatever the latency: X* = cores / sum_i p_i * min_(b,t) t * c_i(b, t).
- replicas: r_i = ceil(X_target * p_i * c_i), X_target the asked rate over the target utilisation, or
  the saturation point when the load is a concurrency or nothing;
- GPU fit: the profile's peak memory at the batch (weights and activations) must fit the card; else a
  smaller batch, and when not even one fits, what to do (float16, CPU offload, a device map over GPUs).
- fewer GPUs than deployments (`--gpus 1` for four): they share. Every deployment gets one replica and,
  as its `num_gpus`, the share of a GPU's usable memory (90 %) it needs at its batch: peak memory
  (weights and activations) plus a CUDA context per replica. Ray packs fractional GPUs so that no card's
  shares pass 1, so no card's memory is oversubscribed. Batches shrink, the one that frees the most
  memory first, until every deployment fits; if they cannot at batch 1, the plan is refused with what
  they need. The deployments then take turns on the same GPUs, as stages share a CPU's cores:
      X = min( gpus / sum_i p_i * c_i ,  min_i r_i / (p_i * c_i) ).
- estimates (`estimate_profile`, `ifserve estimate`): until a GPU has been profiled, a profile made from
  the family's model configs alone, built on the meta device (no weights, no GPU): weights in bytes as
  loading holds them (transformers keeps a model's `_keep_in_fp32_modules` in float32 under float16
  only: T5-v1.1-XXL's encoder is 4,762,310,656 parameters, its 24 `wo` layers 1,006,632,960 of them, so
  2 x 4.76e9 + 2 x 1.01e9 bytes = 11.5 GB in float16 and 9.5 GB in bfloat16), the activations' peak
  (live tensors of one forward at each batch), and a step's time as the larger of its FLOPs at an
  assumed sustained rate and its kernel launches at an assumed cost each (batch invariance "split" runs
  the batch-sensitive ops once per task: more launches, same FLOPs; "per_task" a whole call per task).
  Every number it gives is an estimate, and the profile says so in its hardware name and command.
"""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field, model_validator

from stages.errors import InvalidParameter
from stages.estimates import estimate_profile, loaded_bytes, weights_bytes  # noqa: F401 - the planner's too
from stages.families import get_family
from stages.family import TEXT_TO_IMAGE, ModelFamily
from stages.profiling import Profile, StageProfile

ENCODER = "text_encoder"
GIB = 1 << 30
# Each replica on a GPU holds a CUDA context and cuBLAS/cuDNN workspaces besides its tensors (what torch's
# peak memory counts): about this much, counted when deployments share a GPU.
CUDA_CONTEXT_BYTES = 768 << 20
USABLE = 0.9  # of a GPU's memory: the allocator's fragmentation and the driver get the rest


class MixEntry(BaseModel):
    """One kind of request in the load: its share, its size and its step fields (the family's request
    fields, e.g. `stage1_timesteps: fast27`, `stage2_steps: 10`; unset ones take the family's defaults)."""

    weight: float = Field(1.0, gt=0)
    size: int | None = None
    fields: dict[str, Any] = Field(default_factory=dict)


class Load(BaseModel):
    rate: float | None = Field(None, gt=0)  # requests per second (open loop)
    concurrency: int | None = Field(None, ge=1)  # requests in flight (closed loop)
    mix: list[MixEntry] = Field(default_factory=lambda: [MixEntry()])

    @model_validator(mode="after")
    def _one_kind(self) -> Load:
        if self.rate is not None and self.concurrency is not None:
            raise ValueError("rate: give a rate or a concurrency, not both")
        return self


class Objectives(BaseModel):
    p95_s: float | None = Field(None, gt=0)  # end-to-end latency of a request, at most
    utilisation: float = Field(0.8, gt=0, le=1)  # replicas are added so none is busier than this at `rate`
    flat: float = Field(0.05, ge=0)  # a bigger batch must save more than this share of per-image cost


@dataclass(frozen=True)
class StageDemand:
    """What a request asks of one stage on average."""

    images: float  # p_i: images per request reaching it
    steps: float  # s_i: steps per image
    final: float  # f_i: the share of its images that are final here


@dataclass
class StageChoice:
    name: str
    demand: StageDemand
    batch: int
    threads: int  # torch threads per replica (on GPUs: 1)
    gpus: float  # per replica
    image_s: float  # c_i at the chosen batch and threads, with every core busy (what throughput counts)
    latency_s: float  # what one image spends here alone on an idle machine, at these threads
    cheapest_core_s: float  # min over (b, t) of t * c_i(b, t): what the bound counts
    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 1
    utilisation: float = 0.0
    memory_bytes: int = 0  # peak accelerator memory at the batch, when profiled
    weights_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def core_s(self) -> float:
        """Core-seconds (GPU-seconds) of one request's work here."""
        return self.demand.images * self.threads * self.image_s

    @property
    def work(self) -> float:
        """Replica-seconds of one request's work here (with every core busy, on a CPU)."""
        return self.demand.images * self.image_s

    @property
    def capacity(self) -> float:
        """Requests per second its replicas can take, each with a whole core per thread (or its GPU)."""
        return math.inf if self.work == 0 else self.replicas / self.work


@dataclass
class Plan:
    profile: Profile
    load: Load
    objectives: Objectives
    cores: int
    gpus: int
    stages: list[StageChoice]
    throughput: float  # predicted saturated requests/s
    bound: float  # the compute bound, requests/s
    target: float  # what the replicas were sized for, requests/s
    bottleneck: str
    idle_latency_s: float
    warnings: list[str] = field(default_factory=list)
    # CPU: images let into the stages at once (ingress.max_images_in_flight): one per core's worth of
    # threads, plus one in transit. More only slices the cores thinner (measured: 3 in flight on 2 cores
    # gave 1.1x the throughput of 7). None on GPUs, where each replica has its own.
    in_flight: int | None = None
    shared_gpus: bool = False  # fewer GPUs than deployments: fractional num_gpus, turns on the same cards

    @property
    def on_gpu(self) -> bool:
        return self.profile.on_gpu

    def choice(self, name: str) -> StageChoice:
        return next(s for s in self.stages if s.name == name)

    def table(self) -> str:
        unit = "GPU" if self.on_gpu else "core"
        lines = [
            f"| deployment | images/request | steps | batch | threads | GPUs | s/image | {unit}-s/request "
            "| replicas (min-max) | utilisation at saturation | peak memory |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in self.stages:
            memory = f"{s.memory_bytes / GIB:.1f} GiB" if s.memory_bytes else "-"
            lines.append(
                f"| {s.name} | {s.demand.images:.2f} | {s.demand.steps:.1f} | {s.batch} | {s.threads} | {s.gpus:g} "
                f"| {s.image_s:.3f} | {s.core_s:.3f} | {s.replicas} ({s.min_replicas}-{s.max_replicas}) "
                f"| {s.utilisation:.0%} | {memory} |"
            )
        hardware = self.profile.hardware.label
        sharing = " shared by every deployment" if self.shared_gpus else ""
        lines += [
            "",
            f"hardware: {hardware} ({self.cores} cores"
            + (f", {self.gpus} GPU{'s' if self.gpus != 1 else ''}{sharing})" if self.on_gpu else ")"),
            f"predicted saturated throughput: {self.throughput:.4f} requests/s ({60 * self.throughput:.2f}/min)",
            f"compute bound: {self.bound:.4f} requests/s ({60 * self.bound:.2f}/min); "
            f"the plan reaches {self.throughput / self.bound:.0%} of it",
            f"bottleneck: {self.bottleneck}",
            f"latency of a lone request (no queueing): {self.idle_latency_s:.2f} s",
            f"replicas sized for: {self.target:.4f} requests/s",
        ]
        if self.in_flight:
            lines.append(f"admission: {self.in_flight} images in the stages at once per ingress replica")
        for s in self.stages:
            lines += [f"note ({s.name}): {n}" for n in s.notes]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        return {
            "throughput": self.throughput,
            "bound": self.bound,
            "bottleneck": self.bottleneck,
            "idle_latency_s": self.idle_latency_s,
            "in_flight": self.in_flight,
            "stages": {
                s.name: {
                    "batch": s.batch,
                    "threads": s.threads,
                    "gpus": s.gpus,
                    "replicas": s.replicas,
                    "min_replicas": s.min_replicas,
                    "max_replicas": s.max_replicas,
                    "image_s": s.image_s,
                    "utilisation": s.utilisation,
                }
                for s in self.stages
            },
        }

    def config(self, base: dict[str, Any]) -> dict[str, Any]:
        """`base` (a config mapping for the profiled family) with this plan's deployments and cluster."""
        data = json.loads(json.dumps(base))  # a deep copy of plain data
        resources: dict[str, float] = {}
        for s in self.stages:
            node = (
                data.setdefault("encoder", {})
                if s.name == ENCODER
                else data.setdefault("stages", {}).setdefault(s.name, {})
            )
            pool = node.get("pool") or f"pool_{s.name}"
            node.update(
                pool=pool,
                num_cpus=s.threads,
                num_gpus=s.gpus,
                max_batch_size=s.batch,
                # one batch running and one waiting to join it; more would tie work to one replica
                max_ongoing_requests=max(2 * s.batch, node.get("max_ongoing_requests", 0) if s.name == ENCODER else 0),
                autoscaling={
                    **node.get("autoscaling", {}),
                    "min_replicas": s.min_replicas,
                    "max_replicas": s.max_replicas,
                    "initial_replicas": s.replicas,
                    "target_ongoing_requests": float(s.batch),
                },
            )
            # A full batch passes in about batch x per-image time; alone, in its latency. Stopping replicas
            # drain for a multiple of this (Replica.drain_s).
            node["expected_residence_s"] = round(max(s.latency_s, s.batch * s.image_s), 3)
            if s.name != ENCODER:
                node["mode"] = "step"
            resources[pool] = float(s.max_replicas)
        cluster = data.setdefault("cluster", {})
        cluster["resources"] = {**cluster.get("resources", {}), **resources}
        if self.in_flight:
            data.setdefault("ingress", {})["max_images_in_flight"] = self.in_flight
        if not self.on_gpu:
            # Logical CPUs: each replica is given its threads; the OS shares the real cores among them.
            ingress = data.get("ingress", {})
            needed = sum(s.threads * s.max_replicas for s in self.stages)
            needed += ingress.get("num_cpus", 0.1) * ingress.get("num_replicas", 1)
            needed += data.get("batch", {}).get("num_cpus", 0.1)  # the batch runner
            cluster["num_cpus"] = float(math.ceil(needed))
        else:
            shares = sum(s.gpus * s.max_replicas for s in self.stages)
            cluster["num_gpus"] = float(self.gpus if self.shared_gpus else shares)
        return data


def demand(family: ModelFamily, mix: list[MixEntry]) -> dict[str, StageDemand]:
    """Per stage: images per request, mean steps and the final share, over the mix's weights."""
    total = sum(entry.weight for entry in mix)
    images = {spec.name: 0.0 for spec in family.stages}
    steps = dict(images)
    final = dict(images)
    for entry in mix:
        fields = {**entry.fields, **({"size": entry.size} if entry.size is not None else {})}
        params = family.kind(TEXT_TO_IMAGE).params.parse(prompt="planning", **fields)
        path = family.stages_for(params.size)
        share = entry.weight / total
        for spec in path:
            work = params.stage(spec.name).work_order()
            images[spec.name] += share
            steps[spec.name] += share * (len(work["timesteps"]) if work.get("timesteps") else work["steps"])
        final[path[-1].name] += share
    return {
        name: StageDemand(
            images[name],
            steps[name] / images[name] if images[name] else 0.0,
            final[name] / images[name] if images[name] else 0.0,
        )
        for name in images
    }


def plan(
    profile: Profile,
    load: Load | None = None,
    objectives: Objectives | None = None,
    *,
    cores: int | None = None,
    gpus: int | None = None,
    gpu_memory_bytes: int | None = None,
    stage_demand: dict[str, StageDemand] | None = None,
) -> Plan:
    """The plan for `load` (default: saturate with the family's default request) under `objectives`.
    `stage_demand` overrides what the load's mix implies (e.g. read from Prometheus)."""
    load = load or Load()
    objectives = objectives or Objectives()
    family = get_family(profile.family)
    demands = stage_demand or demand(family, load.mix)
    gpu = profile.on_gpu
    cores = cores or profile.hardware.cores
    memory = gpu_memory_bytes or profile.hardware.accelerator_memory_bytes
    warnings: list[str] = []
    choices = [_encoder_choice(profile.encoder, objectives, profile, memory)]
    for spec in family.stages:
        if spec.name not in profile.stages:
            raise InvalidParameter("profile", f"has no stage {spec.name!r} of {family.name}")
        if demands[spec.name].images > 0:
            p = profile.stages[spec.name]
            choices.append(_stage_choice(spec.name, p, demands[spec.name], objectives, profile, memory, cores))
    if objectives.p95_s is not None:
        _meet_latency(choices, profile, objectives.p95_s, cores)

    shared = bool(gpu and gpus and gpus < len(choices))
    if shared:
        _share_memory(choices, profile, gpus, memory)
    # CPU: every replica shares the cores, so the machine saturates at cores / (core-seconds per request);
    # so do GPUs that every deployment shares, at gpus / (GPU-seconds per request).
    if shared:
        saturation = gpus / sum(c.work for c in choices)
    else:
        saturation = math.inf if gpu else cores / sum(c.core_s for c in choices)
    if load.rate is not None:
        target = load.rate / objectives.utilisation
    else:
        target = 0.0 if gpu else saturation  # GPUs: one replica each unless a rate or --gpus says more
    for c in choices:
        c.replicas = c.min_replicas = c.max_replicas = 1 if shared else max(1, math.ceil(target * c.work - 1e-9))
    if gpu and gpus and not shared:
        _share_gpus(choices, gpus)
    elif not gpu:
        _spread(choices, profile, cores, saturation, fixed=load.rate is None)

    caps = {c.name: c.capacity for c in choices}
    throughput = min(saturation, *caps.values())
    bottleneck = min(caps, key=caps.get)
    if (shared or not gpu) and saturation <= caps[bottleneck]:
        busiest = max(choices, key=lambda c: c.core_s).name
        what = f"the GPU{'s' if gpus > 1 else ''} ({gpus}, shared)" if shared else f"the CPU ({cores} cores)"
        bottleneck = f"{what}; {busiest} takes the largest share"
    units = (gpus or sum(c.gpus * c.replicas for c in choices)) if gpu else cores
    bound = units / sum(c.demand.images * c.cheapest_core_s for c in choices)
    for c in choices:
        if shared:
            c.utilisation = throughput * c.work / gpus  # its share of the GPUs' time
        else:
            c.utilisation = throughput * c.work / c.replicas if gpu else throughput * c.core_s / cores
    if load.rate is not None and load.rate > throughput * objectives.utilisation:
        warnings.append(
            f"the asked rate {load.rate:g}/s exceeds {objectives.utilisation:.0%} of what this plan sustains "
            f"({throughput:.3f}/s): add hardware or lower the rate"
        )
    idle = sum(c.latency_s for c in choices)
    if objectives.p95_s is not None and idle > objectives.p95_s:
        warnings.append(
            f"a lone request takes {idle:.2f} s here, over the p95 objective of {objectives.p95_s:g} s, "
            "with every stage at its fastest option in the profile"
        )
    in_flight = None if gpu else cores // min(c.threads for c in choices) + 1
    return Plan(
        profile,
        load,
        objectives,
        cores,
        int(units) if gpu else 0,
        choices,
        throughput,
        bound,
        target if 0 < target < math.inf else throughput,
        bottleneck,
        idle,
        warnings,
        in_flight,
        shared,
    )


def _spread(choices: list[StageChoice], profile: Profile, cores: int, saturation: float, fixed: bool) -> None:
    """CPU replicas: enough for the cores' saturation point, and at least as many as fit the cores at the
    stage's threads, so that a burst, or the drain of a backlog, keeps every core busy whichever stage
    holds the work. Replicas cost memory (their weights), not cores: the OS shares the cores among the
    busy ones. Capped so that all weights stay under half the machine's RAM."""
    budget = profile.hardware.memory_bytes / 2 if profile.hardware.memory_bytes else math.inf
    for c in choices:
        p = profile.encoder if c.name == ENCODER else profile.stages[c.name]
        needed = max(1, math.ceil(saturation * c.work - 1e-9))
        spread = max(1, cores // c.threads) if c.name != ENCODER else 1
        c.max_replicas = max(needed, spread)
        c.min_replicas = c.max_replicas if fixed else c.replicas
        c.replicas = c.max_replicas
        c.weights_bytes = p.weights_bytes
    while sum(c.weights_bytes * c.max_replicas for c in choices) > budget:
        spare = [c for c in choices if c.max_replicas > max(1, math.ceil(saturation * c.work - 1e-9))]
        if not spare:
            break
        heaviest = max(spare, key=lambda c: c.weights_bytes)
        heaviest.max_replicas -= 1
        heaviest.replicas = heaviest.max_replicas
        heaviest.min_replicas = min(heaviest.min_replicas, heaviest.max_replicas)
        heaviest.notes.append("fewer replicas than cores: their weights would pass half the RAM")


def _encoder_options(p: StageProfile) -> dict[tuple[int, int], float]:
    return {(b, t): p.image_s(1, b, t) * p.slowdown(t) for t, row in p.step_s.items() for b in row}


def _encoder_choice(p: StageProfile, objectives: Objectives, profile: Profile, memory: int) -> StageChoice:
    """The encoder: one step per prompt (plus its negative); batching it costs no latency worth counting."""
    gpu = profile.on_gpu
    d = StageDemand(images=1.0, steps=1.0, final=0.0)
    options = _encoder_options(p)
    options, notes = _within_memory(ENCODER, p, options, profile, memory)
    b, t = _cheapest(options, objectives.flat, gpu)
    return StageChoice(
        ENCODER,
        d,
        b,
        t,
        1.0 if gpu else 0.0,
        options[b, t],
        p.image_s(1, 1, t),
        _min_core_s(options, gpu),
        memory_bytes=p.peak_memory_bytes.get(b, 0),
        weights_bytes=p.weights_bytes,
        notes=notes,
    )


def _stage_choice(name, p: StageProfile, d: StageDemand, objectives, profile: Profile, memory: int, cores: int):
    options = {(b, t): _image_s(p, d, b, t) for t, row in p.step_s.items() if t <= cores for b in row}
    options, notes = _within_memory(name, p, options, profile, memory)
    b, t = _cheapest(options, objectives.flat, profile.on_gpu)
    return StageChoice(
        name,
        d,
        b,
        t,
        1.0 if profile.on_gpu else 0.0,
        options[b, t],
        _latency(p, d, 1, t),
        _min_core_s(options, profile.on_gpu),
        memory_bytes=p.peak_memory_bytes.get(b, 0),
        weights_bytes=p.weights_bytes,
        notes=notes,
    )


def _within_memory(name: str, p: StageProfile, options: dict, profile: Profile, memory: int) -> tuple[dict, list]:
    """On a GPU, the (batch, threads) options whose peak memory fits one card, and notes on what does not."""
    notes: list[str] = []
    if profile.on_gpu and memory:
        fits = {(b, t): v for (b, t), v in options.items() if _fits(p, b, memory)}
        if not fits:
            notes += _does_not_fit(name, p, memory, profile)
            options = {(b, t): v for (b, t), v in options.items() if b == 1}
        elif len(fits) < len(options):
            largest = max(b for b, _ in fits)
            notes.append(f"batches above {largest} do not fit {memory / GIB:.0f} GiB (profiled peak memory)")
            options = fits
    return options, notes


def _image_s(p: StageProfile, d: StageDemand, batch: int, threads: int) -> float:
    """c_i(b, t) with every core busy: the stage's per-image cost for this demand, slowed as the profile
    measured a full machine to be."""
    plain = p.image_s(d.steps, batch, threads) * (1 - d.final) + p.image_s(d.steps, batch, threads, True) * d.final
    return plain * p.slowdown(threads)


def _latency(p: StageProfile, d: StageDemand, batch: int, threads: int) -> float:
    """One image alone in the stage (batch 1, or sharing a full batch's step time when `batch` > 1)."""
    return (
        p.image_s(d.steps, batch, threads) * batch
        - (batch - 1) * (p.admit_s.get(threads, 0.0) + p.finish_s.get(threads, 0.0))
        + d.final * p.deliver_s.get(threads, 0.0)
    )


def _cheapest(options: dict[tuple[int, int], float], flat: float, gpu: bool) -> tuple[int, int]:
    """Fewest core-seconds per image; among batches within `flat` of that, the smallest."""
    core_s = {(b, t): (1 if gpu else t) * c for (b, t), c in options.items()}
    best = min(core_s.values())
    good = [key for key, v in core_s.items() if v <= best * (1 + flat)]
    return min(good, key=lambda key: (key[0], core_s[key]))


def _min_core_s(options: dict[tuple[int, int], float], gpu: bool) -> float:
    return min((1 if gpu else t) * c for (_, t), c in options.items())


def _need(p: StageProfile, batch: int) -> int:
    """Accelerator bytes one replica's tensors take at `batch`: the profiled peak of its step, else its
    weights, plus one task's finish activations (a VAE decode), which run beside the step on the replica's
    finisher thread (stages/stage_loop.py)."""
    peak = p.peak_memory_bytes.get(batch)
    step = p.weights_bytes if peak is None else peak
    finish = p.finish_activation_bytes or max(0, (p.finish_peak_bytes or 0) - p.weights_bytes)
    return step + finish


def _fits(p: StageProfile, batch: int, memory: int) -> bool:
    return _need(p, batch) <= USABLE * memory  # leave the allocator and CUDA context their share


def _does_not_fit(name: str, p: StageProfile, memory: int, profile: Profile) -> list[str]:
    weights = p.weights_bytes
    advice = [f"{name} does not fit one {memory / GIB:.0f} GiB GPU even at batch 1 (weights {weights / GIB:.1f} GiB)"]
    if profile.dtype == "float32":
        advice.append("set model.dtype: float16 (halves weights and activations)")
    if name == ENCODER:  # no CPU offload for the encoder; bfloat16 keeps no float32 layers back (T5's `wo`)
        advice.append("or model.text_encoder_dtype: bfloat16")
    else:
        advice.append(f"or stages.{name}.cpu_offload: true (weights stay in CPU memory, moved per call)")
    split = math.ceil(weights / (USABLE * memory)) if memory else 2
    advice.append(
        f"or split it over {max(2, split)} GPUs with accelerate's device map "
        "(infer_auto_device_map on the model built on the meta device)"
    )
    return advice


def _meet_latency(choices: list[StageChoice], profile: Profile, p95_s: float, cores: int) -> None:
    """Give threads to the stages where they cut the lone request's latency most, until it meets the
    objective (CPU only: on GPUs a stage has its GPU). Queueing is the replicas' job, sized afterwards."""
    if profile.on_gpu:
        return
    while sum(c.latency_s for c in choices) > p95_s:
        best = None
        for c in choices:
            p = profile.encoder if c.name == ENCODER else profile.stages[c.name]
            for t in sorted(p.step_s):
                if t <= c.threads or t > cores:
                    continue
                saved = c.latency_s - _latency(p, c.demand, 1, t) if c.name != ENCODER else 0.0
                if saved > 0 and (best is None or saved > best[0]):
                    best = (saved, c, t, p)
        if best is None:
            return
        _, c, t, p = best
        c.threads, c.batch = t, 1
        c.image_s = _image_s(p, c.demand, 1, t)
        c.latency_s = _latency(p, c.demand, 1, t)
        c.notes.append(f"{t} threads to meet the p95 objective of {p95_s:g} s")


def _share_memory(choices: list[StageChoice], profile: Profile, gpus: int, memory: int) -> None:
    """Fewer GPUs than deployments: each deployment's num_gpus is the share of a card's usable memory its
    replica needs (its peak at its batch and a CUDA context), so that Ray, which puts a fractional replica
    on one card and keeps every card's shares within 1, never oversubscribes a card's memory. Batches
    shrink until the shares fit the cards (by first-fit decreasing, as a check that Ray can place them);
    then, on one GPU, the shares grow to fill it, so that nothing else is placed beside them."""
    if not memory:
        raise InvalidParameter("gpus", "sharing GPUs needs their memory: the profile has none (--gpu-memory-gib)")
    usable = USABLE * memory
    stage_profile = {c.name: profile.encoder if c.name == ENCODER else profile.stages[c.name] for c in choices}

    def need(c: StageChoice, batch: int | None = None) -> int:
        return _need(stage_profile[c.name], c.batch if batch is None else batch) + CUDA_CONTEXT_BYTES

    def share(c: StageChoice) -> float:
        return math.ceil(100 * need(c) / usable - 1e-9) / 100

    while not _packs([share(c) for c in choices], gpus):
        smaller = []
        for c in choices:
            batches = [b for b in stage_profile[c.name].step_s[c.threads] if b < c.batch]
            if batches:
                b = max(batches)
                smaller.append((need(c) - need(c, b), c, b))
        if not smaller:
            total = sum(need(c) for c in choices)
            raise InvalidParameter(
                "gpus",
                f"the {len(choices)} deployments need {total / GIB:.1f} GiB together at batch 1 (weights, "
                f"activations and a CUDA context each), more than {gpus} x {usable / GIB:.0f} GiB usable "
                f"({', '.join(f'{c.name} {need(c) / GIB:.1f}' for c in choices)}): give them more GPUs, "
                "a smaller dtype (model.dtype, model.text_encoder_dtype), or stages.<stage>.cpu_offload",
            )
        _, c, b = max(smaller, key=lambda item: item[0])
        p = stage_profile[c.name]
        c.batch = b
        c.image_s = _encoder_options(p)[b, c.threads] if c.name == ENCODER else _image_s(p, c.demand, b, c.threads)
        c.memory_bytes = p.peak_memory_bytes.get(b, 0)
        c.notes = [n for n in c.notes if not n.startswith("batch ")]
        cards = f"{gpus} GPU{'s' if gpus > 1 else ''} of {memory / GIB:.0f} GiB"
        c.notes.append(f"batch {b}: the deployments share {cards}")
    shares = [share(c) for c in choices]
    if gpus == 1:  # fill the card: what is left is no use to anything but these deployments
        shares = [math.floor(100 * s / sum(shares)) / 100 for s in shares]
    for c, s in zip(choices, shares, strict=True):
        c.gpus = s
        c.notes.append(f"{s:g} of a GPU: {need(c) / GIB:.1f} GiB at batch {c.batch} with a CUDA context")


def _packs(shares: list[float], bins: int) -> bool:
    """Whether first-fit decreasing places `shares` (each at most 1) on `bins` cards of capacity 1."""
    free = [1.0] * bins
    for s in sorted(shares, reverse=True):
        for i, room in enumerate(free):
            if s <= room + 1e-9:
                free[i] -= s
                break
        else:
            return False
    return True


def _share_gpus(choices: list[StageChoice], gpus: int) -> None:
    """A fixed number of GPUs, at least one per deployment: one each first, then each further one to the
    deployment that caps throughput (fewer GPUs than deployments: `_share_memory`)."""
    for c in choices:
        c.replicas = 1
    for _ in range(gpus - len(choices)):
        weakest = min(choices, key=lambda c: c.capacity)
        weakest.replicas += 1
    for c in choices:
        c.min_replicas = 1
        c.max_replicas = c.replicas


def demand_from_prometheus(url: str, family: ModelFamily, model: str, window: str = "15m") -> tuple[float, dict]:
    """The observed load of `model` over `window`, from the stage metrics: images/s arriving at its first
    stage (a request for n images counts n) and what each stage is asked per such image."""

    def query(expr: str) -> dict[str, float]:
        address = f"{url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(address, timeout=10) as response:
                body = json.load(response)
        except OSError as err:
            raise InvalidParameter("--prometheus", f"cannot query {url}: {err}") from None
        return {r["metric"].get("stage", ""): float(r["value"][1]) for r in body["data"]["result"]}

    selector = f'{{model="{model}"}}'
    arrived = query(f"sum by (stage) (rate(ifserve_stage_tasks_arrived_total{selector}[{window}]))")
    images = query(f"sum by (stage) (rate(ifserve_stage_images_total{selector}[{window}]))")
    steps = query(f"sum by (stage) (rate(ifserve_stage_denoising_steps_total{selector}[{window}]))")
    first = family.stages[0].name
    rate = arrived.get(first, 0.0)
    if rate <= 0:
        raise InvalidParameter("--prometheus", f"no arrivals at {first} of {model!r} in the last {window}")
    names = [s.name for s in family.stages]
    demands = {}
    for i, name in enumerate(names):
        share = arrived.get(name, 0.0) / rate
        following = arrived.get(names[i + 1], 0.0) / rate if i + 1 < len(names) else 0.0
        per_image = steps.get(name, 0.0) / images[name] if images.get(name) else 0.0
        demands[name] = StageDemand(share, per_image, (share - following) / share if share else 0.0)
    return rate, demands
