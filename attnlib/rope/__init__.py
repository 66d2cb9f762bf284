"""Positional encodings shared by the models: rotary, QwenImage RoPE, multimodal RoPE (mRoPE)."""
from .rotary import RotaryEmbedding, apply_rotary, apply_rotary_qk, apply_rotary_torch, rotary_inv_freq
from .qwen_image import QwenEmbedLayer3DRope, QwenEmbedRope

__all__ = [
    "apply_rotary", "apply_rotary_qk", "apply_rotary_torch", "rotary_inv_freq", "RotaryEmbedding",
    "QwenEmbedRope", "QwenEmbedLayer3DRope",
]
