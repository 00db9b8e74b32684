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
from stages.families import get_family
from stages.family import TEXT_TO_IMAGE, ModelFamily
from stages.profiling import Profile, StageProfile

ENCODER = "text_encoder"
GIB = 1 << 30


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
        lines += [
            "",
            f"hardware: {hardware} ({self.cores} cores" + (f", {self.gpus} GPUs)" if self.on_gpu else ")"),
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
            cluster["num_gpus"] = float(sum(s.gpus * s.max_replicas for s in self.stages))
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
    choices = [_encoder_choice(profile.encoder, objectives, gpu)]
    for spec in family.stages:
        if spec.name not in profile.stages:
            raise InvalidParameter("profile", f"has no stage {spec.name!r} of {family.name}")
        if demands[spec.name].images > 0:
            p = profile.stages[spec.name]
            choices.append(_stage_choice(spec.name, p, demands[spec.name], objectives, profile, memory, cores))
    if objectives.p95_s is not None:
        _meet_latency(choices, profile, objectives.p95_s, cores)

    # CPU: every replica shares the cores, so the machine saturates at cores / (core-seconds per request).
    saturation = math.inf if gpu else cores / sum(c.core_s for c in choices)
    if load.rate is not None:
        target = load.rate / objectives.utilisation
    else:
        target = 0.0 if gpu else saturation  # GPUs: one replica each unless a rate or --gpus says more
    for c in choices:
        c.replicas = c.min_replicas = c.max_replicas = max(1, math.ceil(target * c.work - 1e-9))
    if gpu and gpus:
        _share_gpus(choices, gpus)
    elif not gpu:
        _spread(choices, profile, cores, saturation, fixed=load.rate is None)

    caps = {c.name: c.capacity for c in choices}
    throughput = min(saturation, *caps.values())
    bottleneck = min(caps, key=caps.get)
    if not gpu and saturation <= caps[bottleneck]:
        busiest = max(choices, key=lambda c: c.core_s).name
        bottleneck = f"the CPU ({cores} cores); {busiest} takes the largest share"
    units = (gpus or sum(c.gpus * c.replicas for c in choices)) if gpu else cores
    bound = units / sum(c.demand.images * c.cheapest_core_s for c in choices)
    for c in choices:
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


def _encoder_choice(p: StageProfile, objectives: Objectives, gpu: bool) -> StageChoice:
    """The encoder: one step per prompt (plus its negative); batching it costs no latency worth counting."""
    d = StageDemand(images=1.0, steps=1.0, final=0.0)
    options = {(b, t): p.image_s(1, b, t) * p.slowdown(t) for t, row in p.step_s.items() for b in row}
    b, t = _cheapest(options, objectives.flat, gpu)
    return StageChoice(
        ENCODER, d, b, t, 1.0 if gpu else 0.0, options[b, t], p.image_s(1, 1, t), _min_core_s(options, gpu)
    )


def _stage_choice(name, p: StageProfile, d: StageDemand, objectives, profile: Profile, memory: int, cores: int):
    options = {(b, t): _image_s(p, d, b, t) for t, row in p.step_s.items() if t <= cores for b in row}
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
        notes=notes,
    )


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


def _fits(p: StageProfile, batch: int, memory: int) -> bool:
    peak = p.peak_memory_bytes.get(batch)
    need = peak if peak is not None else p.weights_bytes
    return need <= 0.9 * memory  # leave the allocator and CUDA context their share


def _does_not_fit(name: str, p: StageProfile, memory: int, profile: Profile) -> list[str]:
    weights = p.weights_bytes
    advice = [f"{name} does not fit one {memory / GIB:.0f} GiB GPU even at batch 1 (weights {weights / GIB:.1f} GiB)"]
    if profile.dtype == "float32":
        advice.append("set model.dtype: float16 (halves weights and activations)")
    advice.append(f"or stages.{name}.cpu_offload: true (weights stay in CPU memory, moved per call)")
    split = math.ceil(weights / (0.9 * memory)) if memory else 2
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


def _share_gpus(choices: list[StageChoice], gpus: int) -> None:
    """A fixed number of GPUs: one per stage first, then each to the stage that caps throughput."""
    if gpus < len(choices):
        raise InvalidParameter("gpus", f"{gpus} GPUs cannot give each of {len(choices)} deployments one")
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
