"""Sequence parallelism: one attention call over a sequence split across ranks (see docs/parallel.md).

The layouts (contiguous, zigzag, uneven splits), differentiable ``shard``/``gather``, Ulysses (all-to-all
sequence <-> heads), ring attention and the hybrid (Ulysses inside, ring across) over any process group,
forward and backward, for every mask and backend; joint attention of a replicated text stream with a
sharded image stream (``SequenceParallel.joint_attention``). ``attnlib.parallel.conformance`` checks
it on local processes (``attnlib check --parallel N``).
"""
from .layout import Sharding, rank_ranges, rank_sizes, split_sizes
from .sequence import SequenceParallel

__all__ = ["SequenceParallel", "Sharding", "split_sizes", "rank_ranges", "rank_sizes"]
