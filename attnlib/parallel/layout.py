"""Where each token of a sequence lives when it is split over ``n`` ranks.

A layout maps a sequence of ``S`` tokens to ``n`` ranks; rank ``r`` holds a list of contiguous
``(start, stop)`` ranges of the global sequence, concatenated in that order. Uneven lengths: the first
``S % n`` pieces get one token more.

* ``"contiguous"``: rank ``r`` holds one run of ``S // n`` (or ``S // n + 1``) tokens, in rank order.
* ``"zigzag"``: the sequence is cut into ``2n`` chunks; rank ``r`` holds chunks ``r`` and ``2n - 1 - r``
  (for causal load balance under ring attention; Ulysses computes on the whole sequence anyway).
"""
from __future__ import annotations

import torch

from ..caching import host_lru

LAYOUTS = ("contiguous", "zigzag")


def split_sizes(total: int, parts: int) -> list[int]:
    """``parts`` sizes summing to ``total``; the first ``total % parts`` get one more."""
    base, extra = divmod(int(total), int(parts))
    return [base + (1 if r < extra else 0) for r in range(parts)]


@host_lru(256)
def rank_ranges(layout: str, total: int, n: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per rank, the ``(start, stop)`` ranges of the global sequence it holds (in local order)."""
    if layout == "contiguous":
        sizes = split_sizes(total, n)
        out, s = [], 0
        for size in sizes:
            out.append(((s, s + size),))
            s += size
        return tuple(out)
    if layout == "zigzag":
        sizes = split_sizes(total, 2 * n)
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        chunk = [(bounds[c], bounds[c + 1]) for c in range(2 * n)]
        return tuple((chunk[r], chunk[2 * n - 1 - r]) for r in range(n))
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def rank_sizes(layout: str, total: int, n: int) -> list[int]:
    """How many tokens each rank holds."""
    return [sum(b - a for a, b in ranges) for ranges in rank_ranges(layout, total, n)]


def total_from_sizes(layout: str, sizes) -> int:
    """The global length whose split is ``sizes``; ValueError when no split of this layout gives them."""
    sizes = [int(s) for s in sizes]
    total = sum(sizes)
    if rank_sizes(layout, total, len(sizes)) != sizes:
        raise ValueError(f"the local sequence lengths {sizes} across ranks are not the {layout!r} split of "
                         f"{total} tokens ({rank_sizes(layout, total, len(sizes))}); split tensors with "
                         "SequenceParallel.shard (the same layout on every rank)")
    return total


def layout_order(layout: str, total: int, n: int) -> torch.Tensor | None:
    """int64 ``[S]``: position ``i`` of the rank-order concatenation holds global token ``order[i]``;
    None when that is the identity (contiguous)."""
    if layout == "contiguous":
        return None
    return _order(layout, total, n)


@host_lru(256)
def _order(layout: str, total: int, n: int) -> torch.Tensor:
    idx = [torch.arange(a, b, dtype=torch.int64) for ranges in rank_ranges(layout, total, n) for a, b in ranges]
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)


def inverse_order(layout: str, total: int, n: int) -> torch.Tensor | None:
    """The inverse permutation of :func:`layout_order` (global token ``t`` sits at ``inv[t]``)."""
    if layout == "contiguous":
        return None
    return _inverse(layout, total, n)


@host_lru(256)
def _inverse(layout: str, total: int, n: int) -> torch.Tensor:
    return torch.argsort(_order(layout, total, n))
