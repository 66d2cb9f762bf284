"""QwenImage's MMDiT on attnlib: dual-stream joint attention, text first, image second.

Equal to diffusers' ``QwenImageTransformer2DModel`` (same constructor arguments, same parameter names:
``model.load_state_dict(diffusers_model.state_dict(), strict=True)`` works). What attnlib brings:

* the text padding mask is a :class:`attnlib.KeyPadding` over the joint ``[text, image]`` keys: any
  padding pattern, no query is dropped, every backend lowers it natively;
* text RoPE positions come from :class:`attnlib.rope.QwenEmbedRope` with the **padded** text width
  (``encoder_hidden_states.shape[1]``), never from a mask sum, so a CFG batch that mixes a long prompt
  with a short padded negative prompt gets one consistent table;
* the backend is chosen per call (``attnlib.use_backend`` / ``$DIFFUSION_ATTENTION_BACKEND``), not by a
  process-global switch.

Shapes: ``hidden_states [B, S_img, in_channels]`` (packed 2x2 latent patches), ``encoder_hidden_states
[B, S_txt, joint_attention_dim]``, ``encoder_hidden_states_mask [B, S_txt]`` (1/True = real token),
``timestep [B]`` in [0, 1], ``img_shapes`` diffusers' per-sample list of ``(frames, h, w)`` grids.
"""
from __future__ import annotations

import math
from math import prod
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import attnlib
from attnlib.masks import KeyPadding
from attnlib.rope import QwenEmbedLayer3DRope, QwenEmbedRope, apply_rotary

from . import RMSNorm

__all__ = [
    "QwenImageAttention", "QwenImageTransformerBlock", "QwenImageTransformer2DModel", "timestep_sinusoids",
    "joint_key_padding",
]


def timestep_sinusoids(timesteps: torch.Tensor, channels: int = 256, scale: float = 1000.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """``[B, channels]`` float32 ``[cos | sin]`` of ``scale * t * max_period ** (-f / half)``.

    diffusers' ``Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)``.
    """
    if timesteps.dim() != 1:
        raise ValueError(f"timestep must be 1-D [B], got shape {tuple(timesteps.shape)}")
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = scale * (timesteps[:, None].float() * freqs[None, :])
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, 1)) if channels % 2 else emb


def joint_key_padding(text_mask: torch.Tensor | None, num_image_tokens: int) -> KeyPadding | None:
    """Key validity of the joint ``[text, image]`` sequence: the text mask, then all-True image keys."""
    if text_mask is None:
        return None
    if text_mask.dim() != 2:
        raise ValueError(f"encoder_hidden_states_mask must be [B, S_txt], got shape {tuple(text_mask.shape)}")
    valid = text_mask if text_mask.dtype == torch.bool else text_mask != 0
    image = valid.new_ones(valid.shape[0], num_image_tokens)
    return KeyPadding(torch.cat([valid, image], dim=1))


