"""Packing: mRoPE position ids for several samples concatenated along the token axis.

Each sample's positions restart at 0, exactly as if it were alone; the returned ``BlockDiagonal``
keeps samples from attending to each other, so a packed forward equals per-sample forwards.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..masks import BlockDiagonal
from .mrope import MRopeConfig, positions_flat

__all__ = ["packed_mrope_position_ids"]


def packed_mrope_position_ids(input_ids, config: MRopeConfig, *, seqlens: Sequence[int] | None = None,
                              image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None, causal: bool = True):
    """mRoPE position ids for packed samples.

    Args:
        input_ids: a list of 1-D token tensors (one per sample), or one packed 1-D tensor ``[T]``
            together with ``seqlens``.
        config: :class:`MRopeConfig`.
        seqlens: sample lengths summing to ``T`` when ``input_ids`` is packed.
        image_grid_thw, video_grid_thw, second_per_grid_ts: as :func:`mrope_position_ids`, in
            sample order.
        causal: whether the returned mask is causal per sample (decoder LLMs) or bidirectional.

    Returns ``(position_ids [3, T], deltas [num_samples, 1], mask)`` where
    ``position_ids[:, cu[i]:cu[i+1]]`` equals ``mrope_position_ids`` of sample ``i`` alone and
    ``mask = BlockDiagonal.from_seqlens(seqlens, causal=causal)``.
    """
    if isinstance(input_ids, (list, tuple)):
        if seqlens is not None:
            raise ValueError("seqlens is implied by a list of per-sample input_ids; pass one or the other")
        for i, x in enumerate(input_ids):
            if not isinstance(x, torch.Tensor) or x.dim() != 1:
                raise ValueError(f"input_ids[{i}] must be a 1-D token tensor, got {getattr(x, 'shape', x)!r}")
        seqlens = [int(x.numel()) for x in input_ids]
        ids = torch.cat(list(input_ids))
    else:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
            raise ValueError("input_ids must be a list of 1-D tensors or one packed 1-D tensor [T] with seqlens")
        if seqlens is None:
            raise ValueError("packed 1-D input_ids need seqlens (the sample lengths)")
        seqlens = [int(s) for s in seqlens]
        if sum(seqlens) != input_ids.numel() or any(s < 0 for s in seqlens):
            raise ValueError(f"seqlens {seqlens} must be >= 0 and sum to the {input_ids.numel()} packed tokens")
        ids = input_ids
    if ids.is_floating_point():
        raise ValueError(f"input_ids must hold token ids (an int dtype), got {ids.dtype}")
    pos, deltas = positions_flat(ids, None, seqlens, config, image_grid_thw, video_grid_thw, second_per_grid_ts)
    return pos, deltas, BlockDiagonal.from_seqlens(seqlens, causal=causal)
