"""attnlib attention processors for diffusers models.

    from attnlib.integrations.diffusers import QwenImageAttnProcessor, use_attnlib
    pipe.transformer.set_attn_processor(QwenImageAttnProcessor())   # every block
    use_attnlib(pipe.transformer, backend="flash")                  # same, picking the processor by model

Only diffusers' public ``set_attn_processor`` is used; diffusers' attention-backend registry and its
process-global ``attention_backend()`` switch are left alone (attnlib's ``use_backend`` is a contextvar:
thread- and task-safe).

QwenImage (double-stream MMDiT joint attention): text and image streams are projected, QK-normed and
rotated with the RoPE tables diffusers' ``QwenEmbedRope`` computed in the model call (applied with
``attnlib.rope.apply_rotary(..., interleaved=True)``: diffusers' complex multiplication is the
adjacent-pair rotation), then attend jointly as ``[text, image]``. The text padding mask becomes a
``KeyPadding`` over the joint keys (any pattern; padded text queries still attend, as in diffusers),
and no mask at all when nothing is padded.
"""
from __future__ import annotations

try:
    import diffusers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without diffusers
    raise ImportError("attnlib.integrations.diffusers needs the `diffusers` package (pip install 'diffusers>=0.35'); "
                      "attnlib itself works without it") from e

import torch

from ..api import attention
from ..masks import KeyPadding
from ..registry import _canonical
from ..rope import apply_rotary
from ._structure import PlanCache

__all__ = ["QwenImageAttnProcessor", "use_attnlib", "PROCESSORS"]


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


def _rotate(x: torch.Tensor, table) -> torch.Tensor:
    if table is None:
        return x
    cos, sin = table
    return apply_rotary(x, cos.to(x.device), sin.to(x.device), interleaved=True)


class QwenImageAttnProcessor:
    """Drop-in for diffusers' ``QwenDoubleStreamAttnProcessor2_0`` running on attnlib.

    ``backend`` pins an attnlib backend; by default each call follows ``attnlib.use_backend`` /
    ``$DIFFUSION_ATTENTION_BACKEND`` / auto.
    """

    def __init__(self, backend: str | None = None):
        self.backend = None if backend is None else _canonical(backend)

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
            img_table, txt_table = (_rope_cos_sin(f) for f in image_rotary_emb)
            img_q, img_k = _rotate(img_q, img_table), _rotate(img_k, img_table)
            txt_q, txt_k = _rotate(txt_q, txt_table), _rotate(txt_k, txt_table)

        seq_txt = encoder_hidden_states.shape[1]
        q = torch.cat([txt_q, img_q], dim=1)
        k = torch.cat([txt_k, img_k], dim=1)
        v = torch.cat([txt_v, img_v], dim=1)
        mask = _joint_key_padding(encoder_hidden_states_mask, hidden_states)
        out = attention(q, k, v, mask, backend=self.backend)
        out = out.flatten(2, 3).to(q.dtype)

        txt_out, img_out = out[:, :seq_txt], out[:, seq_txt:]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out


_masks = PlanCache()


def _joint_key_padding(text_mask: torch.Tensor | None, hidden_states: torch.Tensor):
    """``KeyPadding`` over ``[text, image]`` keys from the text mask (True/1 = real token); None if no padding.

    Built once per text-mask tensor (the model passes the same one to every block): one host sync to
    learn whether anything is padded, so an unpadded batch runs with no mask at all.
    """
    if text_mask is None:
        return None
    image_len = hidden_states.shape[1]

    def build():
        valid = text_mask if text_mask.dtype == torch.bool else text_mask != 0
        if bool(valid.all()):
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
}


def use_attnlib(transformer, backend: str | None = None):
    """Route every attention of a diffusers transformer through attnlib; returns the transformer.

    Raises ``NotImplementedError`` naming the model class when attnlib has no processor for it.
    """
    name = type(transformer).__name__
    cls = PROCESSORS.get(name)
    if cls is None:
        raise NotImplementedError(f"attnlib has no attention processor for diffusers' {name}; supported: "
                                  f"{', '.join(sorted(PROCESSORS))}")
    transformer.set_attn_processor(cls(backend=backend))
    return transformer
