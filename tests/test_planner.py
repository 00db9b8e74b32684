"""The planner's arithmetic on hand-made profiles (serve/planner.py), and its output as a config."""

from __future__ import annotations

import math

import pytest
import yaml

from serve.config import load_config, parse_config
from serve.planner import (
    CUDA_CONTEXT_BYTES,
    ENCODER,
    Load,
    MixEntry,
    Objectives,
    StageDemand,
    demand,
    estimate_profile,
    loaded_bytes,
    plan,
    weights_bytes,
)
from stages.errors import InvalidParameter
from stages.families import DEEPFLOYD_IF
from stages.profiling import Hardware, Profile, StageProfile
from tests.serving import ROOT

GIB = 1 << 30
QUICK = {"stage1_timesteps": "fast27", "stage2_steps": 10, "stage3_steps": 10}


def stage(step_s, *, admit=0.0, finish=0.0, deliver=0.0, size=64, memory=None, weights=0, loaded=None):
    threads = sorted(step_s)
    return StageProfile(
        output_size=size,
        step_s=step_s,
        admit_s={t: admit for t in threads},
        finish_s={t: finish for t in threads},
        deliver_s={t: deliver for t in threads},
        peak_memory_bytes=memory or {},
        weights_bytes=weights,
        loaded=loaded or {},
    )


def cpu_profile(**overrides) -> Profile:
    """A 2-core CPU where batching costs at 256 and 1024 px and pays a little at 64 px."""
    stages = {
        "stage1": stage({1: {1: 0.10, 2: 0.16, 4: 0.30}, 2: {1: 0.07, 2: 0.11, 4: 0.20}}),
        "stage2": stage({1: {1: 0.30, 2: 0.66, 4: 1.40}, 2: {1: 0.20, 2: 0.44, 4: 0.95}}, size=256, deliver=0.02),
        "stage3": stage(
            {1: {1: 0.50, 2: 1.10, 4: 2.40}, 2: {1: 0.30, 2: 0.66, 4: 1.45}}, finish=1.0, deliver=0.1, size=1024
        ),
    }
    stages.update(overrides)
    return Profile(
        hardware=Hardware(device="cpu", name="test CPU", cores=2, memory_bytes=16 * GIB),
        family="deepfloyd-if",
        encoder=stage({1: {1: 0.01, 4: 0.02}, 2: {1: 0.008, 4: 0.015}}, size=0),
        stages=stages,
    )


def gpu_profile(card_gib: float = 80) -> Profile:
    """One GPU per replica; stage III's batch 8 needs more than the card."""
    return Profile(
        hardware=Hardware(
            device="cuda", name="test GPU", cores=16, accelerators=1, accelerator_memory_bytes=int(card_gib * GIB)
        ),
        family="deepfloyd-if",
        dtype="float16",
        encoder=stage({1: {1: 0.02, 8: 0.05}}, size=0, weights=10 * GIB, memory={1: 11 * GIB, 8: 12 * GIB}),
        stages={
            "stage1": stage({1: {1: 0.05, 4: 0.08, 8: 0.12}}, memory={1: 9 * GIB, 4: 10 * GIB, 8: 12 * GIB}),
            "stage2": stage({1: {1: 0.08, 4: 0.20, 8: 0.36}}, size=256, memory={1: 3 * GIB, 4: 6 * GIB, 8: 9 * GIB}),
            "stage3": stage(
                {1: {1: 0.20, 4: 0.50, 8: 0.90}},
                size=1024,
                finish=0.1,
                memory={1: 30 * GIB, 4: 60 * GIB, 8: 100 * GIB},
                weights=2 * GIB,
            ),
        },
    )


def test_demand_follows_the_mix_of_sizes_and_steps():
    mix = [MixEntry(weight=1, size=64, fields={"stage1_steps": 50}), MixEntry(weight=3, size=1024, fields=QUICK)]
    d = demand(DEEPFLOYD_IF, mix)
    assert d["stage1"] == StageDemand(images=1.0, steps=0.25 * 50 + 0.75 * 27, final=0.25)
    assert d["stage2"] == StageDemand(images=0.75, steps=10, final=0.0)
    assert d["stage3"] == StageDemand(images=0.75, steps=10, final=1.0)


