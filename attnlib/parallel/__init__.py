"""Sequence parallelism: one attention call over a sequence split across ranks (see docs/parallel.md).

Built: the layouts (contiguous, zigzag, uneven splits), differentiable ``shard``/``gather``, Ulysses
(all-to-all sequence <-> heads), ring attention, and the hybrid (Ulysses inside, ring across), forward
and backward, for every mask and backend. Not built yet: the hybrid over a non-default process group
(``NotImplementedError``).
"""
from .layout import rank_ranges, rank_sizes, split_sizes
from .sequence import SequenceParallel

__all__ = ["SequenceParallel", "split_sizes", "rank_ranges", "rank_sizes"]
