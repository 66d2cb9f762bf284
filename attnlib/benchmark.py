"""``attnlib bench``: which backend is fastest for these shapes on this machine.

Named workloads (``WORKLOADS``) and shapes a user gives (``--shape``) run on every backend that can serve them.
Each backend is first checked against the float64 ``math`` reference on the same inputs (the tolerance
policy of :mod:`attnlib.testing`; on big calls a deterministic subset: the last query head with the kv head it
reads, the last batch row), then timed: CUDA events around each call on a GPU, ``time.perf_counter`` on a
CPU, after warm-up calls (which also compile ``flex``), for as many calls as fill ``--min-time`` (at least
``MIN_ROUNDS``). The table reports the median, TFLOP/s of the *visible* work (only the (query, key) pairs the
mask lets through: ``visible_pairs``) and the ratio to ``sdpa`` timed in the same run; it can also write
pytest-benchmark JSON (``pytest-benchmark compare`` reads it) and a PNG chart (``pip install attnlib[plot]``).

Adding a workload is one ``Workload`` entry; adding a ``--mask`` choice is one ``UserMask`` entry.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import torch

from . import masks
from .arguments import UsageError, backend_args, device_arg
from .masks import BlockDiagonal, Causal, DenseMask, KeyPadding

#: the seconds of timed calls each measurement aims for, per device type (``--min-time`` overrides)
DEFAULT_MIN_TIME = {"cpu": 0.5, "cuda": 0.2}
MIN_ROUNDS = 5
MAX_ROUNDS = 2000
#: calls with at most this many scores (B * Hq * Sq * Sk) are checked whole; bigger ones on a subset
FULL_CHECK_SCORES = 1 << 22
DEFAULT_DTYPE = {"cpu": "fp32", "cuda": "bf16"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
BASELINE = "sdpa"


# ---------------------------------------------------------------------------------------------------
# problems and workloads
# ---------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """One concrete call: ``attention(q, k, v, mask, **kwargs)``. ``reference_kv``: contiguous k, v that give
    the same result without ``kwargs`` (paged KV), for the check."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Any
    kwargs: dict = field(default_factory=dict)
    reference_kv: tuple | None = None

    @property
    def packed(self) -> bool:
        return self.q.dim() == 3

    def describe(self) -> str:
        kv = self.reference_kv[0] if self.reference_kv is not None else self.k
        text = f"q {list(self.q.shape)}, k/v {list(kv.shape)}, {_mask_text(self.mask)}"
        if self.kwargs:
            text += ", " + ", ".join(f"{k}={_short(v)}" for k, v in self.kwargs.items())
        return text


def _mask_text(mask) -> str:
    if isinstance(mask, BlockDiagonal):
        q, kv = mask.q_seqlens, mask.kv_seqlens
        kv_text = "" if kv == q else f", kv {_lens_text(kv)}"
        extra = (", causal" if mask.causal else "") + "".join(
            f", {name}={getattr(mask, name)}" for name in ("window", "chunk", "sink") if getattr(mask, name, None))
        return f"BlockDiagonal({len(q)} blocks: q {_lens_text(q)}{kv_text}{extra})"
    if mask is None:
        return "no mask"
    fields = getattr(type(mask), "__dataclass_fields__", None)
    if not fields:
        return repr(mask)
    parts = []
    for f in fields.values():
        value = getattr(mask, f.name)
        if isinstance(value, torch.Tensor):
            parts.append(f"{f.name}={_short(value)}")
        elif value != f.default:
            parts.append(f"{f.name}={value!r}")
    return f"{type(mask).__name__}({', '.join(parts)})"


def _lens_text(lens) -> str:
    lens = list(lens)
    return str(lens) if len(lens) <= 8 else f"{min(lens)}..{max(lens)} (sum {sum(lens)})"


def _short(x) -> str:
    return f"<{str(x.dtype).replace('torch.', '')} {list(x.shape)}>" if isinstance(x, torch.Tensor) else repr(x)


