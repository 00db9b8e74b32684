"""The planner's arithmetic on hand-made profiles (serve/planner.py), and its output as a config."""

from __future__ import annotations

import math

import pytest
import yaml

from serve.config import load_config
from serve.planner import ENCODER, Load, MixEntry, Objectives, StageDemand, demand, plan
from stages.errors import InvalidParameter
from stages.families import DEEPFLOYD_IF
from stages.profiling import Hardware, Profile, StageProfile

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
    with pytest.raises(InvalidParameter, match="gpus"):
        plan(gpu_profile(), gpus=2)


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
