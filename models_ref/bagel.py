"""Bagel's mixture-of-transformers packed attention on attnlib.

Bagel (ByteDance-Seed/Bagel, ``modeling/bagel/qwen2_navit.py``) runs one Qwen2 decoder in which every
attention layer has two experts: the *understanding* expert (``q_proj/k_proj/v_proj/o_proj``,
``q_norm/k_norm``) for text and ViT tokens, and the *generation* expert (``*_moe_gen``) for VAE latent
tokens. Sequences are packed along the token axis (THD); each has its own KV cache.

What this block pins, and the attnlib feature that makes it right on every backend:

* **Packed sequences with per-sequence caches** become one :class:`attnlib.BlockDiagonal` call whose
  key blocks are ``[cache_b, new_b]``: no cu_seqlens by hand, no ``.item()`` per layer.
* **Causal with a cache is bottom-right**: a prefill or one-token decode against a cache of ``L`` keys
  sees all ``L`` cached keys (``BlockDiagonal(causal=True)`` is bottom-right per block, on every
  backend -- SDPA's ``is_causal`` would be top-left).
* **CFG branches batched in one call**: the full, text-dropped and image-dropped branches have caches
  of different lengths; as separate blocks of one ``BlockDiagonal`` they cannot attend to each other.
* **Bagel's position rule** (:class:`BagelPositions`): text advances the 1-D RoPE position per token;
  all tokens of one image (its two marker tokens included) share one position id and the image
  advances it by one; a noised generation target shares one id and does not advance it.

Layout: ``x [T, hidden]``, ``positions [T]`` int, ``seqlens`` the new tokens per sequence, ``gen [T]``
bool (True = generation expert) or None.

The cache is a :class:`BagelKVCache` (per-sequence tensors, one per layer) or a step of an
``attnlib.kvcache.PagedKVCache`` shared by all layers (paged keys: the block's ``layer_idx`` picks the pools).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

import attnlib
from attnlib.kvcache import PagedStep
from attnlib.masks import BlockDiagonal
from attnlib.rope import RotaryEmbedding, apply_rotary

from . import RMSNorm

__all__ = ["BagelPositions", "BagelKVCache", "PackedAttentionMoT"]


@dataclass
class BagelPositions:
    """One sequence's RoPE cursor (Bagel's ``curr_rope``): hands out position ids by Bagel's rule."""

    next_id: int = 0

    def text(self, n: int) -> torch.Tensor:
        """``n`` text tokens: consecutive ids; the cursor advances by ``n``."""
        ids = torch.arange(self.next_id, self.next_id + n)
        self.next_id += n
        return ids

    def image(self, n_tokens: int) -> torch.Tensor:
        """A context image of ``n_tokens`` (markers included): one shared id; the cursor advances by 1."""
        ids = torch.full((n_tokens,), self.next_id, dtype=torch.long)
        self.next_id += 1
        return ids

    def noised_image(self, n_tokens: int) -> torch.Tensor:
        """The noised generation target (markers included): one shared id; the cursor does not move."""
        return torch.full((n_tokens,), self.next_id, dtype=torch.long)


