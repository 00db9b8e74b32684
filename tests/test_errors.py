"""Bad input fails with a clear message naming the parameter, never a trace from inside torch."""

import json

import pytest
import torch

from serve.cli import main
from stages.errors import CheckpointError, InvalidParameter
from stages.executor import StageExecutor
from stages.families.deepfloyd_if import GenerationParams, load_stage1, load_stage2
from stages.loading import load_pipeline
from stages.scheduler import StageScheduler
from stages.task import StageRequest, TextEmbeddings
from tests.stepping import iterate, stage_request


@pytest.fixture(scope="module")
def embeddings(cascade):
    return cascade.text_encoder.encode(["a red bicycle"])[0]


@pytest.mark.parametrize(
    "fields,param",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="   "), "prompt"),
        (dict(prompt="x" * 2001), "prompt"),
        (dict(prompt="a", stage1_steps=0), "stage1_steps"),
        (dict(prompt="a", stage3_steps=-3), "stage3_steps"),
        (dict(prompt="a", stage1_timesteps="fast99"), "stage1_timesteps"),
        (dict(prompt="a", stage2_noise_level=1000), "stage2_noise_level"),
        (dict(prompt="a", stage3_noise_level=-1), "stage3_noise_level"),
        (dict(prompt="a", stage1_guidance=float("nan")), "stage1_guidance"),
        (dict(prompt="a", size=512), "size"),
        (dict(prompt="a", seed=-1), "seed"),
        (dict(prompt="a", stage_one_steps=3), "stage_one_steps"),
    ],
)
def test_params_name_the_bad_field(fields, param):
    with pytest.raises(InvalidParameter) as err:
        GenerationParams.parse(**fields)
    assert err.value.param == param
    assert str(err.value).startswith(f"{param}: ")


def test_engine_rejects_bad_steps_timesteps_noise(cascade, embeddings):
    stage1, stage2, stage3 = (cascade.stages[s] for s in ("stage1", "stage2", "stage3"))
    image64 = torch.zeros(1, 3, 64, 64)
    cases = [
        (stage1, StageRequest("r", 0, 7.0, embeddings=embeddings, seed=1), "stage1_steps"),
        (stage1, StageRequest("r", 5, 7.0, timesteps=[5000, 10], embeddings=embeddings, seed=1), "stage1_timesteps"),
        (stage1, StageRequest("r", 5, -1.0, embeddings=embeddings, seed=1), "stage1_guidance"),
        (stage1, StageRequest("r", 5, 7.0, embeddings=embeddings), "seed"),
        (
            stage2,
            StageRequest("r", 5, 4.0, noise_level=1000, embeddings=embeddings, image=image64, seed=1),
            "stage2_noise_level",
        ),
        (
            stage2,
            StageRequest("r", 5, 4.0, noise_level=250, embeddings=embeddings, image=torch.zeros(3, 64, 64), seed=1),
            "image",
        ),
        (
            stage3,
            StageRequest("r", 5, 9.0, noise_level=351, prompt="a", image=torch.zeros(1, 3, 256, 256), seed=1),
            "stage3_noise_level",
        ),
    ]
    for stage, request, param in cases:
        with pytest.raises(InvalidParameter) as err:
            stage.admit([request])
        assert err.value.param == param, request


@pytest.mark.parametrize(
    "shape,param",
    [((1, 77, 5), "prompt_embeds"), ((77, 64), "prompt_embeds"), ((2, 77, 64), "prompt_embeds")],
)
def test_engine_rejects_wrong_embedding_shape(cascade, embeddings, shape, param):
    bad = TextEmbeddings(torch.zeros(shape), embeddings.negative_embeds)
    with pytest.raises(InvalidParameter) as err:
        cascade.stages["stage1"].admit([StageRequest("r", 3, 7.0, embeddings=bad, seed=1)])
    assert err.value.param == param
    assert "expected shape (1, sequence, 64)" in str(err.value)


def test_mismatched_negative_embeddings(cascade, embeddings):
    bad = TextEmbeddings(embeddings.prompt_embeds, torch.zeros(1, 10, 64))
    with pytest.raises(InvalidParameter, match="negative_prompt_embeds"):
        cascade.stages["stage1"].admit([StageRequest("r", 3, 7.0, embeddings=bad, seed=1)])


def test_a_bad_request_admits_nothing(cascade, embeddings):
    """Validation happens before any task is built, so a batch with one bad request starts nothing."""
    good = stage_request("stage1", "good", GenerationParams(prompt="a", stage1_steps=3), embeddings=embeddings, seed=1)
    bad = StageRequest("bad", 0, 7.0, embeddings=embeddings, seed=1)
    calls = cascade.stages["stage1"].unet_calls
    with pytest.raises(InvalidParameter):
        cascade.stages["stage1"].run([good, bad])
    assert cascade.stages["stage1"].unet_calls == calls


def test_checkpoint_errors_name_the_folder(tmp_path, tiny_checkpoints):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pipeline(tmp_path / "missing", expect=("IFPipeline",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty.*is empty"):
        load_pipeline(tmp_path / "empty", expect=("IFPipeline",))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_pipeline(broken, expect=("IFPipeline",))
    with pytest.raises(CheckpointError, match="holds a IFSuperResolutionPipeline; expected IFPipeline"):
        load_stage1(tiny_checkpoints / "IF-II")
    with pytest.raises(CheckpointError, match="neither a folder nor a model in the local Hugging Face cache"):
        load_pipeline("DeepFloyd/IF-I-XL-v1.0-not-cached", expect=("IFPipeline",))


def test_unreadable_weights_are_a_checkpoint_error(tmp_path, tiny_checkpoints):
    import shutil

    copy = tmp_path / "IF-II"
    shutil.copytree(tiny_checkpoints / "IF-II", copy)
    (copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"cannot load IFSuperResolutionPipeline from .*IF-II"):
        load_stage2(copy)
    index = json.loads((copy / "model_index.json").read_text())
    assert index["_class_name"] == "IFSuperResolutionPipeline"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--stage1-steps", "0"], "stage1_steps"),
        (["--stage1-timesteps", "nope"], "unknown timestep list 'nope'"),
        (["--stage2-noise-level", "1000"], "stage2_noise_level"),
        (["--prompt", ""], "prompt"),
    ],
)
def test_cli_reports_bad_parameters(tmp_path, tiny_checkpoints, capsys, args, needle):
    argv = ["generate", "--checkpoints", str(tiny_checkpoints), "--prompt", "a cat", "--out", str(tmp_path / "x.png")]
    assert main(argv + args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_cli_reports_missing_checkpoints(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["generate", "--checkpoints", str(tmp_path / "empty"), "--prompt", "a", "--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has no IF-I, IF-II, x4-upscaler folder" in err and "ifserve checkpoints" in err


def test_scheduler_refuses_only_the_bad_request(cascade, embeddings):
    scheduler, executor = StageScheduler(max_batch_size=4), StageExecutor(cascade.stages["stage1"])
    params = GenerationParams(prompt="a", stage1_steps=2)
    scheduler.submit("good", stage_request("stage1", "good", params, embeddings=embeddings, seed=1))
    scheduler.submit("bad", StageRequest("bad", 0, 7.0, embeddings=embeddings, seed=1))
    first = iterate(scheduler, executor)
    assert [(t.request_id, e.param) for t, e in first.failed] == [("bad", "stage1_steps")]
    assert first.batch_size == 1 and [t.status.value for t, _ in first.failed] == ["failed"]
    second = iterate(scheduler, executor)
    assert [t.request_id for t, _ in second.finished] == ["good"] and not scheduler.has_work
