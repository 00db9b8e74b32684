"""The serving config schema and the files under deploy/ (no Ray cluster needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.app import build_app, ray_serve_config
from serve.config import hash_key, load_config, parse_config
from stages.errors import InvalidParameter
from tests.serving import ROOT

CONFIGS = ["local", "single-gpu", "cluster"]
KEY_ENV = {"IFSERVE_API_KEYS_SHA256": hash_key("test-key")}


@pytest.fixture
def api_key_env(monkeypatch):
    for name, value in KEY_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("name", CONFIGS)
def test_deploy_configs_validate_and_give_every_stage_a_pool(name, api_key_env):
    config = load_config(ROOT / "deploy" / f"{name}.yaml")
    pools = {config.encoder.pool, *(stage.pool for stage in config.stages.values())}
    assert len(pools) == 4 and None not in pools  # four deployments, four pools
    for stage in config.stages.values():
        assert stage.max_ongoing_requests >= stage.max_batch_size
        assert stage.deployment_options()["ray_actor_options"]["resources"] == {stage.pool: 1}
    if config.model.device == "cuda":
        assert all(stage.num_gpus > 0 for stage in config.stages.values())


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_serve_config_files_are_generated_from_ours(name, api_key_env):
    """deploy/serve/*.yaml are what `ifserve serve-config` prints, and Ray's own schema accepts them."""
    checked_in = yaml.safe_load((ROOT / "deploy" / "serve" / f"{name}.yaml").read_text())
    config_path = f"deploy/{name}.yaml"
    assert checked_in == ray_serve_config(config_path, load_config(ROOT / config_path))
    ServeDeploySchema.parse_obj(checked_in)  # Ray raises if its own schema rejects the file


def test_cluster_config_requires_api_keys_when_listening_beyond_loopback(monkeypatch):
    monkeypatch.delenv("IFSERVE_API_KEYS_SHA256", raising=False)
    with pytest.raises(InvalidParameter) as err:
        load_config(ROOT / "deploy" / "cluster.yaml")
    assert err.value.param == "http.host"


BASE = {"model": {"id": "m", "checkpoints": "c"}}


@pytest.mark.parametrize(
    "override,param",
    [
        ({"stages": {"stage1": {"max_batch_size": 32, "max_ongoing_requests": 8}}}, "stages.stage1"),
        ({"stages": {"stage4": {}}}, "stages"),
        ({"stages": {"stage1": {"pool": "gpus"}}}, "stages.stage1.pool"),
        ({"stages": {"stage1": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}}, "stages.stage1.autoscaling"),
        ({"stages": {"stage2": {"mode": "fast"}}}, "stages.stage2.mode"),
        ({"encoder": {"cache_size": -1}}, "encoder.cache_size"),
        ({"stages": {"stage1": {"batch_wait_timeout_s": 1}}}, "stages.stage1.batch_wait_timeout_s"),
        ({"cluster": {"resources": {"pool_stage1": 1}}}, "encoder.pool"),
        ({"model": {"id": "m", "checkpoints": "c", "family": "dall-e"}}, "model.family"),
        ({"http": {"host": "0.0.0.0"}}, "http.host"),
        ({"auth": {"api_key_sha256": ["secret"]}}, "auth.api_key_sha256.0"),
    ],
)
def test_bad_configs_name_the_field(override, param):
    with pytest.raises(InvalidParameter) as err:
        parse_config({**BASE, **override})
    assert err.value.param == param, str(err.value)


def test_keys_are_stored_hashed_and_checked_by_hash():
    config = parse_config({**BASE, "http": {"host": "0.0.0.0"}, "auth": {"api_key_sha256": [hash_key("k1")]}})
    assert config.auth.accepts("k1") and not config.auth.accepts("k2") and not config.auth.accepts(None)
    assert "k1" not in config.model_dump_json()


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "stages": {"stage3": {"max_batch_size": 0}}}))
    result = subprocess.run(
        [sys.executable, "-m", "serve.cli", "up", "--config", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ifserve up: error: stages.stage3.max_batch_size: Input should be greater than or equal to 1"
    ]
    missing = subprocess.run(
        [sys.executable, "-m", "serve.cli", "up", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "--config: cannot read" in missing.stderr


@pytest.mark.parametrize(
    "override,param",
    [
        ({"model": {"text_encoder_8bit": True}}, "model.text_encoder_8bit"),
        ({"stages": {"stage3": {"cpu_offload": True}}}, "stages.stage3.cpu_offload"),
        ({"model": {"device": "cuda"}, "stages": {"stage2": {"cpu_offload": True}}}, "stages.stage2.cpu_offload"),
    ],
)
def test_memory_options_that_need_a_gpu_are_refused_on_cpu_naming_the_key(override, param):
    """8-bit T5 and model CPU offload are GPU options (the seed's, for smaller GPUs): a CPU config asking
    for them is refused at load, naming the key, rather than failing in a replica."""
    data = {"model": {"id": "m", "checkpoints": "ck"}}
    for key, value in override.items():
        data[key] = {**data.get(key, {}), **value}
    with pytest.raises(InvalidParameter) as err:
        parse_config(data)
    assert err.value.param == param


def test_memory_and_safety_options_reach_the_deployments():
    config = parse_config(
        {
            "model": {"id": "m", "checkpoints": "ck", "device": "cuda", "variant": "fp16", "safety_checker": True},
            "stages": {"stage3": {"num_gpus": 1, "cpu_offload": True}},
        }
    )
    stages = build_app(config)._bound_deployment.init_args[2]  # Ingress.bind(config, encoder, stages)
    stage2, stage3 = (stages[name]._bound_deployment.init_kwargs for name in ("stage2", "stage3"))
    assert stage3["cpu_offload"] is True and stage2["cpu_offload"] is False
    assert stage3["model"]["safety_checker"] is True and stage3["model"]["variant"] == "fp16"
