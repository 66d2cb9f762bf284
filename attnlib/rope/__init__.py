"""Positional encodings shared by the models: rotary, QwenImage RoPE, multimodal RoPE (mRoPE)."""
from .rotary import RotaryEmbedding, apply_rotary, apply_rotary_qk, apply_rotary_torch, rotary_inv_freq
from .qwen_image import QwenEmbedLayer3DRope, QwenEmbedRope
from .mrope import MRopeConfig, MRotaryEmbedding, apply_mrope, mrope_position_ids
from .packing import packed_mrope_position_ids
from .truncation import reconcile_image_tokens

__all__ = [
    "apply_rotary", "apply_rotary_qk", "apply_rotary_torch", "rotary_inv_freq", "RotaryEmbedding",
    "QwenEmbedRope", "QwenEmbedLayer3DRope",
    "MRopeConfig", "mrope_position_ids", "MRotaryEmbedding", "apply_mrope",
    "packed_mrope_position_ids", "reconcile_image_tokens",
]
