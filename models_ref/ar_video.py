"""A frame-autoregressive video attention block: streaming generation with a rolling KV cache.

Autoregressive and streaming video models (CausVid, Self-Forcing, MAGI-1 style) generate a video a frame
(or a few frames) at a time. Inside a frame attention is bidirectional; across frames it is causal; a query
sees only the ``window`` newest frames (its own included) plus the first ``sink_frames`` frames, which stay
visible as an attention sink. In attnlib that is one mask over the whole sequence::

    Causal(chunk=frame_tokens, window=window, sink=sink_frames * frame_tokens)

and generation keeps only what that mask can still reach: the sink frames and the ``window - 1`` newest
frames (:class:`RollingKVCache`). :meth:`FrameAutoregressiveAttention.step` runs new frames against the
cache with the *same* mask on the shorter key timeline ``[kept frames, new frames]``; the test suite checks,
on every backend, that stepping frame by frame (or several frames at a time) equals one pass over all frames.

Positions: a 1-D rotary embedding over each token's index in the whole stream, applied to q and k before
the keys are cached (cached keys keep their absolute positions, as in language-model KV caches).
"""
from __future__ import annotations

import torch
from torch import nn

import attnlib
from attnlib.masks import Causal
from attnlib.rope import RotaryEmbedding, apply_rotary_qk

__all__ = ["FrameAutoregressiveAttention", "RollingKVCache"]


class RollingKVCache:
    """Keys and values a frame-autoregressive stream still needs: the first ``sink_frames`` frames and the
    ``window - 1`` newest ones (the next frame is the window's last). ``k``/``v``: ``[B, kept tokens, Hkv, D]``
    in stream order; ``frames``: the stream index of each kept frame; ``seen``: frames generated so far."""

    def __init__(self, frame_tokens: int, window: int, sink_frames: int = 1):
        for value, name in ((frame_tokens, "frame_tokens"), (window, "window")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(sink_frames, bool) or not isinstance(sink_frames, int) or sink_frames < 0:
            raise ValueError(f"sink_frames must be an int >= 0, got {sink_frames!r}")
        self.frame_tokens, self.window, self.sink_frames = frame_tokens, window, sink_frames
        self.k = self.v = None
        self.frames: list[int] = []
        self.seen = 0

    def extend(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values new frames attend to (kept frames, then the new ones), and the cache rolled
        forward: frames no later query can see are dropped."""
        f = self.frame_tokens
        if k_new.shape[1] % f:
            raise ValueError(f"new keys cover {k_new.shape[1]} tokens, not whole frames of {f}")
        n = k_new.shape[1] // f
        k = k_new if self.k is None else torch.cat([self.k, k_new], 1)
        v = v_new if self.v is None else torch.cat([self.v, v_new], 1)
        frames = self.frames + list(range(self.seen, self.seen + n))
        self.seen += n
        keep = [i for i, fr in enumerate(frames) if fr < self.sink_frames or fr >= self.seen - (self.window - 1)]
        if len(keep) == len(frames):
            self.k, self.v = k, v
        else:
            rows = torch.cat([torch.arange(i * f, (i + 1) * f) for i in keep]).to(k.device) if keep else None
            self.k = None if rows is None else k.index_select(1, rows)
            self.v = None if rows is None else v.index_select(1, rows)
        self.frames = [frames[i] for i in keep]
        return k, v


class FrameAutoregressiveAttention(nn.Module):
    """Self-attention of a frame-autoregressive video model (module docstring).

    ``x``: ``[B, frames * frame_tokens, dim]``. :meth:`forward` runs all frames in one pass;
    :meth:`step` runs the next frame(s) against a :class:`RollingKVCache` (from :meth:`new_cache`).
    """

    def __init__(self, dim: int, num_heads: int, frame_tokens: int, window: int, *, num_kv_heads: int | None = None,
                 sink_frames: int = 1, rope_theta: float = 10000.0, backend: str | None = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads}), and num_heads of "
                             f"num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.frame_tokens, self.window, self.sink_frames = frame_tokens, window, sink_frames
        self.backend = backend
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, num_kv_heads * self.head_dim)
        self.to_v = nn.Linear(dim, num_kv_heads * self.head_dim)
        self.to_out = nn.Linear(dim, dim)
        self.rope = RotaryEmbedding(self.head_dim, rope_theta)
        RollingKVCache(frame_tokens, window, sink_frames)        # validates the stream parameters

    def mask(self) -> Causal:
        """The stream's mask over any key timeline of whole frames: frame-causal, ``window`` frames, sinks."""
        f = self.frame_tokens
        return Causal(chunk=f, window=self.window, sink=self.sink_frames * f)

    def new_cache(self) -> RollingKVCache:
        return RollingKVCache(self.frame_tokens, self.window, self.sink_frames)

    def _qkv(self, x: torch.Tensor, start: int):
        b, s, _ = x.shape
        if s % self.frame_tokens:
            raise ValueError(f"x has {s} tokens, not whole frames of {self.frame_tokens}")
        q = self.to_q(x).view(b, s, self.num_heads, self.head_dim)
        k = self.to_k(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.to_v(x).view(b, s, self.num_kv_heads, self.head_dim)
        cos, sin = self.rope.cos_sin(torch.arange(start, start + s, device=x.device))
        q, k = apply_rotary_qk(q, k, cos.to(x.dtype), sin.to(x.dtype))
        return q, k, v

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        return self.to_out(o.reshape(o.shape[0], o.shape[1], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All frames in one pass."""
        q, k, v = self._qkv(x, 0)
        return self._out(attnlib.attention(q, k, v, self.mask(), backend=self.backend))

    def step(self, x: torch.Tensor, cache: RollingKVCache) -> torch.Tensor:
        """The next frame(s) ``x`` against ``cache`` (updated in place): their output rows of :meth:`forward`."""
        q, k, v = self._qkv(x, cache.seen * self.frame_tokens)
        k_all, v_all = cache.extend(k, v)
        return self._out(attnlib.attention(q, k_all, v_all, self.mask(), backend=self.backend))