def test_cpu_batch_threads_replicas_and_bound():
    p = plan(cpu_profile(), Load(mix=[MixEntry(size=1024, fields=QUICK)]))
    s1, s2, s3 = (p.choice(n) for n in ("stage1", "stage2", "stage3"))
    # stage I: 0.10 s per image alone, 0.08 at batch 2, 0.075 at 4; 0.08 is 6.7 % above the cheapest, more
    # than the 5 % a bigger batch must save, so batch 4; one thread costs the fewest core-seconds.
    assert (s1.batch, s1.threads) == (4, 1)
    assert s1.image_s == pytest.approx(27 * 0.30 / 4)
    # stages II and III: batching costs per image on this CPU, so batch 1; one thread again
    assert (s2.batch, s2.threads, s3.batch, s3.threads) == (1, 1, 1, 1)
    assert s3.image_s == pytest.approx(10 * 0.50 + 1.0 + 0.1)  # steps + decode + PNG, final at 1024
    assert s2.image_s == pytest.approx(10 * 0.30)  # not final: no PNG
    encoder = p.choice(ENCODER)
    core_s = encoder.image_s + s1.image_s + s2.image_s + s3.image_s
    assert p.throughput == pytest.approx(2 / core_s)  # the CPU saturates first
    assert p.bound == pytest.approx(2 / core_s)  # every stage already at its cheapest
    assert p.bottleneck.startswith("the CPU")
    # replicas: enough for saturation (stage III: 0.18 req/s x 6.1 s = 1.1 -> 2), and one per core anyway
    assert s3.replicas == math.ceil(p.throughput * s3.image_s)
    assert (s1.replicas, s2.replicas, s3.replicas) == (2, 2, 2)
    assert encoder.replicas == 1
    assert p.idle_latency_s == pytest.approx(0.01 + 27 * 0.10 + 10 * 0.30 + 10 * 0.50 + 1.0 + 0.1)


def test_flat_rule_keeps_the_smaller_batch_when_bigger_saves_little():
    loose = plan(cpu_profile(), Load(mix=[MixEntry(size=64)]), Objectives(flat=0.10))
    assert loose.choice("stage1").batch == 2  # 0.080 is within 10 % of 0.075
    strict = plan(cpu_profile(), Load(mix=[MixEntry(size=64)]), Objectives(flat=0.0))
    assert strict.choice("stage1").batch == 4


def test_a_measured_slowdown_under_load_lowers_the_prediction():
    slow = stage({1: {1: 0.50}, 2: {1: 0.30}}, finish=1.0, deliver=0.1, size=1024, loaded={1: 1.2})
    base = plan(cpu_profile(), Load(mix=[MixEntry(size=1024, fields=QUICK)]))
    loaded = plan(cpu_profile(stage3=slow), Load(mix=[MixEntry(size=1024, fields=QUICK)]))
    assert loaded.choice("stage3").image_s == pytest.approx(1.2 * base.choice("stage3").image_s)
    assert loaded.choice("stage3").latency_s == pytest.approx(base.choice("stage3").latency_s)  # alone: as fast
    assert loaded.throughput < base.throughput


def test_latency_objective_buys_threads_where_they_cut_most():
    mix = Load(mix=[MixEntry(size=1024, fields=QUICK)])
    relaxed = plan(cpu_profile(), mix)
    tight = plan(cpu_profile(), mix, Objectives(p95_s=relaxed.idle_latency_s - 1.5))
    assert tight.choice("stage3").threads == 2  # 10 x (0.50 - 0.30) = 2 s saved, the most
    assert tight.idle_latency_s <= relaxed.idle_latency_s - 1.5
    assert tight.throughput < relaxed.throughput  # two threads cost more core-seconds
    impossible = plan(cpu_profile(), mix, Objectives(p95_s=1.0))
    assert any("over the p95 objective" in w for w in impossible.warnings)


