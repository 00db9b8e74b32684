"""The exactness contract: every stage, and the whole cascade, equals the seed's reference diffusers
code on the same checkpoints, prompt, parameters and seed - run alone, or sharing its steps with other
tasks that join and leave at different steps."""

import numpy as np
import pytest
import torch

from stages.executor import StageExecutor
from stages.families.deepfloyd_if import GenerationParams
from stages.images import to_pil
from stages.scheduler import StageScheduler
from tests.reference import reference_cascade
from tests.stepping import iterate, stage_request

TOL = 1e-4  # max abs difference in [-1, 1]: the contract, alone or sharing batches (batch invariance is on)

# Different prompts, seeds, step counts, named timestep lists, guidance (on and off) and noise levels.
CASES = [
    GenerationParams(
        prompt='a photo of a kangaroo wearing an orange hoodie holding a sign that says "very deep learning"',
        seed=1,
        stage1_steps=12,
        stage2_steps=6,
        stage3_steps=5,
    ),
    GenerationParams(
        prompt="A red bicycle",
        negative_prompt="blurry, low quality",
        seed=7,
        stage1_timesteps="fast27",
        stage1_guidance=5.0,
        stage2_steps=4,
        stage2_guidance=1.0,
        stage2_noise_level=100,
        stage3_steps=3,
        stage3_guidance=1.0,
        stage3_noise_level=20,
    ),
    GenerationParams(
        prompt="an astronaut riding a horse",
        seed=123,
        stage1_steps=6,
        stage1_guidance=1.0,
        stage2_timesteps="smart27",
        stage2_noise_level=0,
        stage3_steps=4,
        stage3_guidance=3.0,
        stage3_noise_level=350,
    ),
]
STAGES = [("stage1", 64), ("stage2", 256), ("stage3", 1024)]


@pytest.fixture(scope="module")
def references(reference_pipes):
    return [reference_cascade(reference_pipes, p) for p in CASES]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _stage_request(cascade, stage, size, case, ref, request_id):
    """The stage's request, fed the reference's own output of the previous stage."""
    params = CASES[case]
    images, states = ref
    emb = cascade.text_encoder.encode([params.prompt], [params.negative_prompt])[0]
    if stage == "stage1":
        inputs = dict(seed=params.seed, embeddings=emb)
    else:
        prev = size // 4
        inputs = dict(image=images[prev], generator_state=states[prev])
        if stage == "stage2":
            inputs["embeddings"] = emb
    return stage_request(stage, request_id, params, **inputs)


def test_text_encoder_matches_encode_prompt(cascade, reference_pipes):
    prompts = [p.prompt for p in CASES]
    negatives = [p.negative_prompt for p in CASES]
    batched = cascade.text_encoder.encode(prompts, negatives)
    for params, emb in zip(CASES, batched, strict=True):
        cond, uncond = reference_pipes[0].encode_prompt(params.prompt, negative_prompt=params.negative_prompt)
        assert emb.prompt_embeds.shape == cond.shape == (1, 77, cascade.text_encoder.embed_dim)
        # Encoded together, each prompt's embeddings are bit for bit those of encoding it alone.
        assert torch.equal(emb.prompt_embeds, cond)
        assert torch.equal(emb.negative_embeds, uncond)


@pytest.mark.parametrize("stage,size", STAGES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_stage_alone_matches_reference(cascade, references, stage, size, case):
    request = _stage_request(cascade, stage, size, case, references[case], "alone")
    [output] = cascade.stages[stage].run([request])
    assert output.image.shape == references[case][0][size].shape
    assert _max_diff(output.image, references[case][0][size]) <= TOL
    # The generator leaves the stage in the state the reference leaves it for the next stage.
    assert torch.equal(output.generator_state, references[case][1][size])


@pytest.mark.parametrize("stage,size", STAGES)
def test_stage_shared_steps_match_reference(cascade, references, stage, size):
    """Tasks join a running batch mid-denoise and leave at their own last step; each still equals
    its reference run alone."""
    engine = cascade.stages[stage]
    scheduler, executor = StageScheduler(max_batch_size=8), StageExecutor(engine)
    calls_before = engine.unet_calls
    outputs, sizes = {}, []
    arrivals = {0: [0], 2: [1], 3: [2, 0]}  # step -> cases arriving; case 0 twice (a repeat request)
    step = 0
    while step <= max(arrivals) or scheduler.has_work:
        for n, case in enumerate(arrivals.get(step, [])):
            request_id = f"{case}-{step}-{n}"
            scheduler.submit(request_id, _stage_request(cascade, stage, size, case, references[case], request_id))
        report = iterate(scheduler, executor)
        assert not report.failed
        outputs.update({task.request_id: output for task, output in report.finished})
        sizes.append(report.batch_size)
        step += 1

    assert len(outputs) == 4
    for request_id, output in outputs.items():
        case = int(request_id.split("-")[0])
        assert _max_diff(output.image, references[case][0][size]) <= TOL, request_id
        assert _pixel_diff(output.image, references[case][0][size]) <= 1, request_id
    # Steps really were shared: batches grew as tasks joined and shrank as they left.
    assert sizes[0] == 1 and max(sizes) >= 3 and sizes[-1] < max(sizes)
    task_steps = sum(o.steps for o in outputs.values())
    assert task_steps == sum(sizes)
    assert engine.unet_calls - calls_before < task_steps


@pytest.mark.parametrize("mode", ["step", "request"])
def test_cascade_matches_reference(cascade, references, mode):
    results = cascade.generate_many(CASES, mode=mode, max_batch_size=4)
    assert [r.error for r in results] == [None] * len(CASES)
    for params, result, (ref_images, _) in zip(CASES, results, references, strict=True):
        for _, size in STAGES:
            assert result.images[size].size == (size, size)
            assert _max_diff(result.tensors[size], ref_images[size]) <= TOL, (params.seed, size)
            assert _pixel_diff(result.tensors[size], ref_images[size]) <= 1, (params.seed, size)
            assert np.array_equal(np.asarray(result.images[size]), np.asarray(to_pil(result.tensors[size])))


def test_without_batch_invariance_shared_batches_stay_within_one_level(cascade, references):
    """The opt-out (one plain batched UNet call) is near the reference, not equal: a few 1e-3 at most."""
    cascade.set_batch_invariant(False)
    try:
        results = cascade.generate_many(CASES, max_batch_size=4)
    finally:
        cascade.set_batch_invariant(True)
    for params, result, (ref_images, _) in zip(CASES, results, references, strict=True):
        for _, size in STAGES:
            assert _max_diff(result.tensors[size], ref_images[size]) <= 4e-3, (params.seed, size)
            assert _pixel_diff(result.tensors[size], ref_images[size]) <= 1, (params.seed, size)


def test_cascade_single_request_equals_reference_within_contract(cascade, references):
    """One request alone through the whole cascade: the full contract, 1e-4 at every stage."""
    [result] = cascade.generate_many([CASES[0]])
    for _, size in STAGES:
        assert _max_diff(result.tensors[size], references[0][0][size]) <= TOL, size
        assert _pixel_diff(result.tensors[size], references[0][0][size]) <= 1, size


def _pixel_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    ours = np.asarray(to_pil(a), dtype=np.int16)
    theirs = np.asarray(to_pil(b), dtype=np.int16)
    return int(np.abs(ours - theirs).max())
