"""Where each token of a sequence lives when it is split over ``n`` ranks.

A layout maps a sequence of ``S`` tokens to ``n`` ranks; rank ``r`` holds a list of contiguous
``(start, stop)`` ranges of the global sequence, concatenated in that order. Uneven lengths: the first
``S % n`` pieces get one token more.

* ``"contiguous"``: rank ``r`` holds one run of ``S // n`` (or ``S // n + 1``) tokens, in rank order.
* ``"zigzag"``: the sequence is cut into ``2n`` chunks; rank ``r`` holds chunks ``r`` and ``2n - 1 - r``
  (for causal load balance under ring attention; Ulysses computes on the whole sequence anyway).
"""
from __future__ import annotations

from dataclasses import dataclass

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


# -- a sequence split over ranks ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Sharding:
    """Which ``(start, stop)`` ranges of a ``total``-token sequence each rank holds, in local order.

    Every token sits on exactly one rank. The attention strategies read only this: ``rank_ranges`` of a
    layout is one sharding, a joint text + image sequence (:func:`joint_sharding`) another.
    """

    total: int
    ranges: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def sizes(self) -> list[int]:
        return [sum(b - a for a, b in r) for r in self.ranges]

    def order(self) -> torch.Tensor | None:
        """int64 ``[total]``: the rank-order concatenation of the shards holds global token ``order[i]`` at
        ``i``; None when that is the identity."""
        flat = [x for r in self.ranges for x in r if x[1] > x[0]]
        if all(a == (flat[i - 1][1] if i else 0) for i, (a, _) in enumerate(flat)):
            return None
        return _sharding_order(self)

    def inverse(self) -> torch.Tensor | None:
        """The inverse permutation of :meth:`order` (global token ``t`` sits at ``inverse[t]``)."""
        return None if self.order() is None else _sharding_inverse(self)


@host_lru(256)
def _sharding_order(sh: Sharding) -> torch.Tensor:
    idx = [torch.arange(a, b, dtype=torch.int64) for r in sh.ranges for a, b in r]
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)


@host_lru(256)
def _sharding_inverse(sh: Sharding) -> torch.Tensor:
    return torch.argsort(_sharding_order(sh))


@host_lru(256)
def layout_sharding(layout: str, total: int, n: int) -> Sharding:
    """The sharding :meth:`SequenceParallel.shard` makes of a ``total``-token sequence over ``n`` ranks."""
    return Sharding(int(total), rank_ranges(layout, int(total), n))


JOINT_STRATEGIES = ("front", "rear")


@host_lru(256)
def joint_sharding(layout: str, text_len: int, image_len: int, n: int, strategy: str) -> Sharding:
    """A joint sequence of ``text_len`` replicated tokens and ``image_len`` sharded ones, text in front
    (``"front"``: ``[text, image]``) or behind (``"rear"``: ``[image, text]``).

    Rank ``r`` holds the ``r``-th contiguous piece of the text and its ``layout`` shard of the image, in
    joint order (front: text piece first)."""
    if strategy not in JOINT_STRATEGIES:
        raise ValueError(f"joint_strategy must be one of {JOINT_STRATEGIES}, got {strategy!r}")
    text = rank_ranges("contiguous", text_len, n)
    image = rank_ranges(layout, image_len, n)
    t_off, i_off = (0, text_len) if strategy == "front" else (image_len, 0)
    out = []
    for r in range(n):
        t = tuple((a + t_off, b + t_off) for a, b in text[r])
        i = tuple((a + i_off, b + i_off) for a, b in image[r])
        out.append(_merged(t + i if strategy == "front" else i + t))
    return Sharding(text_len + image_len, tuple(out))


def _merged(ranges) -> tuple[tuple[int, int], ...]:
    """Empty ranges dropped and adjacent ones joined (at least one range is kept)."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out) if out else ((0, 0),)
