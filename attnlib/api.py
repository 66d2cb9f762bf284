"""The front door: ``attention()`` and the ``Attention`` module."""
from __future__ import annotations

import torch
from torch import nn

from .inputs import default_scale, validate_call
from .lse_gradient import with_lse_gradient
from .masks import BlockDiagonal, Causal
from .registry import canonical_name, select_backend


def attention(q, k, v, mask=None, *, scale=None, backend=None, return_lse: bool = False, parallel=None):
    """Scaled dot-product attention on the selected backend.

    Args:
        q: ``[B, Sq, Hq, D]`` (BSHD) or packed ``[Tq, Hq, D]`` (THD, with a ``BlockDiagonal`` mask).
        k: ``[B, Sk, Hkv, D]`` or ``[Tk, Hkv, D]``; ``Hq % Hkv == 0`` (GQA: query head ``h`` reads kv
            head ``h // (Hq // Hkv)``).
        v: ``[B, Sk, Hkv, Dv]`` or ``[Tk, Hkv, Dv]``.
        mask: ``None`` (full attention) or an ``attnlib.masks`` object: ``Causal``, ``BlockDiagonal``,
            ``KeyPadding``, ``DenseMask``.
        scale: multiplies ``q @ k^T``; defaults to ``D ** -0.5``.
        backend: a backend name (or alias); otherwise ``use_backend`` / ``$DIFFUSION_ATTENTION_BACKEND``
            / auto.
        return_lse: also return the log-sum-exp of the scaled scores, float32 ``[B, Hq, Sq]`` (dense)
            or ``[Hq, Tq]`` (packed).
        parallel: an ``attnlib.parallel.SequenceParallel``: q, k, v are this rank's sequence shards, the
            mask describes the whole sequence, and out (and lse) are this rank's shards (docs/parallel.md).

    Returns:
        ``out`` in q's layout and dtype with last dim ``Dv`` (and ``lse`` if asked). A query row with
        no visible key returns 0 and LSE ``-inf``.
    """
    if parallel is not None:
        from .parallel import SequenceParallel

        if not isinstance(parallel, SequenceParallel):
            raise TypeError(f"parallel must be an attnlib.parallel.SequenceParallel, got {type(parallel).__name__}")
        return parallel.attention(q, k, v, mask, scale=scale, backend=backend, return_lse=return_lse)
    call = validate_call(q, k, v, mask, scale, return_lse)
    chosen = select_backend(call, backend)
    out, lse = chosen.forward(call)
    if lse is not None and call.requires_grad and not chosen.lse_has_gradient:
        # the kernel's LSE carries no gradient: attach the exact one (two out-only calls, in backward)
        lse = with_lse_gradient(call.q, call.k, lse, call.mask, call.scale, chosen.name)
    if call.squeezed_batch:
        out = out.unsqueeze(0)
        lse = lse.unsqueeze(0) if lse is not None else None
    return (out, lse) if return_lse else out


class Attention(nn.Module):
    """Attention for model code: fixed head counts, a default causal mask, a pinned backend.

    ``forward(q, k, v, mask=None, *, return_lse=False)`` takes BSHD or THD tensors like
    :func:`attention`. With ``causal=True``, ``mask=None`` means ``Causal()`` (bottom-right) and a
    ``BlockDiagonal`` mask becomes causal per block.
    """

    def __init__(self, num_heads: int, head_size: int, num_kv_heads: int | None = None, scale: float | None = None,
                 causal: bool = False, backend: str | None = None):
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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, *, return_lse: bool = False,
                parallel=None):
        if q.dim() >= 2 and (q.shape[-2] != self.num_heads or q.shape[-1] != self.head_size):
            raise ValueError(f"q must have {self.num_heads} heads of size {self.head_size} (Attention config), "
                             f"got shape {tuple(q.shape)}")
        if k.dim() >= 2 and k.shape[-2] != self.num_kv_heads:
            raise ValueError(f"k must have num_kv_heads={self.num_kv_heads} heads, got shape {tuple(k.shape)}")
        if self.causal:
            mask = _make_causal(mask)
        return attention(q, k, v, mask, scale=self.scale, backend=self.backend, return_lse=return_lse,
                         parallel=parallel)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_size={self.head_size}, num_kv_heads={self.num_kv_heads}, "
                f"scale={self.scale:.4g}, causal={self.causal}, backend={self.backend or 'auto'}")


def _make_causal(mask):
    if mask is None:
        return Causal()
    if isinstance(mask, Causal):
        return mask
    if isinstance(mask, BlockDiagonal):
        return mask.as_causal()
    raise ValueError(f"Attention(causal=True) cannot combine with a {type(mask).__name__} mask; build the combined "
                     "mask yourself (BlockDiagonal(..., causal=True) for padded/packed sequences, or a DenseMask)")