class _TimestepEmbedding(nn.Module):
    """``linear_2(silu(linear_1(x)))`` (diffusers' ``TimestepEmbedding`` parameter names)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimestepProjEmbeddings(nn.Module):
    def __init__(self, dim: int, use_additional_t_cond: bool = False):
        super().__init__()
        self.timestep_embedder = _TimestepEmbedding(256, dim)
        self.use_additional_t_cond = use_additional_t_cond
        if use_additional_t_cond:
            self.addition_t_embedding = nn.Embedding(2, dim)

    def forward(self, timestep, dtype, additional_t_cond=None):
        emb = self.timestep_embedder(timestep_sinusoids(timestep).to(dtype))
        if self.use_additional_t_cond:
            if additional_t_cond is None:
                raise ValueError("this model has use_additional_t_cond=True: "
                                 "pass additional_t_cond ([B] ints in {0, 1})")
            emb = emb + self.addition_t_embedding(additional_t_cond).to(dtype)
        return emb


class _GeluProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class _FeedForward(nn.Module):
    """``net.0.proj`` -> tanh-GELU -> ``net.2`` (diffusers' ``FeedForward(activation_fn="gelu-approximate")``)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class QwenImageAttention(nn.Module):
    """Joint attention of a text stream and an image stream with separate projections and QK norms.

    Parameter names follow diffusers' ``Attention(added_kv_proj_dim=dim, qk_norm="rms_norm")``: image
    ``to_q/to_k/to_v/to_out.0`` and ``norm_q/norm_k``; text ``add_q_proj/add_k_proj/add_v_proj/to_add_out``
    and ``norm_added_q/norm_added_k``.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float = 1e-6, qk_norm: str | None = "rms_norm",
                 backend: str | None = None):
        super().__init__()
        if qk_norm not in ("rms_norm", None):
            raise ValueError(f"qk_norm must be 'rms_norm' or None, got {qk_norm!r}")
        inner = num_heads * head_dim
        self.heads = num_heads
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
        norm = (lambda: RMSNorm(head_dim, eps)) if qk_norm else nn.Identity
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = norm(), norm(), norm(), norm()
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.to_add_out = nn.Linear(inner, dim)
        self.attn = attnlib.Attention(num_heads, head_dim, backend=backend)

    def forward(self, hidden_states, encoder_hidden_states, key_padding: KeyPadding | None = None, rope=None,
                parallel=None):
        """``(img_out, txt_out)``. ``rope``: ``(cos, sin)`` of the joint ``[text, image]`` rows given
        (text first). ``parallel``: a ``SequenceParallel``; then ``hidden_states`` is this rank's shard of
        the image tokens (and ``rope`` covers ``[text, this shard]``), the text is whole on every rank,
        ``key_padding`` describes the whole joint sequence, and ``img_out`` is this rank's shard."""
        s_txt = encoder_hidden_states.shape[1]
        split = (-1, self.head_dim)
        tq = self.norm_added_q(self.add_q_proj(encoder_hidden_states).unflatten(-1, split))
        tk = self.norm_added_k(self.add_k_proj(encoder_hidden_states).unflatten(-1, split))
        tv = self.add_v_proj(encoder_hidden_states).unflatten(-1, split)
        iq = self.norm_q(self.to_q(hidden_states).unflatten(-1, split))
        ik = self.norm_k(self.to_k(hidden_states).unflatten(-1, split))
        iv = self.to_v(hidden_states).unflatten(-1, split)
        if rope is not None:
            cos, sin = rope
            (tc, ic), (ts, is_) = cos.split((s_txt, cos.shape[0] - s_txt)), sin.split((s_txt, sin.shape[0] - s_txt))
            tq, tk = (apply_rotary(x, tc, ts, interleaved=True) for x in (tq, tk))
            iq, ik = (apply_rotary(x, ic, is_, interleaved=True) for x in (iq, ik))
        if parallel is None:
            cat = lambda a, b: torch.cat([a, b], dim=1)  # noqa: E731
            out = self.attn(cat(tq, iq), cat(tk, ik), cat(tv, iv), key_padding)
        else:
            out = parallel.joint_attention(iq, ik, iv, tq, tk, tv, key_padding, joint_strategy="front",
                                           scale=self.attn.scale, backend=self.attn.backend)
        out = out.flatten(2)                                     # [B, S_txt + S_img(local), H * D]
        return self.to_out[0](out[:, s_txt:]), self.to_add_out(out[:, :s_txt])


def _modulate(x, params, index=None):
    """``x * (1 + scale) + shift`` and the gate; ``index`` picks per token between two halves of the batch."""
    shift, scale, gate = params.chunk(3, dim=-1)
    if index is None:
        shift, scale, gate = shift[:, None], scale[:, None], gate[:, None]
    else:  # zero_cond_t: params hold [real timestep batch; zero timestep batch]
        pick = (index == 0)[..., None]
        b = shift.shape[0] // 2
        shift, scale, gate = (torch.where(pick, p[:b, None], p[b:, None]) for p in (shift, scale, gate))
    return x * (1 + scale) + shift, gate


class QwenImageTransformerBlock(nn.Module):
    """One dual-stream block: AdaLN-modulated joint attention, then per-stream MLPs."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, qk_norm: str = "rms_norm",
                 eps: float = 1e-6, zero_cond_t: bool = False, backend: str | None = None):
        super().__init__()
        self.dim = dim
        self.zero_cond_t = zero_cond_t
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = QwenImageAttention(dim, num_attention_heads, attention_head_dim, eps, qk_norm, backend)
        self.img_mlp = _FeedForward(dim)
        self.txt_mlp = _FeedForward(dim)

    def forward(self, hidden_states, encoder_hidden_states, key_padding, temb, rope=None, modulate_index=None,
                parallel=None):
        """Returns ``(encoder_hidden_states, hidden_states)`` like diffusers' block. ``parallel``: see
        :meth:`QwenImageAttention.forward` (``modulate_index`` then covers this rank's image tokens)."""
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)
        txt_temb = temb.chunk(2, dim=0)[0] if self.zero_cond_t else temb
        txt_mod1, txt_mod2 = self.txt_mod(txt_temb).chunk(2, dim=-1)

        img_in, img_gate1 = _modulate(self.img_norm1(hidden_states), img_mod1, modulate_index)
        txt_in, txt_gate1 = _modulate(self.txt_norm1(encoder_hidden_states), txt_mod1)
        img_attn, txt_attn = self.attn(img_in, txt_in, key_padding, rope, parallel)
        hidden_states = hidden_states + img_gate1 * img_attn
        encoder_hidden_states = encoder_hidden_states + txt_gate1 * txt_attn

        img_in2, img_gate2 = _modulate(self.img_norm2(hidden_states), img_mod2, modulate_index)
        hidden_states = hidden_states + img_gate2 * self.img_mlp(img_in2)
        txt_in2, txt_gate2 = _modulate(self.txt_norm2(encoder_hidden_states), txt_mod2)
        encoder_hidden_states = encoder_hidden_states + txt_gate2 * self.txt_mlp(txt_in2)

        if hidden_states.dtype == torch.float16:  # diffusers clips to keep fp16 finite
            hidden_states = hidden_states.clip(-65504, 65504)
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class _AdaLayerNormContinuous(nn.Module):
    """``norm(x) * (1 + scale) + shift`` with ``scale, shift = linear(silu(temb))`` (scale first)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None] + shift[:, None]


class QwenImageTransformer2DModel(nn.Module):
    """diffusers' ``QwenImageTransformer2DModel`` on attnlib (same arguments and parameter names).

    ``guidance_embeds`` is accepted for config compatibility and, as in diffusers, adds no parameters;
    a ``guidance`` input is not supported.
    """

    def __init__(self, patch_size: int = 2, in_channels: int = 64, out_channels: int | None = 16, num_layers: int = 60,
                 attention_head_dim: int = 128, num_attention_heads: int = 24, joint_attention_dim: int = 3584,
                 guidance_embeds: bool = False, axes_dims_rope: Sequence[int] = (16, 56, 56), zero_cond_t: bool = False,
                 use_additional_t_cond: bool = False, use_layer3d_rope: bool = False, backend: str | None = None):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"sum(axes_dims_rope)={sum(axes_dims_rope)} must equal "
                             f"attention_head_dim={attention_head_dim}")
        self.out_channels = out_channels or in_channels
        self.inner_dim = dim = num_attention_heads * attention_head_dim
        self.zero_cond_t = zero_cond_t
        rope_cls = QwenEmbedLayer3DRope if use_layer3d_rope else QwenEmbedRope
        self.pos_embed = rope_cls(theta=10000, axes_dim=tuple(axes_dims_rope), scale_rope=True)
        self.time_text_embed = _TimestepProjEmbeddings(dim, use_additional_t_cond)
        self.txt_norm = RMSNorm(joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(in_channels, dim)
        self.txt_in = nn.Linear(joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList([
            QwenImageTransformerBlock(dim, num_attention_heads, attention_head_dim, zero_cond_t=zero_cond_t,
                                      backend=backend)
            for _ in range(num_layers)])
        self.norm_out = _AdaLayerNormContinuous(dim, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)

    def rope_tables(self, img_shapes, text_width: int, device, parallel=None):
        """``(cos, sin)`` of the joint ``[text, image]`` sequence; text positions from the padded width.
        With ``parallel``, the image rows are this rank's shard."""
        (img_cos, img_sin), (txt_cos, txt_sin) = self.pos_embed(img_shapes, text_width, device=device)
        if parallel is not None:
            img_cos, img_sin = parallel.shard(img_cos, 0), parallel.shard(img_sin, 0)
        return torch.cat([txt_cos, img_cos]), torch.cat([txt_sin, img_sin])

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_mask: torch.Tensor | None, timestep: torch.Tensor, img_shapes,
                additional_t_cond: torch.Tensor | None = None, parallel=None) -> torch.Tensor:
        """The predicted ``[B, S_img, patch_size**2 * out_channels]`` (diffusers' ``.sample``).

        ``parallel``: an ``attnlib.parallel.SequenceParallel``. The inputs and the result are whole on
        every rank; inside, each rank keeps its shard of the image tokens (and of their RoPE rows and
        modulation index), the text stays whole, and every block's joint attention runs
        :meth:`~attnlib.parallel.SequenceParallel.joint_attention`. Equal to one process.
        """
        if encoder_hidden_states.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"batch sizes differ: hidden_states {hidden_states.shape[0]}, "
                             f"encoder_hidden_states {encoder_hidden_states.shape[0]}")
        text_mask = encoder_hidden_states_mask
        if text_mask is not None and text_mask.shape != encoder_hidden_states.shape[:2]:
            raise ValueError(f"encoder_hidden_states_mask must be [B, S_txt]={tuple(encoder_hidden_states.shape[:2])}, "
                             f"got {tuple(text_mask.shape)}")
        hidden_states = self.img_in(hidden_states)
        timestep = timestep.to(hidden_states.dtype)
        modulate_index = None
        if self.zero_cond_t:
            timestep = torch.cat([timestep, timestep * 0], dim=0)
            modulate_index = torch.tensor(
                [[0] * prod(s[0]) + [1] * sum(prod(g) for g in s[1:]) for s in img_shapes],
                device=hidden_states.device, dtype=torch.int)
        encoder_hidden_states = self.txt_in(self.txt_norm(encoder_hidden_states))
        temb = self.time_text_embed(timestep, hidden_states.dtype, additional_t_cond)

        text_width = encoder_hidden_states.shape[1]
        s_img = hidden_states.shape[1]
        key_padding = joint_key_padding(encoder_hidden_states_mask, s_img)
        rope = self.rope_tables(img_shapes, text_width, hidden_states.device, parallel)
        if parallel is not None:
            hidden_states = parallel.shard(hidden_states, 1)
            if modulate_index is not None:
                modulate_index = parallel.shard(modulate_index, 1)
            if key_padding is None:                    # the whole joint length, so no call exchanges lengths
                parallel = parallel.with_seqlens(text_width + s_img)
        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, key_padding, temb,
                                                         rope, modulate_index, parallel)
        if self.zero_cond_t:
            temb = temb.chunk(2, dim=0)[0]
        out = self.proj_out(self.norm_out(hidden_states, temb))
        return out if parallel is None else parallel.gather(out, 1, total=s_img)
