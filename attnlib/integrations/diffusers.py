"""attnlib attention processors for diffusers models.

    from attnlib.integrations.diffusers import QwenImageAttnProcessor, use_attnlib
    pipe.transformer.set_attn_processor(QwenImageAttnProcessor())   # every block
    use_attnlib(pipe.transformer, backend="flash")                  # same, picking the processor by model
                                                                    # (QwenImage, Flux)

Only diffusers' public ``set_attn_processor`` is used; diffusers' attention-backend registry and its
process-global ``attention_backend()`` switch are left alone (attnlib's ``use_backend`` is a contextvar:
thread- and task-safe).

QwenImage (double-stream MMDiT joint attention): text and image streams are projected, QK-normed and
rotated with the RoPE tables diffusers' ``QwenEmbedRope`` computed in the model call (applied with
``attnlib.rope.apply_rotary(..., interleaved=True)``: diffusers' complex multiplication is the
adjacent-pair rotation), then attend jointly as ``[text, image]``. The text padding mask becomes a
``KeyPadding`` over the joint keys (any pattern; padded text queries still attend, as in diffusers),
and no mask at all when nothing is padded.

Both processors take attnlib's score modifiers as options passed to every call (``softcap=``,
``alibi_slopes=``, ``sinks=``; see :func:`attnlib.attention`): the models as diffusers ships them use
none.
"""
from __future__ import annotations

try:
    import diffusers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without diffusers
    from ..versions import get, requirement

    raise ImportError(f"attnlib.integrations.diffusers needs the `diffusers` package (pip install "
                      f"'{requirement(get('diffusers'))}'); attnlib itself works without it") from e

import weakref

import torch

from ..api import attention
from ..masks import KeyPadding
from ..registry import canonical_name
from ..rope import apply_rotary
from ._structure import TensorKeyedCache

__all__ = ["QwenImageAttnProcessor", "FluxAttnProcessor", "use_attnlib", "PROCESSORS"]


