"""Batch invariance: a task's rows come out of a shared forward pass bit for bit as if it ran alone.

Kernels choose their algorithm, blocking and reduction order from the shape of the whole input: oneDNN
runs a minibatch-1 convolution differently from a minibatch-8 one, a GEMM with 2 rows differently from
one with 16, group norm parallelises differently. Each choice is deterministic, but the results differ
in the last bits (~1e-6), and IF's DDPM step amplifies that: at high noise its x0 prediction divides by
sqrt(alpha_bar_t), so one shared step moves pixels by up to ~1e-3.

`RowGroups` is a torch function mode that closes that gap. While it is active, the ops whose kernels
choose by batch shape (linear, convolution, group and layer norm, scaled-dot-product attention) run once
per task, on exactly the rows the reference pipeline hands that kernel for that task (its [negative,
prompt] pair under guidance), and the results are put back together. Same kernel, same shape, same
input: same bits as the reference. Everything else runs on the whole batch: element-wise work, which
computes each element alone, and a few small reductions that give each row its own result on the
kernels measured here (softmax, mean and einsum in IF's text-time attention pooling, T5's RMS norm).
That assumption is checked, not trusted: tests/test_batch_invariance.py compares each task's UNet rows
with its own call bit for bit. The price is that the split kernels no longer see one large batch;
`benchmarks/bench_stages.py` measures it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# How a stage keeps each task's result independent of its batch-mates (the config's
# `model.batch_invariance`, per stage):
# - "split": one batched call, with the batch-sensitive ops below run per task (`RowGroups`): bit for
#   bit the reference, most of the batch's work shared (element-wise ops, the weights' reads in IF's
#   attention pooling), at the price of those ops' batching;
# - "per_task": one model call per task at the reference's own shape: bit for bit the reference with
#   no assumption about which ops are batch-sensitive, and no batching gain at all;
# - "off": one plain batched call: the fastest where kernels gain from batch size; each result then
#   depends on its batch-mates by a few 1e-3 at most.
Invariance = Literal["split", "per_task", "off"]
MODES: tuple[str, ...] = ("split", "per_task", "off")


def invariance_mode(value: bool | str) -> str:
    """A stage's invariance mode from the config's value (True/False are the older on/off)."""
    if value is True:
        return "split"
    if value is False:
        return "off"
    if value not in MODES:
        raise ValueError(f"batch_invariance: must be one of {', '.join(MODES)}, got {value!r}")
    return value


# Functions whose per-row output depends on the batch's shape, and which of their arguments carry the
# batch: positions, and keyword names for the same arguments given by keyword. (An attention mask
# without a batch dimension of its own is passed whole.)
_BATCHED_ARGS: dict[Callable, tuple[tuple[int, ...], tuple[str, ...]]] = {
    F.linear: ((0,), ("input",)),
    F.conv1d: ((0,), ("input",)),
    F.conv2d: ((0,), ("input",)),
    F.group_norm: ((0,), ("input",)),
    F.layer_norm: ((0,), ("input",)),
    F.scaled_dot_product_attention: ((0, 1, 2, 3), ("query", "key", "value", "attn_mask")),
}


class RowGroups(TorchFunctionMode):
    """Run the batch-sensitive ops of a forward pass once per group of consecutive rows.

    `sizes` are the group sizes in row order (they must sum to the batch size the model is called with).
    A batched argument whose leading dimension is not that batch size means the model reshaped the batch
    into something this mode cannot split: that raises rather than silently losing invariance.
    """

    def __init__(self, sizes: Sequence[int]):
        super().__init__()
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"sizes: must be positive group sizes, got {list(sizes)}")
        self.sizes = list(sizes)
        self.rows = sum(self.sizes)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        spec = _BATCHED_ARGS.get(func)
        if spec is None or len(self.sizes) == 1:
            return func(*args, **kwargs)
        positions, names = spec
        first = args[0] if args else kwargs.get(names[0])  # the input, or attention's query
        parts = []
        start = 0
        for size in self.sizes:
            rows = slice(start, start + size)
            start += size
            part_args = [self._rows(a, rows, func, first) if i in positions else a for i, a in enumerate(args)]
            part_kwargs = {k: self._rows(v, rows, func, first) if k in names else v for k, v in kwargs.items()}
            parts.append(func(*part_args, **part_kwargs))
        return torch.cat(parts)

    def _rows(self, value, rows: slice, func: Callable, first: torch.Tensor):
        if not isinstance(value, torch.Tensor):
            return value
        if func is F.scaled_dot_product_attention and value.ndim < first.ndim:
            return value  # a mask with no batch dimension, e.g. (L, S): the same for every row
        if value.ndim and value.shape[0] == self.rows:
            return value[rows]
        if value.ndim and value.shape[0] == 1 and func is F.scaled_dot_product_attention:
            return value  # a mask broadcast over the batch
        leading = value.shape[0] if value.ndim else "none (a scalar)"
        raise RuntimeError(
            f"{getattr(func, '__name__', func)} got an input with leading dimension {leading} "
            f"inside a forward pass over {self.rows} rows; batch invariance cannot split it"
        )


def row_groups(sizes: Sequence[int], enabled: bool = True) -> AbstractContextManager:
    """`RowGroups(sizes)` when it is enabled and there is more than one group to keep apart."""
    return RowGroups(sizes) if enabled and len(sizes) > 1 else nullcontext()


class WithInvariance:
    """A stage's or encoder's `invariance` mode, with `batch_invariant` as its older on/off view."""

    invariance: str = "split"

    @property
    def batch_invariant(self) -> bool:
        return self.invariance != "off"

    @batch_invariant.setter
    def batch_invariant(self, value: bool | str) -> None:
        self.invariance = invariance_mode(value)

    def row_groups(self, sizes: Sequence[int]) -> AbstractContextManager:
        """The split mode's `RowGroups` over these groups (nothing in the other modes)."""
        return row_groups(sizes, self.invariance == "split")
