"""Batch invariance: a task's UNet rows out of a shared call are bit for bit those of its own call."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from stages.batch_invariance import _BATCHED_ARGS, RowGroups
from stages.executor import StageExecutor
from stages.families.deepfloyd_if import GenerationParams
from stages.scheduler import StageScheduler
from tests.stepping import iterate, stage_request


def _unet_inputs(unet, rows: int, size: int, seed: int = 0):
    config = unet.config
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(rows, config.in_channels, size, size, generator=g)
    hidden = torch.randn(rows, 77, config.encoder_hid_dim or config.cross_attention_dim, generator=g)
    timesteps = torch.randint(0, 1000, (rows,), generator=g)
    labels = torch.randint(0, 250, (rows,), generator=g) if config.class_embed_type or config.num_class_embeds else None
    return sample, timesteps, hidden, labels


class _KernelRows(TorchFunctionMode):
    """Records the rows each split kernel call really gets (it sits outside RowGroups, so it sees the
    per-task calls RowGroups makes)."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, set[int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _BATCHED_ARGS:
            self.rows.setdefault(func.__name__, set()).add(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def _call(unet, sample, timesteps, hidden, labels, rows=slice(None)):
    labels = None if labels is None else labels[rows]
    return unet(sample[rows], timesteps[rows], encoder_hidden_states=hidden[rows], class_labels=labels).sample


@pytest.mark.parametrize("stage,size", [("stage1", 64), ("stage2", 256), ("stage3", 64)])
@torch.inference_mode()
def test_each_tasks_rows_equal_its_own_call(cascade, stage, size):
    """Four [negative, prompt] pairs at different timesteps in one call, each equal to the pair alone."""
    unet = cascade.stages[stage].unet
    inputs = _unet_inputs(unet, 8, size)
    with _KernelRows() as kernels, RowGroups([2, 2, 2, 2]):
        shared = _call(unet, *inputs)
    # Every split kernel saw one task's two rows, never the batch of 8.
    assert {"linear", "conv2d", "group_norm", "scaled_dot_product_attention"} <= set(kernels.rows)
    assert all(rows == {2} for rows in kernels.rows.values()), kernels.rows
    for start in range(0, 8, 2):
        alone = _call(unet, *inputs, rows=slice(start, start + 2))
        assert torch.equal(shared[start : start + 2], alone), start


def test_an_input_it_cannot_split_is_an_error_not_a_silent_drift():
    weight = torch.randn(4, 3)
    with RowGroups([2, 2]):
        F.linear(torch.randn(4, 3), weight)  # 4 rows: split in two
        with pytest.raises(RuntimeError, match="leading dimension 6 inside a forward pass over 4 rows"):
            F.linear(torch.randn(6, 3), weight)


@pytest.mark.parametrize("mask_shape", [None, (16, 16), (1, 1, 16, 16), (4, 1, 16, 16)])
def test_attention_splits_its_query_key_value_and_batched_masks_only(mask_shape):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 16, 8, generator=g) for _ in range(3))
    mask = None if mask_shape is None else torch.randn(mask_shape, generator=g) > 0
    mask_rows = (lambda rows: mask[rows]) if mask_shape and mask_shape[0] == 4 else (lambda rows: mask)
    with RowGroups([2, 2]):
        shared = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        by_keyword = F.linear(input=q, weight=torch.eye(8))
    expected = torch.cat(
        [F.scaled_dot_product_attention(q[r], k[r], v[r], attn_mask=mask_rows(r)) for r in (slice(0, 2), slice(2, 4))]
    )
    assert torch.equal(shared, expected)
    assert torch.equal(by_keyword, torch.cat([F.linear(q[:2], torch.eye(8)), F.linear(q[2:], torch.eye(8))]))


@pytest.mark.parametrize("sizes", [[], [2, 0], [-1]])
def test_group_sizes_must_be_positive(sizes):
    with pytest.raises(ValueError, match="sizes"):
        RowGroups(sizes)


@pytest.mark.parametrize("invariant,calls_per_step", [(True, 3), (False, 1)])
def test_unguided_tasks_get_their_own_call_only_when_invariant(cascade, invariant, calls_per_step):
    """Two guided tasks share one call; each unguided task (one row) needs its own to be exact."""
    engine = cascade.stages["stage1"]
    requests = []
    for i, guidance in enumerate([7.0, 7.0, 1.0, 1.0]):
        params = GenerationParams(prompt=f"prompt {i}", seed=i, stage1_steps=2, stage1_guidance=guidance)
        emb = cascade.text_encoder.encode([params.prompt])[0]
        requests.append(stage_request("stage1", str(i), params, seed=params.seed, embeddings=emb))
    previous, engine.batch_invariant = engine.batch_invariant, invariant
    try:
        scheduler, executor = StageScheduler(max_batch_size=4), StageExecutor(engine)
        for request in requests:
            scheduler.submit(request.request_id, request)
        before = engine.unet_calls
        reports = [iterate(scheduler, executor), iterate(scheduler, executor)]
    finally:
        engine.batch_invariant = previous
    assert not scheduler.has_work and [r.batch_size for r in reports] == [4, 4]
    assert len(reports[1].finished) == 4
    assert engine.unet_calls - before == 2 * calls_per_step