def _rope_cos_sin(freqs) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' RoPE table for one stream -> float32 ``(cos, sin)`` ``[S, D/2]``.

    Accepts the complex ``[S, D/2]`` table QwenImage's ``QwenEmbedRope`` returns, or a real ``(cos, sin)``
    pair of ``[S, D/2]`` tables.
    """
    if isinstance(freqs, torch.Tensor) and freqs.is_complex():
        return freqs.real.float().contiguous(), freqs.imag.float().contiguous()
    if isinstance(freqs, (tuple, list)) and len(freqs) == 2:
        cos, sin = freqs
        return cos.float(), sin.float()
    raise TypeError("image_rotary_emb entries must be complex [S, D/2] tables (QwenEmbedRope) or (cos, sin) pairs, "
                    f"got {type(freqs).__name__}")


_qwen_tables = TensorKeyedCache()


def _cached_cos_sin(freqs):
    """:func:`_rope_cos_sin`, once per table tensor (the model hands every block the same tables)."""
    if isinstance(freqs, torch.Tensor):
        return _qwen_tables.get(freqs, lambda: _rope_cos_sin(freqs))
    return _rope_cos_sin(freqs)


def _rotate(x: torch.Tensor, table) -> torch.Tensor:
    if table is None:
        return x
    cos, sin = table
    return apply_rotary(x, cos.to(x.device), sin.to(x.device), interleaved=True)


class QwenImageAttnProcessor:
    """Drop-in for diffusers' ``QwenDoubleStreamAttnProcessor2_0`` running on attnlib.

    ``backend`` pins an attnlib backend; by default each call follows ``attnlib.use_backend`` /
    ``$DIFFUSION_ATTENTION_BACKEND`` / auto. ``softcap``, ``alibi_slopes`` and ``sinks`` are passed to
    :func:`attnlib.attention` on every call.
    """

    def __init__(self, backend: str | None = None, *, softcap: float | None = None,
                 alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None):
        self.backend = None if backend is None else canonical_name(backend)
        self.options = dict(softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb=None) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("QwenImageAttnProcessor needs encoder_hidden_states (the text stream): it runs "
                             "QwenImage's joint text+image attention")
        if attention_mask is not None:
            raise NotImplementedError("QwenImageAttnProcessor takes the text padding mask as "
                                      "encoder_hidden_states_mask; an extra attention_mask is not supported "
                                      "(diffusers' QwenImage processor rejects it too)")
        head_dim = attn.inner_dim // attn.heads
        img_q, img_k, img_v = (proj(hidden_states).unflatten(-1, (-1, head_dim))
                               for proj in (attn.to_q, attn.to_k, attn.to_v))
        txt_q, txt_k, txt_v = (proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                               for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)

        if image_rotary_emb is not None:
            img_table, txt_table = (_cached_cos_sin(f) for f in image_rotary_emb)
            img_q, img_k = _rotate(img_q, img_table), _rotate(img_k, img_table)
            txt_q, txt_k = _rotate(txt_q, txt_table), _rotate(txt_k, txt_table)

        seq_txt = encoder_hidden_states.shape[1]
        q = torch.cat([txt_q, img_q], dim=1)
        k = torch.cat([txt_k, img_k], dim=1)
        v = torch.cat([txt_v, img_v], dim=1)
        mask = _joint_key_padding(encoder_hidden_states_mask, hidden_states)
        out = attention(q, k, v, mask, backend=self.backend, **self.options)
        out = out.flatten(2, 3).to(q.dtype)

        txt_out, img_out = out[:, :seq_txt], out[:, seq_txt:]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out


class FluxAttnProcessor:
    """Drop-in for diffusers' ``FluxAttnProcessor`` (``FluxTransformer2DModel``) running on attnlib.

    Double-stream blocks attend over ``[text, image]``, single-stream blocks over the one stream they
    get. Flux's RoPE table is a real ``(cos, sin)`` pair of ``[S, D]`` tables with each frequency
    repeated for its adjacent pair (diffusers' ``use_real=True, use_real_unbind_dim=-1``); it is applied
    with ``attnlib.rope.apply_rotary(..., interleaved=True)`` on the de-duplicated ``[S, D/2]`` table
    (checked once per table). An ``attention_mask`` (through ``joint_attention_kwargs``) may be a 2-D
    ``[B, S]`` key mask (True/1 = keep) over the joint keys: it becomes a ``KeyPadding``. ``backend``
    and the score modifiers as in :class:`QwenImageAttnProcessor`.
    """

    def __init__(self, backend: str | None = None, *, softcap: float | None = None,
                 alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None):
        self.backend = None if backend is None else canonical_name(backend)
        self.options = dict(softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            if getattr(attn, "fused_projections", False):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq, ek, ev = (proj(encoder_hidden_states) for proj in (attn.add_q_proj, attn.add_k_proj,
                                                                        attn.add_v_proj))
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            cos, sin = _flux_table(image_rotary_emb)
            q = apply_rotary(q, cos.to(q.device), sin.to(q.device), interleaved=True)
            k = apply_rotary(k, cos.to(k.device), sin.to(k.device), interleaved=True)
        mask = _key_mask(attention_mask, k)
        out = attention(q, k, v, mask, backend=self.backend, **self.options).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        txt_len = encoder_hidden_states.shape[1]
        txt_out, img_out = out[:, :txt_len], out[:, txt_len:]
        img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
        return img_out, attn.to_add_out(txt_out.contiguous())


_tables = TensorKeyedCache()


def _flux_table(image_rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's ``(cos, sin)`` ``[S, D]`` (pairs repeated) -> float32 ``[S, D/2]``; checked once per table."""
    if not (isinstance(image_rotary_emb, (tuple, list)) and len(image_rotary_emb) == 2):
        raise TypeError("FluxAttnProcessor expects image_rotary_emb as diffusers' (cos, sin) pair of [S, D] tables, "
                        f"got {type(image_rotary_emb).__name__}")
    cos, sin = image_rotary_emb

    def build():
        c, s_ = cos[:, 0::2], sin[:, 0::2]
        if not (torch.equal(c, cos[:, 1::2]) and torch.equal(s_, sin[:, 1::2])):
            raise NotImplementedError("this (cos, sin) table does not repeat each frequency for its adjacent pair "
                                      "(diffusers' use_real_unbind_dim=-1 layout); FluxAttnProcessor cannot apply it")
        return weakref.ref(sin), c.float().contiguous(), s_.float().contiguous()

    sin_ref, c, s_ = _tables.get(cos, build)  # the model passes one table pair to every block
    if sin_ref() is not sin:
        _, c, s_ = build()
    return c, s_


def _key_mask(attention_mask: torch.Tensor | None, k: torch.Tensor):
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1:
        attention_mask = attention_mask[:, 0, 0]
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (k.shape[0], k.shape[1]):
        raise NotImplementedError(f"attention_mask of shape {tuple(attention_mask.shape)}: attnlib's diffusers "
                                  f"processors take a key mask [B, S] = [{k.shape[0]}, {k.shape[1]}] (True/1 = keep) "
                                  "over the joint [text, image] keys")
    valid = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    return KeyPadding(valid)


_masks = TensorKeyedCache()


def _joint_key_padding(text_mask: torch.Tensor | None, hidden_states: torch.Tensor):
    """``KeyPadding`` over ``[text, image]`` keys from the text mask (True/1 = real token); None if no padding.

    Built once per text-mask tensor (the model passes the same one to every block): in eager mode one host
    read learns whether anything is padded, so an unpadded batch runs with no mask at all; inside a compiled
    region there is no host read and the (exact) ``KeyPadding`` is always used.
    """
    if text_mask is None:
        return None
    image_len = hidden_states.shape[1]

    def build():
        valid = text_mask if text_mask.dtype == torch.bool else text_mask != 0
        # eager: one host read per text-mask tensor finds unpadded batches (then no mask at all); compiled
        # code never reads the mask on the host: the KeyPadding is exact either way
        if not torch.compiler.is_compiling() and bool(valid.all()):
            return (image_len, None)
        image = torch.ones(valid.shape[0], image_len, dtype=torch.bool, device=valid.device)
        return (image_len, KeyPadding(torch.cat([valid, image], dim=1)))

    cached_len, mask = _masks.get(text_mask, build)
    if cached_len != image_len:  # same text mask, another image size: rebuild (not cached)
        cached_len, mask = build()
    return mask


#: diffusers transformer class name -> attnlib processor class
PROCESSORS = {
    "QwenImageTransformer2DModel": QwenImageAttnProcessor,
    "FluxTransformer2DModel": FluxAttnProcessor,
}


def use_attnlib(transformer, backend: str | None = None, **options):
    """Route every attention of a diffusers transformer through attnlib; returns the transformer.

    ``options`` (``softcap``, ``alibi_slopes``, ``sinks``) go to the processor. Raises
    ``NotImplementedError`` naming the model class when attnlib has no processor for it.
    """
    name = type(transformer).__name__
    cls = PROCESSORS.get(name)
    if cls is None:
        raise NotImplementedError(f"attnlib has no attention processor for diffusers' {name}; supported: "
                                  f"{', '.join(sorted(PROCESSORS))}")
    transformer.set_attn_processor(cls(backend=backend, **options))
    return transformer
