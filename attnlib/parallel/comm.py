"""Differentiable collectives used by sequence parallelism (any backend that implements them: gloo, nccl)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` on a flat tensor with explicit element splits; backward: the inverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        out = x.new_empty(sum(out_splits))
        dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits))
        dist.all_to_all_single(back, grad.contiguous(), list(in_splits), list(out_splits), group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    """Send ``x`` (flat, split into ``in_splits`` elements per destination) and receive ``out_splits``."""
    return _AllToAll.apply(x.reshape(-1), tuple(out_splits), tuple(in_splits), group)


def all_gather_sizes(values, device, group) -> list[list[int]]:
    """Every rank's list of ints (same length on every rank), as Python ints (one small collective)."""
    n = dist.get_world_size(group)
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    got = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(got, mine, group=group)
    return [[int(v) for v in t.tolist()] for t in got]


def all_gather_padded(x: torch.Tensor, dim: int, sizes, group) -> list[torch.Tensor]:
    """Every rank's ``x`` (lengths ``sizes`` along ``dim``): padded to the longest, gathered, trimmed."""
    longest = max(sizes)
    pad = longest - x.shape[dim]
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim)
    x = x.contiguous()
    got = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(got, x, group=group)
    return [t.narrow(dim, 0, s) for t, s in zip(got, sizes)]