@dataclass
class BagelKVCache:
    """Per-sequence keys and values of one attention layer: ``keys[b]`` is ``[L_b, Hkv, D]`` (None = empty).

    ``select(idx)`` gives a view on some sequences (e.g. only the branches that receive the text
    prompt); a forward through the view stores the new keys in this cache too.
    """

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    _parent: tuple | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, num_seqs: int) -> "BagelKVCache":
        return cls([None] * num_seqs, [None] * num_seqs)

    @classmethod
    def cat(cls, caches: Sequence["BagelKVCache"]) -> "BagelKVCache":
        """The sequences of several caches, in order, as a new cache (e.g. the CFG branches, batched)."""
        return cls([k for c in caches for k in c.keys], [v for c in caches for v in c.values])

    def select(self, idx: Sequence[int]) -> "BagelKVCache":
        """A view on sequences ``idx``: stores through it land here as well."""
        idx = [int(i) for i in idx]
        return BagelKVCache([self.keys[i] for i in idx], [self.values[i] for i in idx], (self, idx))

    def store(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Replace sequence ``b``'s keys/values (and the parent's, for a view)."""
        self.keys[b], self.values[b] = k, v
        if self._parent is not None:
            parent, idx = self._parent
            parent.store(idx[b], k, v)

    @property
    def num_seqs(self) -> int:
        return len(self.keys)

    @property
    def lengths(self) -> list[int]:
        return [0 if k is None else int(k.shape[0]) for k in self.keys]


class PackedAttentionMoT(nn.Module):
    """Bagel's ``PackedAttentionMoT`` inference path: two experts, GQA, QK norm, 1-D RoPE, packed caches.

    Parameter names are Bagel's: ``q_proj, k_proj, v_proj`` (bias), ``o_proj`` (no bias), ``q_norm,
    k_norm`` and the same with ``_moe_gen``.
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, num_key_value_heads: int,
                 head_dim: int | None = None, rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6,
                 qk_norm: bool = True, backend: str | None = None, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        head_dim = head_dim or hidden_size // num_attention_heads
        self.num_heads, self.num_kv_heads, self.head_dim = num_attention_heads, num_key_value_heads, head_dim
        q_dim, kv_dim = num_attention_heads * head_dim, num_key_value_heads * head_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(hidden_size, q_dim, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(hidden_size, kv_dim, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(hidden_size, kv_dim, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(q_dim, hidden_size, bias=False))
            norm = (lambda: RMSNorm(head_dim, rms_norm_eps)) if qk_norm else nn.Identity
            setattr(self, f"q_norm{suffix}", norm())
            setattr(self, f"k_norm{suffix}", norm())
        self.rotary = RotaryEmbedding(head_dim, rope_theta)
        self.attn = attnlib.Attention(num_attention_heads, head_dim, num_key_value_heads, backend=backend)

    # -- projections ------------------------------------------------------------------------------
    def _expert_qkv(self, x, suffix: str):
        q = getattr(self, f"q_norm{suffix}")(getattr(self, f"q_proj{suffix}")(x).unflatten(-1, (-1, self.head_dim)))
        k = getattr(self, f"k_norm{suffix}")(getattr(self, f"k_proj{suffix}")(x).unflatten(-1, (-1, self.head_dim)))
        v = getattr(self, f"v_proj{suffix}")(x).unflatten(-1, (-1, self.head_dim))
        return q, k, v

    def _qkv(self, x, gen):
        if gen is None:
            return self._expert_qkv(x, "")
        und = ~gen
        q = x.new_empty(x.shape[0], self.num_heads, self.head_dim)
        k = x.new_empty(x.shape[0], self.num_kv_heads, self.head_dim)
        v = torch.empty_like(k)
        for sel, suffix in ((und, ""), (gen, "_moe_gen")):
            q[sel], k[sel], v[sel] = self._expert_qkv(x[sel], suffix)
        return q, k, v

    def _out(self, o, gen):
        if gen is None:
            return self.o_proj(o)
        out = o.new_empty(o.shape[0], self.o_proj.out_features)
        out[~gen] = self.o_proj(o[~gen])
        out[gen] = self.o_proj_moe_gen(o[gen])
        return out

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, seqlens: Sequence[int], positions: torch.Tensor,
                cache: BagelKVCache | None = None, *, causal: bool, gen: torch.Tensor | None = None,
                update_cache: bool = True, parallel=None) -> torch.Tensor:
        """Attend the packed new tokens of ``len(seqlens)`` sequences to their caches and themselves.

        Args:
            x: ``[T, hidden]`` new tokens, sequence after sequence (``T == sum(seqlens)``).
            seqlens: new tokens per sequence (Python ints).
            positions: ``[T]`` RoPE position ids (see :class:`BagelPositions`).
            cache: per-sequence past keys/values (``cache.num_seqs == len(seqlens)``), a step of a
                ``PagedKVCache`` over the same sequences (``step.q_seqlens == seqlens``; this layer's pools
                are ``layer_idx``'s), or None.
            causal: True for text (prefill and decode, bottom-right against the cache), False for an
                image block (ViT prefill, VAE context, the noised generation target).
            gen: ``[T]`` bool, True where the generation expert serves the token (VAE tokens); None
                means the understanding expert for every token.
            update_cache: append the new keys/values to ``cache`` (False for denoising steps).
            parallel: an ``attnlib.parallel.SequenceParallel``. Inputs, cache and result stay whole on every
                rank; each rank projects its shard of the new tokens, the new keys/values are all-gathered
                once (the cache needs them whole anyway), and the attention runs sequence-parallel over
                the packed ``[cache_b, new_b]`` keys. Equal to one process.

        Returns ``[T, hidden]``.
        """
        seqlens = [int(n) for n in seqlens]
        if x.dim() != 2 or x.shape[0] != sum(seqlens):
            raise ValueError(f"x must be packed [T, hidden] with T == sum(seqlens) = {sum(seqlens)}, "
                             f"got {tuple(x.shape)}")
        if positions.shape != (x.shape[0],):
            raise ValueError(f"positions must be [T={x.shape[0]}], got {tuple(positions.shape)}")
        if gen is not None and (gen.dtype != torch.bool or gen.shape != (x.shape[0],)):
            raise ValueError(f"gen must be a bool [T={x.shape[0]}] expert selector, got {gen.dtype} {tuple(gen.shape)}")
        paged = isinstance(cache, PagedStep)
        if paged:
            if tuple(seqlens) != cache.q_seqlens:
                raise ValueError(f"the paged step holds new tokens {list(cache.q_seqlens)} per sequence but seqlens is "
                                 f"{seqlens}")
            if not update_cache or parallel is not None:
                raise NotImplementedError("a paged cache step always stores the new keys (update_cache=True) and "
                                          "runs on one process (parallel=None)")
        elif cache is not None and cache.num_seqs != len(seqlens):
            raise ValueError(f"cache holds {cache.num_seqs} sequences but seqlens names {len(seqlens)}")

        if gen is not None:
            gen = gen.to(x.device)
        total = x.shape[0]
        positions = positions.to(x.device)
        if parallel is not None:
            x, positions = parallel.shard(x, 0), parallel.shard(positions, 0)
            gen = None if gen is None else parallel.shard(gen, 0)
        q, k, v = self._qkv(x, gen)
        cos, sin = self.rotary.cos_sin(positions)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if parallel is not None:      # the whole new keys/values: for the cache and the key sequence
            k = parallel.gather(k, 0, total=total, sum_gradients=True)
            v = parallel.gather(v, 0, total=total, sum_gradients=True)

        if paged:
            k_pool, v_pool = cache.update(self.layer_idx, k, v)
            o = self.attn(q, k_pool, v_pool, cache.mask_for(causal=causal), block_table=cache.block_table)
            return self._out(o.flatten(1), gen)
        if cache is None:
            keys, values, kv_lens = k, v, seqlens
        else:
            new_k = torch.split(k, seqlens)
            new_v = torch.split(v, seqlens)
            ks, vs = [], []
            for b in range(len(seqlens)):
                ks.append(new_k[b] if cache.keys[b] is None else torch.cat([cache.keys[b], new_k[b]]))
                vs.append(new_v[b] if cache.values[b] is None else torch.cat([cache.values[b], new_v[b]]))
            keys, values = torch.cat(ks), torch.cat(vs)
            kv_lens = [t.shape[0] for t in ks]
            if update_cache:
                for b in range(len(seqlens)):
                    cache.store(b, ks[b], vs[b])
        mask = BlockDiagonal(seqlens, kv_lens, causal=causal)
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        if parallel is not None:
            keys, values = parallel.shard(keys, 0), parallel.shard(values, 0)
        o = self.attn(q, keys, values, mask, parallel=parallel)
        out = self._out(o.flatten(1), gen)
        return out if parallel is None else parallel.gather(out, 0, total=total)