def test_rate_sizes_replicas_on_gpus_and_memory_caps_the_batch():
    p = plan(gpu_profile(), Load(rate=2.0, mix=[MixEntry(size=1024, fields={"stage3_steps": 10})]))
    s3 = p.choice("stage3")
    # batch 8 needs 100 GiB on an 80 GiB card: batch 4 (0.125 s/step/image) is the cheapest that fits
    assert s3.batch == 4
    assert any("do not fit" in note for note in s3.notes)
    assert s3.image_s == pytest.approx(10 * 0.50 / 4 + 0.1)
    # 2 req/s at 80 % busy: ceil(2 / 0.8 * 1.35) = 4 GPUs for stage III
    assert s3.replicas == math.ceil(2 / 0.8 * s3.image_s)
    assert p.throughput == pytest.approx(min(c.replicas / c.work for c in p.stages))
    gpus = sum(c.replicas for c in p.stages)
    assert p.bound == pytest.approx(gpus / sum(c.demand.images * c.cheapest_core_s for c in p.stages))


def test_fixed_gpus_go_to_the_stage_that_caps_throughput():
    p = plan(gpu_profile(), Load(mix=[MixEntry(size=1024, fields={"stage3_steps": 10})]), gpus=8)
    assert sum(c.replicas for c in p.stages) == 8
    heaviest = max(p.stages, key=lambda c: c.work)  # stage II: 50 default steps
    assert heaviest.replicas == max(c.replicas for c in p.stages) > 1
    # one more GPU anywhere but the weakest stage would not raise the throughput
    assert p.throughput == pytest.approx(min(c.capacity for c in p.stages))


def test_one_gpu_shared_by_every_deployment_takes_its_memory_share_of_the_card():
    """Issue 27: fewer GPUs than deployments (deploy/single-gpu.yaml) is planned, not refused: each
    deployment's num_gpus is its memory share of the card, the shares fit one card, and the deployments
    take turns on it."""
    mix = Load(mix=[MixEntry(size=1024, fields={"stage3_steps": 10})])
    p = plan(gpu_profile(), mix, gpus=1)
    assert p.shared_gpus and all(c.replicas == c.max_replicas == 1 for c in p.stages)
    assert 0.9 <= sum(c.gpus for c in p.stages) <= 1.0  # the card filled, never more
    # alone, stage III would take batch 4 (60 GiB); beside the others' 12 + 12 + 9 GiB it must come down
    assert p.choice("stage3").batch == 1 and any("share 1 GPU" in n for n in p.choice("stage3").notes)
    profiled = {ENCODER: gpu_profile().encoder, **gpu_profile().stages}
    need = {c.name: profiled[c.name].peak_memory_bytes[c.batch] for c in p.stages}
    assert sum(need.values()) + 4 * CUDA_CONTEXT_BYTES <= 0.9 * 80 * GIB
    for c in p.stages:  # a share at least its memory's: Ray's packing then keeps the card's memory whole
        assert c.gpus >= (need[c.name] + CUDA_CONTEXT_BYTES) / (0.9 * 80 * GIB) - 0.01
    assert p.throughput == pytest.approx(1 / sum(c.work for c in p.stages))  # one GPU's time, shared
    assert p.bottleneck.startswith("the GPU")
    config = p.config({"model": {"id": "m", "checkpoints": "ck", "device": "cuda", "dtype": "float16"}})
    assert config["cluster"]["num_gpus"] == 1.0
    loaded = parse_config(config)  # `device: cuda` with every deployment on a share of the GPU
    assert sum(r.num_gpus for _, r in loaded.replicas()) <= 1.0

    # two GPUs for four deployments: shares packed onto two cards
    two = plan(gpu_profile(), mix, gpus=2)
    assert two.shared_gpus and sum(c.gpus for c in two.stages) <= 2.0 and two.choice("stage3").batch == 4
    # not even batch 1 fits together: refused with what they need
    with pytest.raises(InvalidParameter, match="need .* GiB together at batch 1") as err:
        plan(gpu_profile(card_gib=40), mix, gpus=1)
    assert err.value.param == "gpus"


def test_a_stage_too_big_for_the_card_gets_advice():
    p = plan(gpu_profile(card_gib=24), Load(mix=[MixEntry(size=1024, fields={"stage3_steps": 10})]))
    notes = " ".join(p.choice("stage3").notes)
    assert "does not fit one 24 GiB GPU even at batch 1" in notes
    assert "cpu_offload" in notes and "device map" in notes
    assert "float16" not in notes  # the profile is already float16


