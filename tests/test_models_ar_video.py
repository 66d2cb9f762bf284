"""The frame-autoregressive video block: generating frame by frame (or a few frames at a time) against the
rolling KV cache equals one pass over all frames with ``Causal(chunk=frame_tokens, window=W, sink=...)``,
on every backend; the cache keeps only the sink frames and the ``W - 1`` newest ones."""
import pytest
import torch

import attnlib
from attnlib.testing import assert_close_to_reference
from models_ref.ar_video import FrameAutoregressiveAttention, RollingKVCache
from models_ref.parity import no_fallback

AVAILABLE = {r["name"]: r for r in attnlib.list_backends()}


def _backend(name):
    row = AVAILABLE[name]
    return pytest.param(name, marks=[] if row["available"] else [pytest.mark.skip(reason=row["reason"])], id=name)


def _block(frame_tokens, window, sink_frames=1, backend=None, seed=0, heads=(4, 2), dim=32):
    torch.manual_seed(seed)
    blk = FrameAutoregressiveAttention(dim, heads[0], frame_tokens, window, num_kv_heads=heads[1],
                                       sink_frames=sink_frames, backend=backend)
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return blk


def _stream(blk, x, steps):
    cache, outs, pos, f = blk.new_cache(), [], 0, blk.frame_tokens
    for n in steps:
        outs.append(blk.step(x[:, pos * f:(pos + n) * f], cache))
        pos += n
    assert pos * f == x.shape[1]
    return torch.cat(outs, 1), cache


CASES = [   # frame_tokens, frames, window, sink_frames, frames per step
    (5, 7, 3, 1, [1] * 7),
    (5, 7, 2, 1, [2, 1, 3, 1]),
    (4, 8, 4, 2, [3, 3, 2]),
    (3, 6, 1, 1, [1] * 6),
    (4, 6, 3, 0, [1, 2, 1, 2]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"F{c[0]}x{c[1]}-W{c[2]}-sink{c[3]}-steps{len(c[4])}")
def test_stream_equals_one_pass_in_float64(case):
    f, frames, window, sink, steps = case
    blk = _block(f, window, sink, backend="math").double()
    x = torch.randn(2, frames * f, 32, dtype=torch.float64)
    full = blk(x)
    got, cache = _stream(blk, x, steps)
    assert (got - full).abs().max() < 1e-12
    kept = sorted(set(range(min(sink, frames))) | set(range(max(0, frames - (window - 1)), frames)))
    assert cache.frames == kept and cache.k.shape[1] == len(kept) * f


@pytest.mark.parametrize("backend", [_backend("math"), _backend("sdpa")])
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"W{c[2]}-sink{c[3]}-steps{len(c[4])}")
def test_stream_equals_one_pass_on(backend, case):
    f, frames, window, sink, steps = case
    _check_backend(backend, f, frames, window, sink, steps)


@pytest.mark.parametrize("backend", [_backend("flex"), _backend("triton")])
def test_stream_equals_one_pass_on_compiled_kernels(backend):
    _check_backend(backend, 4, 4, 2, 1, [2, 2], heads=(2, 1), dim=16)     # frame 3 sees frames 0, 2, 3


def _check_backend(backend, f, frames, window, sink, steps, heads=(4, 2), dim=32):
    """Stream and one pass on ``backend`` (float32) vs the one pass in float64 on math, by the tolerance
    policy (naive: the one pass in float32 on math)."""
    blk = _block(f, window, sink, backend=backend, heads=heads, dim=dim)
    x = torch.randn(1, frames * f, dim, generator=torch.Generator().manual_seed(1))
    with no_fallback(), torch.no_grad():
        full = blk(x)
        got, _ = _stream(blk, x, steps)
        blk.backend = "math"
        naive = blk(x)
        ref = blk.double()(x.double())
    assert_close_to_reference(full, ref, naive, torch.float32, f"{backend} one pass")
    assert_close_to_reference(got, ref, naive, torch.float32, f"{backend} frame by frame")


def test_one_pass_sees_window_and_sink_only():
    """The mask itself: perturbing a frame the window and the sink hide leaves later outputs unchanged."""
    blk = _block(4, 2, 1, backend="sdpa").double()
    x = torch.randn(1, 6 * 4, 32, dtype=torch.float64)
    y = x.clone()
    y[:, 4:8] += 1.0                              # frame 1: neither sink (frame 0) nor within 2 of frame 3+
    a, b = blk(x), blk(y)
    assert (a[:, 12:] - b[:, 12:]).abs().max() < 1e-12          # frames 3..5 never see frame 1
    assert (a[:, 8:12] - b[:, 8:12]).abs().max() > 1e-3         # frame 2 does (window 2: frames 1, 2)
    y = x.clone()
    y[:, :4] += 1.0                               # the sink frame reaches every later frame
    assert (blk(y)[:, 20:] - a[:, 20:]).abs().max() > 1e-3


def test_stream_errors():
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        RollingKVCache(4, 0)
    with pytest.raises(ValueError, match="sink_frames must be an int >= 0"):
        RollingKVCache(4, 2, -1)
    blk = _block(4, 2)
    with pytest.raises(ValueError, match="not whole frames of 4"):
        blk.step(torch.randn(1, 6, 32), blk.new_cache())
