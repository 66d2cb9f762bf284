"""The front door: ``attention()`` and the ``Attention`` module."""
from __future__ import annotations

import torch
from torch import nn

from . import dispatch
from .inputs import default_scale
from .masks import Causal
from .registry import canonical_name


def attention(q, k, v, mask=None, *, scale=None, softcap=None, alibi_slopes=None, sinks=None, block_table=None,
              backend=None, return_lse: bool = False, parallel=None):
    """Scaled dot-product attention on the selected backend.

    Args:
        q: ``[B, Sq, Hq, D]`` (BSHD) or packed ``[Tq, Hq, D]`` (THD, with a ``BlockDiagonal`` mask).
        k: ``[B, Sk, Hkv, D]`` or ``[Tk, Hkv, D]``; ``Hq % Hkv == 0`` (GQA: query head ``h`` reads kv
            head ``h // (Hq // Hkv)``). With ``block_table``: a page pool ``[num_pages, page_size, Hkv, D]``.
        v: ``[B, Sk, Hkv, Dv]`` or ``[Tk, Hkv, Dv]`` (or the value page pool).
        mask: ``None`` (full attention) or an ``attnlib.masks`` object: ``Causal``, ``BlockDiagonal``,
            ``KeyPadding``, ``DenseMask``, ``BlockSparse``.
        scale: multiplies ``q @ k^T``; defaults to ``D ** -0.5``.
        softcap: ``c > 0``: scores become ``c * tanh(s / c)`` (Gemma 2/3).
        alibi_slopes: float32 ``[Hq]`` or ``[B, Hq]``: scores minus ``slope * |i + off - j|`` (``off``: the
            diagonal offset of the query's block, ``Sk - Sq`` bottom-right).
        sinks: float ``[Hq]``: one extra logit per head in every row's softmax, with no value (gpt-oss);
            the LSE includes it; differentiable.
        block_table: int32 ``[R, max_pages]``: ``k``/``v`` are page pools, ``q`` is packed ``[Tq, Hq, D]`` and
            ``mask`` a ``BlockDiagonal`` over the ``R`` requests (paged KV caches).
        backend: a backend name (or alias); otherwise ``use_backend`` / ``$DIFFUSION_ATTENTION_BACKEND``
            / auto.
        return_lse: also return the log-sum-exp of the (modified) scores, float32 ``[B, Hq, Sq]`` (dense)
            or ``[Hq, Tq]`` (packed).
        parallel: an ``attnlib.parallel.SequenceParallel``: q, k, v are this rank's sequence shards, the
            mask describes the whole sequence, and out (and lse) are this rank's shards (docs/parallel.md).

    Returns:
        ``out`` in q's layout and dtype with last dim ``Dv`` (and ``lse`` if asked). A query row with
        no visible key returns 0 and LSE ``-inf`` (with sinks: the sink).
    """
    if parallel is not None:
        from .parallel import SequenceParallel

        if not isinstance(parallel, SequenceParallel):
            raise TypeError(f"parallel must be an attnlib.parallel.SequenceParallel, got {type(parallel).__name__}")
        if block_table is not None:
            raise ValueError("block_table (paged KV) does not combine with parallel= (sequence parallelism shards "
                             "contiguous sequences)")
        return parallel.attention(q, k, v, mask, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                                  sinks=sinks, backend=backend, return_lse=return_lse)
    out, lse = dispatch.attend(q, k, v, mask, scale, return_lse, softcap, alibi_slopes, sinks, block_table, backend)
    return (out, lse) if return_lse else out


class Attention(nn.Module):
    """Attention for model code: fixed head counts, a default causal mask, a pinned backend.

    ``forward(q, k, v, mask=None, *, return_lse=False, block_table=None)`` takes BSHD or THD tensors (or page
    pools with ``block_table``) like :func:`attention`. With ``causal=True``, ``mask=None`` means ``Causal()``
    (bottom-right), a ``BlockDiagonal`` mask becomes causal per block and ``KeyPadding(valid)`` becomes
    ``KeyPadding(valid, causal=True)``. ``softcap``, ``alibi_slopes`` and ``sinks`` are the score modifiers
    of :func:`attention`; ``sinks=True`` makes a learnable ``[num_heads]`` parameter (initialized to 0).
    """

    def __init__(self, num_heads: int, head_size: int, num_kv_heads: int | None = None, scale: float | None = None,
                 causal: bool = False, backend: str | None = None, *, softcap: float | None = None,
                 alibi_slopes: torch.Tensor | None = None, sinks: bool | torch.Tensor | None = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, val in (("num_heads", num_heads), ("head_size", head_size), ("num_kv_heads", num_kv_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads
        self.scale = default_scale(head_size) if scale is None else float(scale)
        self.causal = bool(causal)
        self.backend = None if backend is None else canonical_name(backend)
        self.softcap = softcap
        if alibi_slopes is not None:
            self.register_buffer("alibi_slopes", torch.as_tensor(alibi_slopes, dtype=torch.float32), persistent=False)
        else:
            self.alibi_slopes = None
        if sinks is True:           # learnable, one logit per head (gpt-oss initializes them at 0)
            self.sinks = nn.Parameter(torch.zeros(num_heads))
        elif sinks is None or sinks is False:
            self.sinks = None
        else:
            self.sinks = nn.Parameter(torch.as_tensor(sinks, dtype=torch.float32).clone())

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, *, return_lse: bool = False,
                parallel=None, block_table=None):
        if q.dim() >= 2 and (q.shape[-2] != self.num_heads or q.shape[-1] != self.head_size):
            raise ValueError(f"q must have {self.num_heads} heads of size {self.head_size} (Attention config), "
                             f"got shape {tuple(q.shape)}")
        if k.dim() >= 2 and k.shape[-2] != self.num_kv_heads:
            raise ValueError(f"k must have num_kv_heads={self.num_kv_heads} heads, got shape {tuple(k.shape)}")
        if self.causal:
            mask = Causal() if mask is None else mask.causal_version()
        return attention(q, k, v, mask, scale=self.scale, softcap=self.softcap, alibi_slopes=self.alibi_slopes,
                         sinks=self.sinks, backend=self.backend, return_lse=return_lse, parallel=parallel,
                         block_table=block_table)

    def extra_repr(self) -> str:
        mods = (f", softcap={self.softcap:g}" if self.softcap is not None else "") + \
            (", alibi" if self.alibi_slopes is not None else "") + (", sinks" if self.sinks is not None else "")
        return (f"num_heads={self.num_heads}, head_size={self.head_size}, num_kv_heads={self.num_kv_heads}, "
                f"scale={self.scale:.4g}, causal={self.causal}, backend={self.backend or 'auto'}{mods}")