def test_plan_output_loads_as_a_config(tmp_path):
    from serve.cli import main

    profile_path = tmp_path / "profile.json"
    cpu_profile().save(profile_path)
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump(
            {"model": {"id": "if-test", "checkpoints": str(tmp_path / "ck")}, "http": {"port": 8123}},
            sort_keys=False,
        )
    )
    out = tmp_path / "planned.yaml"
    mix = "--mix=1:1024:" + ",".join(f"{k}={v}" for k, v in QUICK.items())
    assert main(["plan", "--profile", str(profile_path), "--base", str(base), mix, "--out", str(out)]) == 0
    config = load_config(out)
    assert config.http.port == 8123  # the base's own keys stay
    assert config.stages["stage1"].max_batch_size == 4
    assert config.stages["stage3"].max_batch_size == 1
    assert config.stages["stage3"].autoscaling.max_replicas == 2
    assert config.cluster.resources["pool_stage3"] == 2
    assert config.cluster.num_cpus >= sum(
        r.num_cpus * r.autoscaling.max_replicas for _, r in config.replicas()
    )  # every replica finds its logical CPUs


def test_plan_refuses_a_profile_of_another_family(tmp_path, capsys):
    from serve.cli import main

    profile_path = tmp_path / "profile.json"
    cpu_profile().save(profile_path)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"id": "d", "family": "decidiffusion", "checkpoints": "x"}}))
    assert main(["plan", "--profile", str(profile_path), "--base", str(base)]) == 2
    assert "--base" in capsys.readouterr().err


def test_a_profile_of_the_tiny_checkpoints_plans_a_config_that_loads(tiny_checkpoints, tmp_path):
    """`ifserve profile` on real engines, then `ifserve plan` from it: the numbers have the shape the
    planner reads, the costs come out where they should, and the planned config is one `up` loads."""
    from serve.cli import main

    out = tmp_path / "profile.json"
    argv = ["profile", "--checkpoints", str(tiny_checkpoints), "--threads", "1", "--batch-sizes", "1,2"]
    assert main([*argv, "--repeats", "1", "--out", str(out)]) == 0
    profile = Profile.load(out)
    assert profile.command.startswith("ifserve profile --checkpoints")
    assert profile.hardware.cores >= 1 and profile.hardware.device == "cpu"
    assert sorted(profile.stages) == ["stage1", "stage2", "stage3"]
    for name, s in profile.stages.items():
        assert sorted(s.step_s[1]) == [1, 2] and all(v > 0 for v in s.step_s[1].values()), name
        assert s.weights_bytes > 0 and s.deliver_s[1] > 0
        if profile.hardware.cores > 1:
            assert s.loaded[1] > 0  # the same step with the other cores busy
    # stage III's finish decodes through the VAE; the pixel stages' finish only packs the sample
    assert profile.stages["stage3"].finish_s[1] > 10 * profile.stages["stage1"].finish_s[1]
    # a 1024 px PNG costs more than a 64 px one
    assert profile.stages["stage3"].deliver_s[1] > profile.stages["stage1"].deliver_s[1]

    planned = tmp_path / "planned.yaml"
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"id": "if-tiny", "checkpoints": str(tiny_checkpoints)}}))
    assert main(["plan", "--profile", str(out), "--base", str(base), "--out", str(planned)]) == 0
    config = load_config(planned)
    assert {name: s.max_batch_size for name, s in config.stages.items()}.keys() == {"stage1", "stage2", "stage3"}
    assert all(s.num_cpus == 1 for _, s in config.replicas())  # the only thread count profiled


T5_XXL_ENCODER = 4_762_310_656  # parameters (tests/test_checkpoints.py)
T5_XXL_WO = 24 * 10240 * 4096  # its 24 feed-forward output layers `wo`: d_ff x d_model each