def _randn(gen, shape, device, dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _dense(b, sq, sk, hq, hkv, d, mask, device, dtype, gen) -> Problem:
    q = _randn(gen, (b, sq, hq, d), device, dtype)
    k = _randn(gen, (b, sk, hkv, d), device, dtype)
    v = _randn(gen, (b, sk, hkv, d), device, dtype)
    return Problem(q, k, v, mask(b, sq, sk, device) if callable(mask) else mask)


def _packed(mask: BlockDiagonal, hq, hkv, d, device, dtype, gen) -> Problem:
    q = _randn(gen, (mask.total_q, hq, d), device, dtype)
    k = _randn(gen, (mask.total_k, hkv, d), device, dtype)
    v = _randn(gen, (mask.total_k, hkv, d), device, dtype)
    return Problem(q, k, v, mask)


def _prefill(p, device, dtype, gen):
    return _dense(p["B"], p["S"], p["S"], p["Hq"], p["Hkv"], p["D"], Causal(), device, dtype, gen)


def _varlen(p, device, dtype, gen):
    return _packed(BlockDiagonal(p["lens"], causal=True), p["Hq"], p["Hkv"], p["D"], device, dtype, gen)


def _cfg(p, device, dtype, gen):
    return _packed(BlockDiagonal(p["q"], p["kv"]), p["Hq"], p["Hkv"], p["D"], device, dtype, gen)


def _decode(p, device, dtype, gen):
    return _dense(p["B"], 1, p["Sk"], p["Hq"], p["Hkv"], p["D"], Causal(), device, dtype, gen)


def _video(p, device, dtype, gen):
    return _dense(p["B"], p["S"], p["S"], p["H"], p["H"], p["D"], None, device, dtype, gen)


def _paged_decode(p, device, dtype, gen):
    """One new token per request against its cache, the caches in pages of ``page`` tokens scattered over a
    shared pool in a seeded random order (``attention(..., block_table=...)``)."""
    lens, page, hq, hkv, d = list(p["kv_lens"]), p["page"], p["Hq"], p["Hkv"], p["D"]
    pages = [-(-n // page) for n in lens]
    pool = sum(pages) + 4                       # a few pages no request owns
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(1)).tolist()
    table = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    start = 0
    for r, n in enumerate(pages):
        table[r, :n] = torch.tensor(order[start:start + n], dtype=torch.int32)
        start += n
    k_pool = _randn(gen, (pool, page, hkv, d), device, dtype)
    v_pool = _randn(gen, (pool, page, hkv, d), device, dtype)
    mask = BlockDiagonal([1] * len(lens), lens, causal=True)
    q = _randn(gen, (len(lens), hq, d), device, dtype)

    def contiguous(pool_):
        return torch.cat([pool_[table[r, :n].long().to(device)].flatten(0, 1)[:lens[r]] for r, n in enumerate(pages)])

    return Problem(q, k_pool, v_pool, mask, {"block_table": table.to(device)},
                   reference_kv=(contiguous(k_pool), contiguous(v_pool)))


def _video_sparse(p, device, dtype, gen):
    """``video`` with a block-sparse layout: every query block sees its own frame and the first frame, plus a
    seeded random ~``extra`` of the other key blocks (a top-k block selection's shape)."""
    s, bs, frames = p["S"], p["block"], p["frames"]
    nb = -(-s // bs)
    frame = torch.arange(nb) * bs * frames // s
    layout = (frame[:, None] == frame[None, :]) | (frame[None, :] == 0)
    layout |= torch.rand(nb, nb, generator=torch.Generator().manual_seed(2)) < p["extra"]
    mask = masks.BlockSparse(layout, bs)
    return _dense(p["B"], s, s, p["H"], p["H"], p["D"], mask, device, dtype, gen)


def _attention_takes(name: str):
    def needs() -> str | None:
        from .api import attention

        if name in inspect.signature(attention).parameters:
            return None
        return f"needs attention(..., {name}=...), which this attnlib does not have yet"
    return needs


def _mask_exists(name: str):
    def needs() -> str | None:
        return None if hasattr(masks, name) else f"needs attnlib.masks.{name}, which this attnlib does not have yet"
    return needs


def _always() -> str | None:
    return None


@dataclass(frozen=True)
class Workload:
    """A named benchmark: ``build(sizes, device, dtype, generator) -> Problem`` with ``sizes[device type]``
    (``cuda`` sizes on every accelerator); ``needs() -> reason or None`` skips it while a feature is missing."""

    name: str
    what: str
    build: Callable
    sizes: dict
    needs: Callable[[], str | None] = _always

    def params(self, device: torch.device) -> dict:
        return self.sizes["cpu" if device.type == "cpu" else "cuda"]


_VARLEN_CPU = (64, 317, 512, 133, 402, 96, 251, 480)

WORKLOADS: tuple[Workload, ...] = (
    Workload("prefill", "dense causal prefill (GQA 4)", _prefill,
             {"cpu": dict(B=1, S=2048, Hq=8, Hkv=2, D=64), "cuda": dict(B=2, S=8192, Hq=32, Hkv=8, D=128)}),
    Workload("varlen", "8 packed causal sequences of mixed lengths (THD)", _varlen,
             {"cpu": dict(lens=_VARLEN_CPU, Hq=8, Hkv=2, D=64),
              "cuda": dict(lens=tuple(8 * n for n in _VARLEN_CPU), Hq=32, Hkv=8, D=128)}),
    Workload("cfg", "2 CFG branches in one call, different text lengths (bidirectional, THD)", _cfg,
             {"cpu": dict(q=(1024, 1024), kv=(1250, 1101), Hq=8, Hkv=8, D=64),
              "cuda": dict(q=(4096, 4096), kv=(4608, 4173), Hq=24, Hkv=24, D=128)}),
    Workload("decode", "1 new token per sequence against its KV cache", _decode,
             {"cpu": dict(B=4, Sk=4096, Hq=32, Hkv=8, D=128), "cuda": dict(B=32, Sk=8192, Hq=32, Hkv=8, D=128)}),
    Workload("video", "video DiT self-attention, bidirectional (frames x 32 x 32 latent patches)", _video,
             {"cpu": dict(B=1, S=2048, H=8, D=64), "cuda": dict(B=1, S=16384, H=24, D=128)}),
    # paged KV: on as soon as attention() takes block_table
    Workload("paged_decode", "decode against caches in a shared page pool (block_table)", _paged_decode,
             {"cpu": dict(kv_lens=(600, 2048, 517, 1500), page=16, Hq=32, Hkv=8, D=128),
              "cuda": dict(kv_lens=tuple(512 + (i * 2689) % 15872 for i in range(32)), page=16, Hq=32, Hkv=8,
                           D=128)},
             needs=_attention_takes("block_table")),
    # block-sparse video attention: on as soon as attnlib.masks has BlockSparse
    Workload("video_sparse", "video with a block-sparse layout (own frame + first frame + ~10 % others)",
             _video_sparse,
             {"cpu": dict(B=1, S=1024, H=8, D=64, block=64, frames=8, extra=0.1),
              "cuda": dict(B=1, S=16384, H=24, D=128, block=128, frames=16, extra=0.1)},
             needs=_mask_exists("BlockSparse")),
)


def workload(name: str) -> Workload:
    for w in WORKLOADS:
        if w.name == name:
            return w
    raise KeyError(name)


# --mask values for --shape --------------------------------------------------------------------------
def _padding(b, sq, sk, device):
    """Row ``r`` of the batch keeps its first ``sk - r * sk // (2 * b)`` keys (right padding, up to ~half)."""
    keep = torch.tensor([sk - r * sk // (2 * b) for r in range(b)])
    return KeyPadding((torch.arange(sk)[None, :] < keep[:, None]).to(device))


@dataclass(frozen=True)
class UserMask:
    """A ``--mask`` choice: ``make(n, B, Sq, Sk, device)``; ``takes_int``: written ``name=N``."""

    name: str
    what: str
    make: Callable
    takes_int: bool = False
    needs: Callable[[], str | None] = _always


def _causal_field(name: str):
    def needs() -> str | None:
        if name in getattr(Causal, "__dataclass_fields__", {}):
            return None
        return f"needs Causal({name}=...), which this attnlib does not have yet"
    return needs


USER_MASKS: tuple[UserMask, ...] = (
    UserMask("none", "full attention", lambda n, b, sq, sk, dev: None),
    UserMask("causal", "Causal(): bottom-right (the KV-cache offset)", lambda n, b, sq, sk, dev: Causal()),
    UserMask("top_left", "Causal(align='top_left')", lambda n, b, sq, sk, dev: Causal(align="top_left")),
    UserMask("window", "Causal(window=N)", lambda n, b, sq, sk, dev: Causal(window=n), takes_int=True),
    UserMask("padding", "KeyPadding: batch row r right-padded by r * Sk / (2B) keys",
             lambda n, b, sq, sk, dev: _padding(b, sq, sk, dev)),
    UserMask("chunk", "Causal(chunk=N)", lambda n, b, sq, sk, dev: Causal(chunk=n), takes_int=True,
             needs=_causal_field("chunk")),
    UserMask("sink", "Causal(window=N, sink=4)", lambda n, b, sq, sk, dev: Causal(window=n, sink=4), takes_int=True,
             needs=_causal_field("sink")),
)


def parse_mask(text: str) -> tuple[UserMask, int | None]:
    name, _, arg = text.partition("=")
    known = {m.name: m for m in USER_MASKS}
    if name not in known:
        raise UsageError(f"--mask {text}: unknown; choose from {', '.join(_mask_usage(m) for m in USER_MASKS)}")
    m = known[name]
    why = m.needs()
    if why:
        raise UsageError(f"--mask {text}: {why}")
    if m.takes_int != bool(arg):
        raise UsageError(f"--mask {text}: write it as {_mask_usage(m)}")
    if not m.takes_int:
        return m, None
    try:
        n = int(arg)
    except ValueError:
        raise UsageError(f"--mask {text}: {name}=N needs a positive int") from None
    if n < 1:
        raise UsageError(f"--mask {text}: {name}=N needs a positive int")
    return m, n


def _mask_usage(m: UserMask) -> str:
    return f"{m.name}=N" if m.takes_int else m.name


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 6 or min(dims) < 1:
        raise UsageError(f"--shape {text}: give six positive ints B,Sq,Sk,Hq,Hkv,D (e.g. 1,4096,4096,32,8,128)")
    if dims[3] % dims[4]:
        raise UsageError(f"--shape {text}: Hq ({dims[3]}) must be a multiple of Hkv ({dims[4]})")
    return dims


def shape_workload(dims: tuple[int, ...], mask: UserMask, n: int | None) -> Workload:
    b, sq, sk, hq, hkv, d = dims
    label = _mask_usage(mask).replace("N", str(n)) if n is not None else mask.name

    def build(p, device, dtype, gen):
        return _dense(b, sq, sk, hq, hkv, d, lambda b_, sq_, sk_, dev: mask.make(n, b_, sq_, sk_, dev), device,
                      dtype, gen)
    return Workload(f"shape {','.join(map(str, dims))} {label}", "your shape (B,Sq,Sk,Hq,Hkv,D) and --mask", build,
                    {"cpu": {}, "cuda": {}})


# ---------------------------------------------------------------------------------------------------
# visible work
# ---------------------------------------------------------------------------------------------------
def _plain(mask) -> bool:
    """No option beyond the ones the closed forms below know (newer options count via ``materialize``)."""
    return getattr(mask, "chunk", None) is None and not getattr(mask, "sink", 0)


def _causal_rows(sq: int, sk: int, off: int, window: int | None) -> torch.Tensor:
    """Per query row: ``(lo, hi)`` of the visible key run under causal (diagonal ``off``) and ``window``."""
    i = torch.arange(sq, dtype=torch.int64)
    hi = torch.clamp(i + off, max=sk - 1)
    lo = torch.clamp(i + off - window + 1, min=0) if window else torch.zeros_like(i)
    return lo, hi


def _causal_pairs(sq: int, sk: int, off: int, window: int | None) -> int:
    lo, hi = _causal_rows(sq, sk, off, window)
    return int((hi - lo + 1).clamp(min=0).sum())


def visible_pairs(mask, batch: int, heads: int, seqlen_q: int, seqlen_k: int) -> int:
    """The (query, key) pairs ``mask`` lets through, summed over the batch and the query heads: the work a call
    must do (FLOPs = 2 * (D + Dv) per pair). Closed forms for the structured masks, ``materialize()`` else."""
    sq, sk = seqlen_q, seqlen_k
    if mask is None:
        return batch * heads * sq * sk
    if type(mask) is Causal and _plain(mask):
        return batch * heads * _causal_pairs(sq, sk, mask.offset(sq, sk), mask.window)
    if type(mask) is BlockDiagonal and _plain(mask):
        return heads * sum(_causal_pairs(q, k, k - q, mask.window) if mask.causal else q * k
                           for q, k in zip(mask.q_seqlens, mask.kv_seqlens))
    if type(mask) is KeyPadding and _plain(mask):
        valid = mask.valid.to("cpu", torch.int64)
        if not mask.causal:
            return heads * sq * int(valid.sum())
        prefix = torch.nn.functional.pad(valid.cumsum(-1), (1, 0))        # [B, Sk + 1]
        lo, hi = _causal_rows(sq, sk, sk - sq, mask.window)
        seen = (hi >= lo)
        counts = prefix[:, (hi + 1).clamp(min=0)] - prefix[:, lo.clamp(max=sk)]
        return heads * int((counts * seen).sum())
    if type(mask) is getattr(masks, "BlockSparse", None) and not mask.causal:
        (bq, bk), lay = mask.block_size, mask.layout.to("cpu", torch.int64)
        rows = torch.tensor([min(bq, sq - i) for i in range(0, sq, bq)])      # the last blocks may be partial
        cols = torch.tensor([min(bk, sk - j) for j in range(0, sk, bk)])
        repeat = batch * heads // math.prod(lay.shape[:-2])                 # layout [nQ, nK], [Hq, ...], [B, Hq, ...]
        return repeat * int((lay * (rows[:, None] * cols[None, :])).sum())
    m = mask.materialize(sq, sk, "cpu")
    target = (batch, heads, sq, sk)
    factor = 1
    for i in range(4):                       # broadcast dims (right-aligned) count once per batch row / head
        size = m.shape[i - m.dim()] if i >= 4 - m.dim() else 1
        factor *= target[i] if size == 1 and i < 2 else 1
    return factor * int(m.sum())


def problem_pairs(p: Problem) -> int:
    kv = p.reference_kv[0] if p.reference_kv is not None else p.k
    if p.packed:
        return visible_pairs(p.mask, 1, p.q.shape[1], p.q.shape[0], kv.shape[0])
    return visible_pairs(p.mask, p.q.shape[0], p.q.shape[2], p.q.shape[1], kv.shape[1])


def problem_flops(p: Problem) -> float:
    return 2.0 * (p.q.shape[-1] + p.v.shape[-1]) * problem_pairs(p)


# ---------------------------------------------------------------------------------------------------
# the check against math
# ---------------------------------------------------------------------------------------------------
def _head_independent(mask) -> bool:
    if mask is None or type(mask) in (Causal, BlockDiagonal, KeyPadding):
        return True
    if type(mask) is DenseMask:
        return mask.mask.dim() < 3 or mask.mask.shape[-3] == 1
    if type(mask) is getattr(masks, "BlockSparse", None):
        return mask.layout.dim() == 2
    return False


@dataclass
class Subset:
    """What the check compares: ``index`` into the output, and the inputs that produce that part."""

    index: tuple
    text: str


def check_subset(p: Problem) -> Subset:
    """The whole call when small; else the last query head with the kv head it reads (a wrong GQA mapping
    reads another one), and the last batch row when the mask does not depend on the batch."""
    kv = p.reference_kv[0] if p.reference_kv is not None else p.k
    b = 1 if p.packed else p.q.shape[0]
    hq, hkv = p.q.shape[-2], kv.shape[-2]
    sq, sk = p.q.shape[-3], kv.shape[-3]
    if b * hq * sq * sk <= FULL_CHECK_SCORES or not _head_independent(p.mask):
        return Subset((), "whole call")
    h, kh = hq - 1, hkv - 1
    heads = slice(h, h + 1)
    if p.packed:
        return Subset((slice(None), heads), f"query head {h} of {hq} (kv head {kh})")
    if b > 1 and (p.mask is None or type(p.mask) is Causal):
        return Subset((slice(b - 1, b), slice(None), heads), f"query head {h} of {hq} (kv head {kh}), batch row "
                                                             f"{b - 1} of {b}")
    return Subset((slice(None), slice(None), heads), f"query head {h} of {hq} (kv head {kh})")


def reference(p: Problem, subset: Subset):
    """``(ref64_out, naive_out)`` of the subset: float64 and same-dtype ``math`` (attnlib.testing)."""
    from .testing import reference_and_naive

    k, v = p.reference_kv if p.reference_kv is not None else (p.k, p.v)
    q = p.q[subset.index] if subset.index else p.q
    if subset.index:
        kv_index = subset.index[:-1] + (slice(k.shape[-2] - 1, k.shape[-2]),)
        k, v = k[kv_index], v[kv_index]
    scale = p.q.shape[-1] ** -0.5
    (ref, _), (naive, _) = reference_and_naive(q, k, v, p.mask, scale, packed=p.packed)
    return ref, naive


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, min_time: float, *, min_rounds: int = MIN_ROUNDS,
            max_rounds: int = MAX_ROUNDS) -> list[float]:
    """Seconds per call of ``fn`` (called once before, e.g. by the check): warm-up (1 call, then until ~10 % of
    ``min_time``), then enough rounds to fill ``min_time`` (``min_rounds`` .. ``max_rounds``). CUDA: an event
    pair around each call, one sync at the end; CPU: ``time.perf_counter`` around each call."""
    t0, n = time.perf_counter(), 0
    while n < 1 or (time.perf_counter() - t0 < 0.1 * min_time and n < 50):
        fn()
        _sync(device)
        n += 1
    per_call = (time.perf_counter() - t0) / n
    rounds = int(min(max_rounds, max(min_rounds, math.ceil(min_time / max(per_call, 1e-7)))))
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def timer_name(device: torch.device) -> str:
    return "torch.cuda.Event" if device.type == "cuda" else "time.perf_counter"


def stats(data: list[float]) -> dict:
    """pytest-benchmark's statistics of ``data`` (seconds), same definitions (quartiles: its methods 2/3)."""
    s = sorted(data)
    n = len(s)
    mean = statistics.mean(s)
    stddev = statistics.stdev(s) if n > 1 else 0.0
    if n == 1:
        q1 = q3 = s[0]
    elif n % 2:
        m, r = n // 4, n % 4
        q1 = 0.25 * s[m - 1] + 0.75 * s[m] if r == 1 else 0.75 * s[m] + 0.25 * s[m + 1]
        q3 = 0.75 * s[3 * m] + 0.25 * s[3 * m + 1] if r == 1 else 0.25 * s[3 * m + 1] + 0.75 * s[3 * m + 2]
    else:
        q1, q3 = statistics.median(s[: n // 2]), statistics.median(s[n // 2:])
    iqr = q3 - q1
    iqr_out = sum(1 for x in s if x < q1 - 1.5 * iqr or x > q3 + 1.5 * iqr)
    std_out = sum(1 for x in s if x < mean - stddev or x > mean + stddev)
    ld = s[0] if n == 1 else s[bisect_left(s, q1 - 1.5 * iqr)]
    hd = s[0] if n == 1 else s[bisect_right(s, q3 + 1.5 * iqr) - 1]
    total = sum(s)
    return {"min": s[0], "max": s[-1], "mean": mean, "stddev": stddev, "rounds": n, "median": statistics.median(s),
            "iqr": iqr, "q1": q1, "q3": q3, "iqr_outliers": iqr_out, "stddev_outliers": std_out,
            "outliers": f"{std_out};{iqr_out}", "ld15iqr": ld, "hd15iqr": hd, "ops": n / total if total else 0,
            "total": total, "data": list(data), "iterations": 1}


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One backend on one workload: timed (``times``), wrong (``check_ok`` False), or cannot serve (``why``)."""

    workload: str
    backend: str
    why: list = field(default_factory=list)
    times: list = field(default_factory=list)
    check: Any = None                  # attnlib.testing.Comparison
    error: str = ""                    # what it raised
    flops: float = 0.0
    implementation: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def tflops(self) -> float:
        return self.flops / self.median / 1e12 if self.times else float("nan")


@dataclass
class Section:
    """A workload's outcome: its rows, or ``skipped`` (a missing feature)."""

    workload: Workload
    rows: list = field(default_factory=list)
    skipped: str = ""
    problem_text: str = ""
    subset_text: str = ""
    pairs: int = 0
    density: float = 1.0

    def baseline(self) -> Row | None:
        return next((r for r in self.rows if r.backend == BASELINE and r.times), None)


def _why_not(name: str, p: Problem) -> list[str]:
    """The backend's reasons for this call (empty: it can serve it), through the validation a real call runs."""
    from .inputs import validate_call
    from .registry import get_backend

    call = validate_call(p.q, p.k, p.v, p.mask, **p.kwargs)
    return list(get_backend(name).why_not(call))


def run_workload(w: Workload, backends: list[str], device: torch.device, dtype: torch.dtype, min_time: float,
                 progress=None) -> Section:
    from .api import attention
    from .registry import get_backend
    from .testing import compare

    section = Section(w)
    why = w.needs()
    if why:
        section.skipped = why
        if progress:
            progress.update(advance=len(backends))
        return section
    gen = torch.Generator(device=device).manual_seed(0)
    p = w.build(w.params(device), device, dtype, gen)
    section.problem_text = p.describe()
    section.pairs = problem_pairs(p)
    kv = p.reference_kv[0] if p.reference_kv is not None else p.k
    full = (1 if p.packed else p.q.shape[0]) * p.q.shape[-2] * p.q.shape[-3] * kv.shape[-3]
    section.density = section.pairs / full
    subset = check_subset(p)
    section.subset_text = subset.text
    ref = None
    flops = problem_flops(p)
    for name in backends:
        row = Row(w.name, name, flops=flops, implementation=get_backend(name).implementation or "")
        section.rows.append(row)
        if progress:
            progress.update(f"{w.name}: {name}, checking")
        row.why = _why_not(name, p)
        if row.why:
            if progress:
                progress.update(advance=1)
            continue

        def call(name=name):
            return attention(p.q, p.k, p.v, p.mask, backend=name, **p.kwargs)

        try:
            with torch.no_grad():
                out = call()                                  # also compiles (flex) before anything is timed
                if ref is None:
                    ref = reference(p, subset)
                row.check = compare(out[subset.index] if subset.index else out, ref[0], ref[1], dtype, "out")
                del out
                if row.check.passed:
                    if progress:
                        progress.update(f"{w.name}: {name}, timing")
                    row.times = measure(call, device, min_time)
        except Exception as e:  # noqa: BLE001 - a backend that raises is reported, the others still run
            row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            row.times = []
        if progress:
            progress.update(advance=1)
    return section


# ---------------------------------------------------------------------------------------------------
# output: table, JSON, chart
# ---------------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"processor": platform.processor(), "machine": platform.machine(),
            "python_implementation": platform.python_implementation(), "python_version": platform.python_version(),
            "system": platform.system(), "release": platform.release(),
            "cpu": {"brand_raw": cpu, "count": os.cpu_count()}}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


def _busy(meta: dict) -> str:
    """A warning when the CPU had more work than cores: timings then include waiting for a core (each torch
    thread a call uses must be scheduled), small calls most of all."""
    cores = meta["machine_info"]["cpu"]["count"] or 1
    try:
        load = max(float(meta["load_before"].split()[0]), float(meta["load_after"].split()[0]))
    except (ValueError, IndexError):
        return ""
    if load <= cores:
        return ""
    return (f"note: the load average ({load:.1f}) exceeded the {cores} cores: other processes competed for the CPU "
            f"and times include waiting for it; rerun on a quiet machine (or with OMP_NUM_THREADS=1) to compare")


def device_text(meta: dict) -> str:
    mi = meta["machine_info"]
    cpu = f"{mi['cpu']['brand_raw']}, {mi['cpu']['count']} cores"
    return f"{mi['gpu']} ({cpu})" if "gpu" in mi else cpu


def flops_unit(device_type: str) -> tuple[str, float]:
    """Throughput unit of the table and chart: TFLOP/s on accelerators, GFLOP/s on a CPU."""
    return ("GFLOP/s", 1e9) if device_type == "cpu" else ("TFLOP/s", 1e12)


def format_table(sections: list[Section], meta: dict, unavailable: list[dict]) -> str:
    lines = [f"attnlib bench: {meta['dtype']} on {meta['device']} ({device_text(meta)}), torch {meta['torch']}; "
             f"median of >= {MIN_ROUNDS} calls filling {meta['min_time']:g} s ({meta['timer']}) after warm-up; "
             f"every backend checked against float64 math first", ""]
    unit, per = flops_unit(meta["device"])
    head = f"  {'backend':10s} {'median ms':>10s} {'IQR ms':>8s} {unit:>8s} {f'vs {BASELINE}':>8s} " \
           f"{'calls':>6s}  check: max|err| / tol"
    for s in sections:
        lines.append(f"{s.workload.name}: {s.workload.what}")
        if s.skipped:
            lines += [f"  skipped: {s.skipped}", ""]
            continue
        lines.append(f"  {s.problem_text}; {s.pairs / 1e6:.4g}M visible (query, key) pairs x heads "
                     f"({100 * s.density:.3g} %)")
        lines.append(head)
        base = s.baseline()
        for r in s.rows:
            if r.why:
                continue
            if r.error:
                lines.append(f"  {r.backend:10s} {'-':>10s} {'-':>8s} {'-':>8s} {'-':>8s} {'-':>6s}  ERROR: {r.error}")
                continue
            err = f"{r.check.error:.1e} / {r.check.tol:.1e} " + ("ok" if r.check.passed else "WRONG: not timed")
            if not r.times:
                lines.append(f"  {r.backend:10s} {'-':>10s} {'-':>8s} {'-':>8s} {'-':>8s} {'-':>6s}  {err}")
                continue
            st = stats(r.times)
            ratio = f"{r.median / base.median:.2f}x" if base else "-"
            rate = r.flops / r.median / per
            lines.append(f"  {r.backend:10s} {1e3 * r.median:10.3f} {1e3 * st['iqr']:8.3f} {rate:8.3g} "
                         f"{ratio:>8s} {st['rounds']:6d}  {err}")
        for r in s.rows:
            if r.why:
                lines.append(f"  {r.backend}: cannot serve this call: {'; '.join(r.why)}")
        lines.append(f"  checked: {s.subset_text}")
        lines.append("")
    for r in unavailable:
        lines.append(f"not run: {r['name']}: {r['reason']}")
    busy = _busy(meta)
    if busy:
        lines.append(busy)
    lines.append(f"machine: {device_text(meta)}; load average {meta['load_before']} before, {meta['load_after']} "
                 f"after; {meta['datetime'][:19]} UTC; {meta['seconds']:.0f} s")
    return "\n".join(lines)


def to_json(sections: list[Section], meta: dict) -> dict:
    """pytest-benchmark's JSON layout: ``pytest-benchmark compare`` and ``bench/report.py`` read it."""
    benchmarks = []
    for s in sections:
        base = s.baseline()
        for r in s.rows:
            if not r.times:
                continue
            name = f"{s.workload.name}[{r.backend}]"
            extra = {"variant": r.backend, "baseline": r.backend == BASELINE, "backend": r.backend,
                     "implementation": r.implementation, "workload": s.workload.name, "call": s.problem_text,
                     "dtype": meta["dtype"], "device": meta["device"], "torch": meta["torch"],
                     "visible_pairs": s.pairs, "flops": r.flops, "tflops": r.tflops,
                     "ratio_to_baseline": r.median / base.median if base else None,
                     "check": {"error": r.check.error, "tol": r.check.tol, "naive": r.check.naive,
                               "on": s.subset_text}}
            benchmarks.append({"group": f"{s.workload.name}: {s.problem_text}", "name": name,
                               "fullname": f"attnlib bench::{name}", "params": {"backend": r.backend},
                               "param": r.backend, "extra_info": extra,
                               "options": {"timer": meta["timer"], "min_time": meta["min_time"],
                                           "min_rounds": MIN_ROUNDS, "max_time": None, "warmup": True,
                                           "disable_gc": False},
                               "stats": stats(r.times)})
    return {"machine_info": meta["machine_info"], "commit_info": {}, "benchmarks": benchmarks,
            "datetime": meta["datetime"], "version": meta["attnlib"], "attnlib": meta["attnlib"],
            "load_average": {"before": meta["load_before"], "after": meta["load_after"]}}


def plot(sections: list[Section], meta: dict, path: str) -> None:
    """A PNG: per workload, a bar per backend of the visible work's FLOP/s, labelled with ms and the ratio to sdpa."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit, per = flops_unit(meta["device"])
    shown = [s for s in sections if any(r.times for r in s.rows)]
    names = sorted({r.backend for s in shown for r in s.rows if r.times},
                   key=lambda n: (n != BASELINE, n))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 1.1 + 1.0 * sum(
        max(1, sum(1 for r in s.rows if r.times)) * 0.42 + 0.5 for s in shown)), squeeze=False)
    for ax, s in zip(axes[:, 0], shown):
        rows = sorted((r for r in s.rows if r.times), key=lambda r: (r.backend != BASELINE, r.backend))
        base = s.baseline()
        y = list(range(len(rows)))
        rate = [r.flops / r.median / per for r in rows]
        ax.barh(y, rate, color=[colors[r.backend] for r in rows], height=0.7)
        ax.set_yticks(y, [r.backend for r in rows])
        ax.invert_yaxis()
        top = max(rate)
        for i, r, x in zip(y, rows, rate):
            ratio = f", {r.median / base.median:.2f}x the time of {BASELINE}" if base and r is not base else ""
            ax.text(x + top * 0.01, i, f"{1e3 * r.median:.3g} ms{ratio}", va="center", fontsize=8)
        ax.set_xlim(0, top * 1.45)
        ax.set_title(f"{s.workload.name}: {s.workload.what}", fontsize=9, loc="left")
        ax.set_xlabel(unit, fontsize=8, labelpad=1)
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"attnlib bench: {unit} of the visible work (longer bar = faster), {meta['dtype']}\n"
                 f"{device_text(meta)}", fontsize=10)
    fig.text(0.01, 0.005, f"{meta['datetime'][:10]}, load average {meta['load_before']} before the run; torch "
             f"{meta['torch']}, attnlib {meta['attnlib']}\nmedian of >= {MIN_ROUNDS} calls ({meta['timer']}); every "
             f"backend checked against float64 math first", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workloads", action="append", metavar="NAMES",
                   help=f"comma-separated workloads (default: all, or none when --shape is given): "
                        f"{', '.join(w.name for w in WORKLOADS)}")
    p.add_argument("--shape", action="append", metavar="B,Sq,Sk,Hq,Hkv,D",
                   help="also time this dense BSHD call (repeatable), with --mask")
    p.add_argument("--mask", action="append", metavar="MASK",
                   help="mask of the --shape calls: once for all, or once per --shape in order (default causal): "
                        f"{', '.join(_mask_usage(m) for m in USER_MASKS)}")
    p.add_argument("--backends", action="append", metavar="NAMES",
                   help="comma-separated backends (default: every available one but math, the reference)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--min-time", type=float, metavar="S",
                   help=f"seconds of timed calls per measurement (default: {DEFAULT_MIN_TIME['cpu']} on cpu, "
                        f"{DEFAULT_MIN_TIME['cuda']} on cuda)")
    p.add_argument("--json", metavar="PATH", help="write pytest-benchmark-compatible JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG chart (needs matplotlib: pip install attnlib[plot])")
    p.add_argument("--list", action="store_true", help="list the workloads and --mask choices, then exit")


def _split(values) -> list[str]:
    return [x.strip() for v in values or () for x in v.split(",") if x.strip()]


def _plan(args):
    """``(device, dtype, workloads, backends, unavailable)`` or ``UsageError``."""
    from .registry import list_backends

    dev = device_arg(args.device)
    device = torch.device(dev)
    dtype = DTYPES[args.dtype or DEFAULT_DTYPE[dev]]
    if args.min_time is not None and not args.min_time > 0:
        raise UsageError(f"--min-time {args.min_time:g}: give the seconds of timed calls per measurement (> 0)")
    known = {w.name: w for w in WORKLOADS}
    names = _split(args.workloads)
    wrong = [n for n in names if n not in known]
    if wrong:
        raise UsageError(f"--workloads {','.join(wrong)}: unknown; choose from {', '.join(known)}")
    chosen = [known[n] for n in names] if names else ([] if args.shape else list(WORKLOADS))
    shapes, mask_args = args.shape or [], args.mask or ["causal"]
    if mask_args != ["causal"] and not shapes:
        raise UsageError("--mask applies to --shape calls: give --shape B,Sq,Sk,Hq,Hkv,D too")
    if shapes and len(mask_args) not in (1, len(shapes)):
        raise UsageError(f"--mask: give one (for every --shape) or one per --shape ({len(shapes)}), got "
                         f"{len(mask_args)}")
    for i, text in enumerate(shapes):
        mask, n = parse_mask(mask_args[i if len(mask_args) > 1 else 0])
        chosen.append(shape_workload(parse_shape(text), mask, n))
    rows = {r["name"]: r for r in list_backends()}
    backends, unavailable = backend_args(_split(args.backends), "--backends",
                                         "compare (or leave --backends out for all)")
    if _split(args.backends):
        if not backends:
            raise UsageError("--backends: none of them can run here: " + "; ".join(
                f"{r['name']}: {r['reason']}" for r in unavailable))
    else:
        backends = [n for n, r in rows.items() if r["available"] and n != "math"]
        unavailable = [r for r in rows.values() if not r["available"]]
        if dev == "cpu" and "triton" in backends:       # the interpreter: hours at these sizes
            backends.remove("triton")
            unavailable.append({"name": "triton", "reason": "runs interpreted on the CPU (TRITON_INTERPRET=1): "
                                                            "name it with --backends to time it anyway"})
    backends.sort(key=lambda n: n != BASELINE)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'attnlib[plot]' (or matplotlib)") from None
    return device, dtype, chosen, backends, unavailable


def list_text() -> str:
    lines = ["workloads (cpu sizes / cuda sizes):"]
    for w in WORKLOADS:
        state = w.needs()
        lines.append(f"  {w.name:13s} {w.what}" + (f"  [skipped: {state}]" if state else ""))
        for dev in ("cpu", "cuda"):
            sizes = ", ".join(f"{k}={_lens_text(v) if isinstance(v, tuple) else v}" for k, v in w.sizes[dev].items())
            lines.append(f"  {'':13s} {dev + ':':5s} {sizes}")
    lines.append("--mask choices for --shape:")
    for m in USER_MASKS:
        state = m.needs()
        lines.append(f"  {_mask_usage(m):13s} {m.what}" + (f"  [unavailable: {state}]" if state else ""))
    return "\n".join(lines)


def main(args) -> int:
    """``attnlib bench``; exit status 0, 1 when a backend gave a wrong result or nothing was timed, 2 on bad
    arguments."""
    from . import __version__
    from .progress import Progress

    if args.list:
        print(list_text())
        return 0
    try:
        device, dtype, chosen, backends, unavailable = _plan(args)
    except UsageError as e:
        print(f"attnlib bench: {e}", file=sys.stderr)
        return 2
    min_time = args.min_time or DEFAULT_MIN_TIME["cpu" if device.type == "cpu" else "cuda"]
    meta = {"device": device.type, "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
            "attnlib": __version__, "min_time": min_time, "timer": timer_name(device),
            "machine_info": machine_info(device), "load_before": _load(),
            "datetime": datetime.now(timezone.utc).isoformat()}
    progress = Progress(len(chosen) * len(backends), "attnlib bench", interval=10.0)
    t0 = time.perf_counter()
    sections = []
    try:
        for w in chosen:
            sections.append(run_workload(w, backends, device, dtype, min_time, progress))
    finally:
        progress.close()
    meta.update(seconds=time.perf_counter() - t0, load_after=_load())
    print(format_table(sections, meta, unavailable))
    wrong = [r for s in sections for r in s.rows if r.error or r.check is not None and not r.check.passed]
    timed = [r for s in sections for r in s.rows if r.times]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(sections, meta), f, indent=1)
        print(f"wrote {args.json} (pytest-benchmark compare {args.json})")
    if args.plot and timed:
        plot(sections, meta, args.plot)
        print(f"wrote {args.plot}")
    if wrong:
        print(f"FAILED: {', '.join(f'{r.backend} on {r.workload}' for r in wrong)} raised or disagreed with math "
              f"(not timed)")
        return 1
    if not timed:
        print("FAILED: nothing was timed (no backend could serve the workloads asked for)")
        return 1
    return 0
