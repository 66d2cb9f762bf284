"""Triton kernels for attnlib (attention, rotary/mRoPE). Importable without a GPU or Triton."""
