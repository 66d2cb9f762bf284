"""Qwen3-Omni blocks on attnlib: the talker's code predictor, the thinker's attention, the hand-off.

* :class:`CodePredictor` -- transformers' ``Qwen3OmniMoeTalkerCodePredictorModel`` (same parameter
  names, strict ``load_state_dict``): a small Qwen3 decoder (GQA, per-head QK RMSNorm, rotate-half
  RoPE) run once per talker step over ``[talker hidden, code 0, code 1, ...]``. With a
  :class:`KVCache` it decodes one code group at a time; the cache offset is handled by attnlib's
  bottom-right :class:`attnlib.Causal`, so step-by-step decode equals the full forward on every backend.
* :class:`ThinkerAttention` -- transformers' ``Qwen3OmniMoeThinkerTextAttention``: GQA, QK norm and
  interleaved multimodal RoPE from :class:`attnlib.rope.MRotaryEmbedding`.
* :class:`TalkerConditionStream` -- the thinker->talker hand-off when thinker output arrives in chunks.

Tensors are BSHD inside (``[B, S, heads, head_dim]``); hidden states are ``[B, S, hidden]``.

Caches: a :class:`KVCache` (contiguous, grown per layer) or a step of an ``attnlib.kvcache.PagedKVCache``
(paged; each layer's ``layer_idx`` picks its pools). With a paged step the ``B * S`` tokens are the step's new
tokens, sequence after sequence (``[1, T]`` packed, or ``[B, S]`` when every sequence brings ``S``): the
sequences keep their own lengths, so no padding mask is needed.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import attnlib
from attnlib.kvcache import PagedStep
from attnlib.masks import Causal, KeyPadding
from attnlib.rope import RotaryEmbedding, apply_rotary

from . import RMSNorm

__all__ = ["KVCache", "CodePredictorAttention", "CodePredictorDecoderLayer", "CodePredictor", "ThinkerAttention",
           "TalkerConditionStream", "WAIT", "sync_talker_conditions"]

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class KVCache:
    """Per-layer keys/values ``[B, L, Hkv, D]``, grown along the sequence axis."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def length(self, layer: int = 0) -> int:
        k = self.keys.get(layer)
        return 0 if k is None else int(k.shape[1])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v [B, S, Hkv, D]``; return all keys/values of the layer."""
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def _padded_causal(attn, q, k, v, key_valid: torch.Tensor, window: int | None):
    """Padded causal attention: ``KeyPadding(key_valid, causal=True)`` with padded query rows set to 0.

    ``key_valid [B, Sk]`` marks real tokens over cache + new keys (any pattern: left, right, holes); the
    new tokens are the last ``Sq`` keys, so a real query sees the real keys up to its own position
    (bottom-right causal over the padded key axis, then the validity). Padded query rows return 0. No
    host read: the lengths never leave the device.
    """
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    if key_valid.dtype != torch.bool or key_valid.shape != (b, sk):
        raise ValueError(f"attention_mask must be bool [B={b}, Sk={sk}] (True = real token, over cache + new "
                         f"tokens), got {key_valid.dtype} {tuple(key_valid.shape)}")
    out = attn(q, k, v, KeyPadding(key_valid, causal=True, window=window))
    return out.masked_fill(~key_valid[:, sk - sq:, None, None], 0.0)


def _paged(attn, q, k, v, step: PagedStep, layer: int, window: int | None, key_valid):
    """Attention of BSHD ``q, k, v`` (the step's new tokens, in its order) over the paged cache."""
    if key_valid is not None:
        raise ValueError("attention_mask with a paged cache step: the step's per-sequence lengths replace the padding "
                         "mask; pass only the real tokens")
    b, s = q.shape[:2]
    if b * s != step.num_tokens:
        raise ValueError(f"the paged step holds {step.num_tokens} new tokens ({list(step.q_seqlens)} per sequence) but "
                         f"hidden_states has {b} x {s}")
    k_pool, v_pool = step.update(layer, k.flatten(0, 1), v.flatten(0, 1))
    out = attn(q.flatten(0, 1), k_pool, v_pool, step.mask_for(causal=True, window=window), block_table=step.block_table)
    return out.unflatten(0, (b, s))


class _QKNormAttention(nn.Module):
    """q/k/v/o projections, per-head RMSNorm on q and k, rotary, attnlib attention (Qwen3 layout)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool, eps: float,
                 backend: str | None):
        super().__init__()
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)
        self.attn = attnlib.Attention(num_heads, head_dim, num_kv_heads, backend=backend)

    def _attend(self, hidden_states, cos, sin, cache: KVCache | None, layer: int, window: int | None,
                key_valid: torch.Tensor | None):
        split = (-1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).unflatten(-1, split))
        k = self.k_norm(self.k_proj(hidden_states).unflatten(-1, split))
        v = self.v_proj(hidden_states).unflatten(-1, split)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if isinstance(cache, PagedStep):
            return self.o_proj(_paged(self.attn, q, k, v, cache, layer, window, key_valid).flatten(2))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if key_valid is None:
            out = self.attn(q, k, v, Causal(window=window))
        else:
            out = _padded_causal(self.attn, q, k, v, key_valid, window)
        return self.o_proj(out.flatten(2))


# ---------------------------------------------------------------------------------------------------
# code predictor
# ---------------------------------------------------------------------------------------------------
class CodePredictorAttention(_QKNormAttention):
    """``Qwen3OmniMoeTalkerCodePredictorAttention``: causal self-attention with a KV cache."""

    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, bias=False, eps=1e-6, layer_idx: int = 0,
                 sliding_window: int | None = None, backend=None):
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, bias, eps, backend)
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window

    def forward(self, hidden_states, cos, sin, cache: KVCache | None = None):
        return self._attend(hidden_states, cos, sin, cache, self.layer_idx, self.sliding_window, None)


class _GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = _ACTIVATIONS[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class CodePredictorDecoderLayer(nn.Module):
    def __init__(self, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim, eps, bias, layer_idx,
                 sliding_window=None, act="silu", backend=None):
        super().__init__()
        self.self_attn = CodePredictorAttention(hidden_size, num_heads, num_kv_heads, head_dim, bias, eps, layer_idx,
                                                sliding_window, backend)
        self.mlp = _GatedMLP(hidden_size, intermediate_size, act)
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class CodePredictor(nn.Module):
    """transformers' ``Qwen3OmniMoeTalkerCodePredictorModel`` on attnlib (strict state_dict compatible).

    ``forward(inputs_embeds [B, S, hidden], cache=None, position_ids=None) -> [B, S, hidden]`` (the
    final-normed hidden states, transformers' ``last_hidden_state``). Positions default to
    ``cache.length() + arange(S)`` (with a paged step: each new token's position in its sequence). Build it
    from a transformers config with :meth:`from_config`.
    """

    def __init__(self, hidden_size: int = 1024, intermediate_size: int = 3072, num_hidden_layers: int = 5,
                 num_attention_heads: int = 16, num_key_value_heads: int = 8, head_dim: int | None = 128,
                 rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0, attention_bias: bool = False,
                 vocab_size: int = 2048, num_code_groups: int = 32, hidden_act: str = "silu",
                 layer_types: Sequence[str] | None = None, sliding_window: int | None = None,
                 backend: str | None = None):
        super().__init__()
        head_dim = head_dim or hidden_size // num_attention_heads
        layer_types = list(layer_types or ["full_attention"] * num_hidden_layers)
        if len(layer_types) != num_hidden_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries for {num_hidden_layers} layers")
        self.layers = nn.ModuleList([
            CodePredictorDecoderLayer(hidden_size, intermediate_size, num_attention_heads, num_key_value_heads,
                                      head_dim, rms_norm_eps, attention_bias, i,
                                      sliding_window if layer_types[i] == "sliding_attention" else None,
                                      hidden_act, backend)
            for i in range(num_hidden_layers)])
        self.norm = RMSNorm(hidden_size, rms_norm_eps)
        self.codec_embedding = nn.ModuleList([nn.Embedding(vocab_size, hidden_size)
                                              for _ in range(num_code_groups - 1)])
        self.rotary = RotaryEmbedding(head_dim, rope_theta)

    @classmethod
    def from_config(cls, config, backend: str | None = None) -> "CodePredictor":
        """From a transformers ``Qwen3OmniMoeTalkerCodePredictorConfig`` (or any object with its fields)."""
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"rope_type {rope.get('rope_type')!r}: only the default rotary is supported")
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads, getattr(config, "head_dim", None), config.rms_norm_eps,
                   rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)), config.attention_bias,
                   config.vocab_size, config.num_code_groups, config.hidden_act,
                   getattr(config, "layer_types", None), getattr(config, "sliding_window", None), backend)

    def forward(self, inputs_embeds: torch.Tensor, cache: KVCache | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be [B, S, hidden], got {tuple(inputs_embeds.shape)}")
        if position_ids is None and isinstance(cache, PagedStep):
            position_ids = cache.positions(inputs_embeds.device).view(inputs_embeds.shape[:2])
        elif position_ids is None:
            past = cache.length() if cache is not None else 0
            position_ids = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
        cos, sin = self.rotary.cos_sin(position_ids)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------
# thinker attention
# ---------------------------------------------------------------------------------------------------
class ThinkerAttention(_QKNormAttention):
    """transformers' ``Qwen3OmniMoeThinkerTextAttention``: GQA, QK norm, interleaved mRoPE.

    ``forward(hidden_states [B, S, hidden], position_embeddings, attention_mask=None, cache=None)``:

    * ``position_embeddings``: ``(cos, sin)`` float ``[B, S, head_dim // 2]`` from :meth:`rope_tables`
      (``attnlib.rope.MRotaryEmbedding(interleaved=True)`` over ``position_ids [3, B, S]``);
    * ``attention_mask``: None (causal) or bool ``[B, Sk]`` real-token mask over cache + new tokens
      (padding, any pattern): ``KeyPadding(mask, causal=True)``, with padded query rows returning 0.
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, num_key_value_heads: int,
                 head_dim: int | None = None, rms_norm_eps: float = 1e-6, attention_bias: bool = False,
                 rope_theta: float = 1_000_000.0, mrope_section: Sequence[int] = (24, 20, 20),
                 mrope_interleaved: bool = True, layer_idx: int = 0, backend: str | None = None):
        head_dim = head_dim or hidden_size // num_attention_heads
        super().__init__(hidden_size, num_attention_heads, num_key_value_heads, head_dim, attention_bias, rms_norm_eps,
                         backend)
        self.layer_idx = layer_idx
        self.rope_theta = rope_theta
        self.mrope_section = tuple(mrope_section)
        self.mrope_interleaved = mrope_interleaved
        self._rope = None

    @classmethod
    def from_config(cls, config, layer_idx: int = 0, backend: str | None = None) -> "ThinkerAttention":
        """From a transformers ``Qwen3OmniMoeTextConfig``."""
        rope = getattr(config, "rope_parameters", None) or {}
        return cls(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                   getattr(config, "head_dim", None), config.rms_norm_eps, config.attention_bias,
                   rope.get("rope_theta", 1_000_000.0), rope.get("mrope_section", (24, 20, 20)),
                   rope.get("mrope_interleaved", True), layer_idx, backend)

    def rope_tables(self, position_ids: torch.Tensor):
        """``(cos, sin) [B, S, head_dim // 2]`` for ``position_ids [3, B, S]`` (``[1|B, S]`` = text only)."""
        if self._rope is None:
            from attnlib.rope import MRotaryEmbedding  # the mRoPE table lives in attnlib.rope
            self._rope = MRotaryEmbedding(self.head_dim, self.rope_theta, self.mrope_section, self.mrope_interleaved)
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        return self._rope.cos_sin(position_ids)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        cos, sin = position_embeddings
        return self._attend(hidden_states, cos, sin, cache, self.layer_idx, None, attention_mask)


# ---------------------------------------------------------------------------------------------------
# thinker -> talker condition stream
# ---------------------------------------------------------------------------------------------------
class _Wait:
    """The condition of this talker step has not arrived; nothing advanced."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self):
        return "WAIT"

    def __bool__(self):
        return False


WAIT = _Wait()


class TalkerConditionStream:
    """The talker's per-step text condition, fed by thinker output that arrives in arbitrary chunks.

    The synchronous rule (what the talker would see with the whole thinker answer in hand), for the
    assistant text tokens ``t0 .. t(n-1)`` (everything before ``<|im_end|>``) with their projected
    embeddings ``e0 .. e(n-1)``::

        conditions = [e0, e1, ..., e(n-1), tts_eos, tts_pad, tts_pad, ...]

    :meth:`prefill` returns ``conditions[0]`` (the first assistant token is consumed by talker
    prefill); the ``i``-th call of :meth:`next` that does not wait returns ``conditions[i + 1]``.
    ``<|im_end|>`` is never a condition: it ends the text (so does :meth:`finish`, for a thinker that
    stops without it); tokens after it are ignored. A call whose condition depends on output that has
    not arrived returns :data:`WAIT` and advances nothing.
    """

    def __init__(self, *, im_end_id: int, tts_eos: torch.Tensor, tts_pad: torch.Tensor):
        self.im_end_id = int(im_end_id)
        self.tts_eos = tts_eos
        self.tts_pad = tts_pad
        self._embeds: list[torch.Tensor] = []
        self._ended = False
        self._prefilled = False
        self._step = 0

    @property
    def ended(self) -> bool:
        """The text is complete (``<|im_end|>`` arrived or :meth:`finish` was called)."""
        return self._ended

    @property
    def steps_taken(self) -> int:
        """Talker decode steps that received a condition."""
        return self._step

    def push(self, token_ids, embeds: torch.Tensor) -> None:
        """A chunk of thinker output: ``token_ids`` (n ints) and their projected embeddings ``[n, d]``."""
        ids = [int(t) for t in (token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]
        if embeds.dim() != 2 or embeds.shape[0] != len(ids):
            raise ValueError(f"embeds must be [n={len(ids)}, d] for the {len(ids)} token ids, "
                             f"got {tuple(embeds.shape)}")
        for i, t in enumerate(ids):
            if self._ended:
                return
            if t == self.im_end_id:
                self._ended = True
            else:
                self._embeds.append(embeds[i])

    def finish(self) -> None:
        """The thinker stopped (with or without ``<|im_end|>``): the text is complete."""
        self._ended = True

    def _condition(self, j: int):
        if j < len(self._embeds):
            return self._embeds[j]
        if not self._ended:
            return WAIT
        return self.tts_eos if j == len(self._embeds) else self.tts_pad

    def prefill(self):
        """The condition consumed by talker prefill (the first assistant token), or WAIT."""
        if self._prefilled:
            raise RuntimeError("prefill() was already consumed; call next() for the decode steps")
        c = self._condition(0)
        if c is not WAIT:
            self._prefilled = True
        return c

    def next(self):
        """The next decode step's condition, or WAIT (the step counter does not move)."""
        if not self._prefilled:
            raise RuntimeError("call prefill() first: the talker prefill consumes the first assistant token")
        c = self._condition(self._step + 1)
        if c is not WAIT:
            self._step += 1
        return c


def sync_talker_conditions(token_ids, embeds: torch.Tensor, num_steps: int, *, im_end_id: int,
                           tts_eos: torch.Tensor, tts_pad: torch.Tensor):
    """The synchronous path: ``(prefill_condition, [step conditions] * num_steps)`` from the whole output."""
    ids = [int(t) for t in (token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]
    n = ids.index(im_end_id) if im_end_id in ids else len(ids)
    conditions = [embeds[i] for i in range(n)] + [tts_eos]
    conditions += [tts_pad] * max(0, num_steps + 1 - len(conditions))
    return conditions[0], conditions[1:num_steps + 1]
