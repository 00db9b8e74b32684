"""The serving config schema and the files under deploy/ (no Ray cluster needed)."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.app import build_app, ray_serve_config
from serve.config import hash_key, load_config, parse_config
from stages.errors import InvalidParameter
from tests.cli import ifserve
from tests.serving import ROOT

CONFIGS = ["local", "single-gpu", "cluster", "two-families"]
KEY_ENV = {"IFSERVE_API_KEYS_SHA256": hash_key("test-key")}


@pytest.fixture
def api_key_env(monkeypatch):
    for name, value in KEY_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("name", CONFIGS)
def test_deploy_configs_validate_and_give_every_stage_a_pool(name, api_key_env):
    config = load_config(ROOT / "deploy" / f"{name}.yaml")
    every_pool = []
    for graph in config.graphs:
        pools = [graph.encoder.pool, *(stage.pool for stage in graph.stages.values())]
        assert len(set(pools)) == 1 + len(graph.family.stages) and None not in pools  # a pool per deployment
        every_pool += pools
        for stage in graph.stages.values():
            assert stage.max_ongoing_requests >= stage.max_batch_size
            assert stage.deployment_options()["ray_actor_options"]["resources"] == {stage.pool: 1}
        if graph.model.device == "cuda":
            assert all(stage.num_gpus > 0 for stage in graph.stages.values())
    assert len(every_pool) == len(set(every_pool))  # no model shares a pool with another


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_serve_config_files_are_generated_from_ours(name, api_key_env):
    """deploy/serve/*.yaml are what `ifserve serve-config` prints, and Ray's own schema accepts them."""
    checked_in = yaml.safe_load((ROOT / "deploy" / "serve" / f"{name}.yaml").read_text())
    config_path = f"deploy/{name}.yaml"
    assert checked_in == ray_serve_config(config_path, load_config(ROOT / config_path))
    ServeDeploySchema.parse_obj(checked_in)  # Ray raises if its own schema rejects the file


def test_the_cluster_config_loads_without_its_secrets_but_will_not_serve_without_a_key(monkeypatch):
    """Issue 25, finding 13: a manifest is written where no secret is (the config loads), while the service,
    which listens beyond loopback, refuses to start without a key digest in IFSERVE_API_KEYS_SHA256."""
    monkeypatch.delenv("IFSERVE_API_KEYS_SHA256", raising=False)
    config = load_config(ROOT / "deploy" / "cluster.yaml")
    with pytest.raises(InvalidParameter) as err:
        config.check_can_serve()
    assert err.value.param == "auth.api_key_sha256_env" and "IFSERVE_API_KEYS_SHA256" in err.value.message
    monkeypatch.setenv("IFSERVE_API_KEYS_SHA256", hash_key("a key"))
    load_config(ROOT / "deploy" / "cluster.yaml").check_can_serve()


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
        # Beyond loopback the links of `url` images must say where clients reach the service (issue 25).
        ({"http": {"host": "0.0.0.0"}, "auth": {"require_key": True}}, "storage.public_url"),
        ({"storage": {"public_url": "ftp://x"}}, "storage.public_url"),
        ({"auth": {"api_key_sha256": ["secret"]}}, "auth.api_key_sha256.0"),
        ({"kuberay": {"pools": {"pool_gpus": {}}}}, "kuberay.pools.pool_gpus"),
        ({"kuberay": {"pools": {"pool_stage1": {"memory": "lots"}}}}, "kuberay.pools.pool_stage1.memory"),
    ],
)
def test_bad_configs_name_the_field(override, param):
    with pytest.raises(InvalidParameter) as err:
        parse_config({**BASE, **override})
    assert err.value.param == param, str(err.value)


def test_keys_are_stored_hashed_and_checked_by_hash():
    config = parse_config({**BASE, "http": {"host": "0.0.0.0"}, "auth": {"api_key_sha256": [hash_key("k1")]},
                           "storage": {"public_url": "https://images.example.com"}})  # fmt: skip
    assert config.auth.accepts("k1") and not config.auth.accepts("k2") and not config.auth.accepts(None)
    assert "k1" not in config.model_dump_json()


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "stages": {"stage3": {"max_batch_size": 0}}}))
    result = ifserve("up", "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ifserve up: error: stages.stage3.max_batch_size: Input should be greater than or equal to 1"
    ]
    missing = ifserve("up", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "--config: cannot read" in missing.stderr


def _config(model: dict | None = None, encoder: dict | None = None, stages: dict | None = None) -> dict:
    data: dict = {"model": {"id": "m", "checkpoints": "ck", **(model or {})}}
    if encoder is not None:
        data["encoder"] = encoder
    if stages is not None:
        data["stages"] = stages
    return data


def _gpu_stages(**changes: dict) -> dict:
    """A quarter of a GPU for every stage, with `changes` per stage."""
    return {f"stage{i}": {"num_gpus": 0.25, **changes.get(f"stage{i}", {})} for i in (1, 2, 3)}


ON_GPU = {"encoder": {"num_gpus": 0.25}, "stages": _gpu_stages()}


@pytest.mark.parametrize(
    "data,param",
    [
        (_config(stages={"stage3": {"cpu_offload": True}}), "stages.stage3.cpu_offload"),
        (_config({"device": "cuda"}, stages={"stage2": {"cpu_offload": True}}), "stages.stage2.cpu_offload"),
        # Issue 27: every deployment of a GPU model needs a GPU from Ray, and a CPU model's none.
        (_config({"device": "cuda"}), "encoder.num_gpus"),
        (_config({"device": "cuda"}, encoder={"num_gpus": 0.5}), "stages.stage1.num_gpus"),
        (
            _config({"device": "cuda:0"}, ON_GPU["encoder"], _gpu_stages(stage3={"num_gpus": 0})),
            "stages.stage3.num_gpus",
        ),
        (_config(stages={"stage2": {"num_gpus": 1}}), "stages.stage2.num_gpus"),
        (_config(encoder={"num_gpus": 0.5}), "encoder.num_gpus"),
    ],
)
def test_gpu_options_are_refused_where_no_gpu_is_or_where_one_is_missing(data, param):
    """Model CPU offload is a GPU option (the seed's, for smaller GPUs), and `device: cuda` with a
    deployment that asks Ray for no GPU (or `device: cpu` with one that does) cannot be what was meant:
    refused at load, naming the key, rather than failing (or idling a GPU) in a replica."""
    with pytest.raises(InvalidParameter) as err:
        parse_config(data)
    assert err.value.param == param, str(err.value)
    assert parse_config(_config({"device": "cuda"}, **ON_GPU)).model.on_gpu  # every deployment has a share


@pytest.mark.parametrize(
    "model,new",
    [
        ({"text_encoder_8bit": True}, "text_encoder_dtype: bfloat16"),
        ({"batch_invariant": True}, "batch_invariance: split"),
        ({"batch_invariant": False}, "batch_invariance: off"),
    ],
)
def test_replaced_keys_are_refused_naming_the_key_and_showing_the_new_form(model, new):
    """Issue 27: 8-bit T5 is gone (it ran on the CPU, and bitsandbytes' outlier columns made a prompt's
    embedding depend on its batch-mates); `batch_invariant` became the per-deployment `batch_invariance`."""
    with pytest.raises(InvalidParameter) as err:
        parse_config(_config(model))
    assert err.value.param == f"model.{next(iter(model))}"
    assert new in err.value.message
    # what the message says to write loads, read from YAML as a person writes it (unquoted `off` is false)
    assert parse_config(_config(yaml.safe_load(new)))


def test_batch_invariance_is_one_mode_or_one_per_deployment_and_reaches_each_loader():
    from serve.deployments import DTYPES, _encoder_options, _stage_options
    from stages.batch_invariance import MODES

    written = "batch_invariance: {stage1: off, text_encoder: per_task}\ntext_encoder_dtype: bfloat16\ndevice: cuda"
    config = parse_config(_config(yaml.safe_load(written), **ON_GPU))
    nodes = build_app(config)._bound_deployment.init_args[1]["m"]  # Ingress.bind(config, {model id: nodes})
    models = {node: app._bound_deployment.init_kwargs["model"] for node, app in nodes.items()}
    assert {node: model["batch_invariant"] for node, model in models.items()} == {
        "text_encoder": "per_task", "stage1": "off", "stage2": "split", "stage3": "split"
    }  # fmt: skip
    encoder = _encoder_options(models["text_encoder"])
    assert encoder["batch_invariant"] == "per_task" and encoder["torch_dtype"] == DTYPES["bfloat16"]
    stage1 = _stage_options(models["stage1"], cpu_offload=False)
    assert stage1["batch_invariant"] == "off" and stage1["torch_dtype"] == DTYPES["float32"]
    unset = parse_config(_config()).model  # the defaults: split everywhere, the text encoder in model.dtype
    assert unset.invariance("stage3") == unset.invariance("text_encoder") == "split"
    assert unset.encoder_dtype == "float32"
    assert set(MODES) == {"split", "per_task", "off"}  # the config's modes are the engines'
    for bad, word in [({"stage4": "off"}, "stage4"), ("fast", "fast"), ({"stage1": "fast"}, "fast")]:
        with pytest.raises(InvalidParameter) as err:
            parse_config(_config({"batch_invariance": bad}))
        assert err.value.param == "model.batch_invariance" and word in err.value.message


def test_memory_and_safety_options_reach_the_deployments():
    stages = _gpu_stages(stage3={"num_gpus": 1, "cpu_offload": True})
    config = parse_config(
        _config({"device": "cuda", "variant": "fp16", "safety_checker": True}, ON_GPU["encoder"], stages)
    )
    stages = build_app(config)._bound_deployment.init_args[1]["m"]  # Ingress.bind(config, {model id: nodes})
    stage2, stage3 = (stages[name]._bound_deployment.init_kwargs for name in ("stage2", "stage3"))
    assert stage3["cpu_offload"] is True and stage2["cpu_offload"] is False
    assert stage3["model"]["safety_checker"] is True and stage3["model"]["variant"] == "fp16"


def _two_families() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "two-families.yaml").read_text())


def test_two_models_each_get_their_own_graph():
    config = parse_config(_two_families())
    assert [graph.model.id for graph in config.graphs] == ["deepfloyd-if-tiny", "decidiffusion-tiny"]
    assert config.models[0].family.name == "decidiffusion"
    graphs = build_app(config)._bound_deployment.init_args[1]  # Ingress.bind(config, {model id: nodes})
    deci = graphs["decidiffusion-tiny"]
    assert set(deci) == {"text_encoder", "denoiser"}
    assert deci["denoiser"]._bound_deployment.name == "UNetNAS"
    assert deci["text_encoder"]._bound_deployment.name == "CLIPTextEncoder"
    assert deci["denoiser"]._bound_deployment.init_kwargs["model"]["family"] == "decidiffusion"
    assert graphs["deepfloyd-if-tiny"]["stage1"]._bound_deployment.name == "StageI"


def test_a_models_encoder_left_out_gets_a_pool_named_after_it():
    data = _two_families()
    del data["models"][0]["encoder"]
    assert parse_config(data).models[0].encoder.pool == "pool_clip_text_encoder"
    data["models"][0]["encoder"] = {"num_cpus": 1}  # given without a pool: runs on any node, as a stage would
    assert parse_config(data).models[0].encoder.pool is None


def test_checkpoints_are_written_per_family_and_a_partial_folder_is_refused(tmp_path):
    from serve.app import ensure_checkpoints
    from stages.errors import CheckpointError

    data = _two_families()
    shared = tmp_path / "shared"
    data["model"]["checkpoints"] = data["models"][0]["model"]["checkpoints"] = str(shared)
    (shared / "IF-I").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"^model.checkpoints: .* lacks IF-II, x4-upscaler of deepfloyd-if"):
        ensure_checkpoints(parse_config(data), progress=lambda *_: None)
    for folder in ("IF-II", "x4-upscaler"):  # IF's folders present: only DeciDiffusion's is written, beside them
        (shared / folder).mkdir()
    data["models"][0]["model"]["preset"] = None
    with pytest.raises(CheckpointError, match=r"^models.0.model.checkpoints: .*set models.0.model.preset"):
        ensure_checkpoints(parse_config(data), progress=lambda *_: None)
    data["models"][0]["model"]["preset"] = "tiny"
    ensure_checkpoints(parse_config(data), progress=lambda *_: None)
    assert (shared / "DeciDiffusion-v1-0" / "model_index.json").is_file()
    assert not any((shared / "IF-I").iterdir())  # left as it was


@pytest.mark.parametrize(
    "change,param",
    [
        (lambda d: d["models"][0]["model"].update(id="deepfloyd-if-tiny"), "models.0.model.id"),
        (lambda d: d["models"][0]["model"].update(id="deepfloyd/if.tiny"), "models.0.model.id"),
        (lambda d: d["models"][0]["encoder"].update(pool="pool_text_encoder"), "models.0.encoder.pool"),
        (lambda d: d["models"][0]["stages"]["denoiser"].update(pool="pool_elsewhere"), "models.0.stages.denoiser.pool"),
        (lambda d: d["models"][0]["stages"].update(stage1={}), "models.0.stages"),
        (lambda d: d["models"][0]["model"].update(safety_checker=True), "models.0.model.safety_checker"),
        (
            lambda d: d["models"][0]["stages"]["denoiser"].update(max_batch_size=0),
            "models.0.stages.denoiser.max_batch_size",
        ),
        (lambda d: d["models"][0]["model"].update(preset="huge"), "models.0.model.preset"),
        (lambda d: d["models"].append({"model": {"id": "x"}}), "models.1.model.checkpoints"),
    ],
    ids=[
        "same-id",
        "same-slug",
        "shared-pool",
        "undeclared-pool",
        "foreign-stage",
        "no-safety-checker",
        "batch",
        "preset",
        "no-ckpt",
    ],
)
def test_bad_second_models_name_the_field(change, param):
    data = _two_families()
    change(data)
    with pytest.raises(InvalidParameter) as err:
        parse_config(data)
    assert err.value.param == param, str(err.value)


def test_one_family_served_twice_gets_deployment_names_of_its_own():
    data = _two_families()
    data["cluster"]["resources"].update({f"pool_b_{n}": 1 for n in ("enc", "s1", "s2", "s3")})
    stages = {f"stage{i}": {"pool": f"pool_b_s{i}"} for i in (1, 2, 3)}
    second = {"model": {"id": "if/b", "checkpoints": "other"}, "encoder": {"pool": "pool_b_enc"}, "stages": stages}
    data["models"].append(second)
    names = parse_config(data).deployment_names()
    assert names[0]["stage1"] == "StageI" and names[1]["denoiser"] == "UNetNAS"
    assert names[2] == {
        "text_encoder": "if_b-TextEncoder", "stage1": "if_b-StageI", "stage2": "if_b-StageII", "stage3": "if_b-StageIII"
    }  # fmt: skip


def test_tenancy_database_paths_urls_and_the_environment(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    relative = parse_config({**BASE, "tenancy": {"database": "sqlite:///db/tenants.db"}})
    assert relative.tenancy.database == f"sqlite:///{tmp_path / 'db' / 'tenants.db'}"  # replicas open the same file
    default = parse_config(BASE)
    assert default.tenancy.database == f"sqlite:///{tmp_path / 'out' / 'tenants.db'}"
    monkeypatch.setenv("TENANTS_URL", "postgresql+psycopg://u:secret@db.internal/tenants")
    from_env = parse_config({**BASE, "tenancy": {"database_env": "TENANTS_URL"}})
    assert from_env.tenancy.database == "postgresql+psycopg://u:secret@db.internal/tenants"
    with pytest.raises(InvalidParameter) as err:
        parse_config({**BASE, "tenancy": {"database": "not a url ::"}})
    assert err.value.param == "tenancy.database" and "secret" not in str(err.value)


def test_batch_lines_in_flight_leave_the_interactive_reserve_free():
    """deploy/local.yaml: two replicas a stage, two slots each; one kept for interactive requests."""
    shipped = load_config(ROOT / "deploy" / "local.yaml")
    assert shipped.batch.max_in_flight == 4 and shipped.batch_in_flight() == 3
    data = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    assert parse_config({**data, "batch": {"max_in_flight": 2}}).batch_in_flight() == 2
    assert parse_config({**data, "ingress": {**data["ingress"], "interactive_reserve": 0}}).batch_in_flight() == 4
    one_slot = {**data["stages"]["stage2"], "max_ongoing_requests": 1, "max_batch_size": 1,
                "autoscaling": {"min_replicas": 0, "max_replicas": 2, "initial_replicas": 0}}  # fmt: skip
    assert parse_config({**data, "stages": {**data["stages"], "stage2": one_slot}}).batch_in_flight() == 1


def test_drain_bounds_come_from_each_stages_expected_residence():
    """A stopping stage replica waits 3x its expected residence + 5 s (an explicit timeout wins; 60 s
    without either); the ingress waits for the slowest graph's stages in turn, and Ray gets both."""
    data = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    shipped = parse_config(data)
    stage3 = shipped.stages["stage3"]
    assert stage3.drain_s() == pytest.approx(3 * data["stages"]["stage3"]["expected_residence_s"] + 5)
    assert stage3.deployment_options()["graceful_shutdown_timeout_s"] == stage3.drain_s()
    stages = [shipped.encoder, *shipped.stages.values()]
    assert shipped.ingress_drain_s() == pytest.approx(sum(replica.drain_s() for replica in stages) + 5)
    app = build_app(shipped)
    assert app._bound_deployment._deployment_config.graceful_shutdown_timeout_s == shipped.ingress_drain_s()

    explicit = {**data["stages"]["stage3"], "graceful_shutdown_timeout_s": 12}
    unplanned = {k: v for k, v in data["stages"]["stage1"].items() if k != "expected_residence_s"}
    changed = parse_config({**data, "stages": {**data["stages"], "stage1": unplanned, "stage3": explicit}})
    assert changed.stages["stage3"].drain_s() == 12 and changed.stages["stage1"].drain_s() == 60
    assert changed.ingress_drain_s() > shipped.ingress_drain_s()  # an unplanned stage waits longer


def test_the_front_asks_for_rays_own_head_resource():
    """The ingress, limits and runner are pinned with the resource Ray gives its head node (a name Ray
    could change: an unknown one would leave them unschedulable)."""
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    from serve.app import HEAD_NODE_RESOURCE

    assert HEAD_NODE_RESOURCE == HEAD_NODE_RESOURCE_NAME