def test_weights_are_counted_as_loading_holds_them_from_the_full_configs():
    """Issue 27: float16 T5 is not 9.5 GB. transformers keeps T5's `wo` layers in float32 under float16
    (`_keep_in_fp32_modules`), not under bfloat16; the planner's weights come from the configs' parameters."""
    fp16, bf16 = weights_bytes(dtype="float16"), weights_bytes(dtype="bfloat16")
    assert fp16[ENCODER] == 2 * T5_XXL_ENCODER + 2 * T5_XXL_WO  # 11.54 GB
    assert bf16[ENCODER] == 2 * T5_XXL_ENCODER  # 9.52 GB
    assert round(fp16[ENCODER] / 1e9, 1) == 11.5 and round(bf16[ENCODER] / 1e9, 1) == 9.5
    assert weights_bytes(dtype="float16", text_encoder_dtype="bfloat16")[ENCODER] == bf16[ENCODER]
    assert fp16["stage1"] == 2 * 4_304_695_110 and fp16["stage2"] == 2 * 1_243_277_190
    # stage III: UNet and CLIP in float16, the VAE in float32 (the upscaler upcasts it, as diffusers does),
    # and CLIP's position ids (77 int64)
    assert fp16["stage3"] == 2 * (473_398_020 + 340_387_840) + 4 * 55_325_927 + 77 * 8


def test_loaded_bytes_is_what_transformers_loads(tmp_path):
    """The rule `loaded_bytes` follows, checked against transformers itself on a small T5 written to disk."""
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=64,
                      feed_forward_proj="gated-gelu")  # fmt: skip
    T5EncoderModel(config).save_pretrained(tmp_path)
    for dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
        loaded = T5EncoderModel.from_pretrained(tmp_path, torch_dtype=dtype)
        held = sum(t.numel() * t.element_size() for t in (*loaded.parameters(), *loaded.buffers()))
        assert loaded_bytes(T5EncoderModel(config), name) == held, name
        kept = {n for n, t in loaded.named_parameters() if t.dtype == torch.float32}
        wo = {n for n, _ in loaded.named_parameters() if ".wo." in n}
        assert kept == {"float16": wo, "bfloat16": set()}.get(name, kept), name  # only float16 keeps `wo`


def test_an_estimated_profile_has_the_shape_a_measured_one_has():
    tiny = estimate_profile(preset="tiny", batch_sizes=[1, 2], tflops=100)
    assert tiny.on_gpu and "estimate" in tiny.hardware.name and sorted(tiny.stages) == ["stage1", "stage2", "stage3"]
    for name, s in [(ENCODER, tiny.encoder), *tiny.stages.items()]:
        assert sorted(s.step_s[1]) == [1, 2] and all(v > 0 for v in s.step_s[1].values()), name
        assert s.weights_bytes < s.peak_memory_bytes[1] <= s.peak_memory_bytes[2], name
    assert tiny.stages["stage3"].finish_s[1] > 0 and tiny.stages["stage3"].deliver_s[1] > 0  # VAE decode, PNG
    # split runs the batch-sensitive ops once per task: more launches than one plain batched call
    off = estimate_profile(preset="tiny", batch_sizes=[1, 2], tflops=100, invariance="off")
    assert off.stages["stage1"].step_s[1][2] <= tiny.stages["stage1"].step_s[1][2]
    with pytest.raises(InvalidParameter):
        estimate_profile("decidiffusion")


def test_the_single_gpu_config_is_the_plan_of_the_estimate_it_names(tmp_path):
    """deploy/single-gpu.yaml is `ifserve plan --gpus 1` of `ifserve estimate` (its header's commands):
    the same batch and GPU share for every deployment."""
    from serve.cli import main

    profile_path = tmp_path / "estimate.json"
    assert main(["estimate", "--out", str(profile_path)]) == 0
    shipped = ROOT / "deploy" / "single-gpu.yaml"
    planned = tmp_path / "single-gpu.yaml"
    argv = ["plan", "--profile", str(profile_path), "--gpus", "1", "--base", str(shipped), "--out", str(planned)]
    assert main(argv) == 0
    mine, theirs = load_config(planned), load_config(shipped)
    for (field, ours), (_, shipped_replica) in zip(mine.replicas(), theirs.replicas(), strict=True):
        assert (ours.num_gpus, ours.max_batch_size) == (shipped_replica.num_gpus, shipped_replica.max_batch_size), field
    assert sum(r.num_gpus for _, r in theirs.replicas()) <= 1.0 and theirs.cluster.num_gpus == 1
