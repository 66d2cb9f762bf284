"""``flex``: ``torch.nn.attention.flex_attention``, compiled with ``torch.compile``.

On CPU inductor generates a C++ kernel, on CUDA a Triton one. The call's plan (:mod:`attnlib.plan`)
becomes a ``mask_mod`` (and a ``score_mod`` for the score modifiers) made of these parts, and a
``BlockMask`` built from the plan itself, once per (plan, shape, device), kept in a bounded LRU so
repeated layers reuse it:

=================  ================================================================================
part               mask_mod
=================  ================================================================================
``runs``           the key runs of each row by structure: ``lo[r, i] <= j <= hi[r, i]`` for ``r < R``
                   (``Plan.runs_table``, int32 lookup tensors; ``R`` is 2 for sink + window): one compiled
                   kernel serves full, causal, windowed, chunked and varlen calls alike. Left out when
                   the structure hides nothing and a tensor restriction follows.
``key_padding``    ``valid[b, j]`` (any pattern: left, right, holes)
``dense_bool``     ``mask[b, h, i, j]`` (index 0 along the mask's broadcast dims, no expanded copy)
``dense_bias``     ``bias[b, h, i, j] > -inf``; the ``score_mod`` adds the bias
``block_sparse``   ``layout[b, h, (i + q0) // bq, (j + k0) // bk]`` (``q0``/``k0``: a restricted plan's
                   origin; the layout is padded so that padded rows and keys land on hidden blocks)
=================  ================================================================================

``score_mod``: ``softcap`` (``c * tanh(s / c)``), then ALiBi (``- slope[b, h] * |aligned[i] - j|``), then the
dense bias. Sinks go through the LSE (the dispatch).

The ``BlockMask`` lists, per (query tile, key tile), whether any pair may be visible and whether every pair
is: from the runs table per row (exact for one run per row), the key validity per key tile, the dense
mask reduced per tile, and the block layout through 2-D prefix sums at its own block size. Tiles that see
nothing are never read by the kernel (no ``create_block_mask`` over the whole ``Sq x Sk`` grid); whole tiles
skip the mask_mod. A tile may be listed without a visible pair (the mask_mod then hides every pair), never
as whole unless it is.

Inside a caller's ``torch.compile`` the lowering runs at trace time and becomes part of the graph; on CPU
each tensor the mods read passes through one opaque copy (``attnlib::flex_buffer``), without which
inductor's C++ flex template cannot lower a mod that reads a tensor computed in the graph.

Paged KV: the dispatch gathers the visible pages into contiguous keys. torch's paged flex support
(``torch.nn.attention.experimental._paged_attention``, private and experimental in torch 2.13) maps one
request per batch row through a physical-to-logical table; attnlib's paged calls pack several requests
(prefill and decode mixed) along one token axis, and on CPU the kernel would walk the pool in 64-slot tiles.

Compiled functions are cached per (device type, family, dtype, head dims, head counts, LSE, scale; flex bakes
the scale into the kernel, and the default ``D ** -0.5`` adds no key of its own): each key gets its
own copy of the entry function's code object, so dynamo keeps a separate cache per key and shape-only
changes recompile (automatic dynamic shapes) under that key's own recompile limit instead of exhausting
a shared one; a key that still exceeds it starts over with a fresh code object. ``cache_info()`` counts
block masks built, compiled functions created and graphs compiled.

Tensors: BSHD in, flex takes BHSD (transposed views, no copy); packed THD is batch 1.

- GQA: ``enable_gqa=True``.
- LSE: on CUDA flex returns it (natural log since torch 2.5; the kernel's base-2 value is converted by
  the ``flex_attention`` front end). torch's CPU flex kernel is inference-only and cannot return the LSE
  (torch 2.13), so on CPU the LSE is a second, exact float32 pass over query chunks, each restricted to the
  key span its rows can see (the runs table makes varlen calls cost their blocks, not ``T^2``), with the
  lowering's own mask_mod and score_mod evaluated on index grids.
- Rows with no visible key: output 0, LSE ``-inf`` (enforced after the kernel on every path).
- Autograd: CUDA only (torch's CPU flex kernel has no backward): reported in ``why_not``.
- CPU shape guard (torch's CPU flex kernel, every torch version that has it, up to at least 2.13): when
  dynamo recompiles a flex call for a second shape it makes the sizes symbolic, and inductor's C++ flex
  template then indexes the mask_mod's captured tensors with the wrong size symbol: silently wrong outputs
  (NaN included) or "index out of bounds" errors, for some shapes, depending on which shapes were compiled
  before in the process (reproduction: ``scripts/repro_torch_flex_cpu_dynamic.py``). On CPU every call is
  therefore compiled for static shapes, and to bound the compile count the query and key lengths are
  padded up to a bucket (``_bucket``: keys to 16/32/64 then multiples of 64; queries to a power of 2 up to
  64, then multiples of 64). Padded keys are hidden by the mask (no padded key is ever visible), padded
  query rows are sliced off; head dims below 32 are zero-padded to 32 (lengths ≡ 8 mod 16 and head dims
  8/16 were among the reported wrong results): the result is exactly the unpadded call's.
  ``ATTNLIB_FLEX_CPU_GUARD=0`` turns the guard off (to check whether a torch build still needs it).
- Head dims: CPU takes any. On CUDA dims below 16 (and non-powers of 2 before torch 2.6) are zero-padded
  (zero columns change no score; padded value columns are sliced off).
"""
from __future__ import annotations

import operator
import os
import shutil
import threading
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import settings
from ..caching import probe
from ..inputs import AttentionCall
from ..plan import Plan
from .base import Backend, Capabilities

_NEG_INF = float("-inf")
_MIN_TORCH = (2, 5)
#: bounded caches: lowered masks (block masks + lookup tensors) and compiled entry functions
PLAN_CACHE_SIZE = 64
COMPILED_CACHE_SIZE = 32
#: BlockMask tile (queries x keys) per device type. 64 on CPU: ragged varlen blocks waste less work in
#: partially visible tiles (bench/results/flex_cpu.md: 64 beat 128 by 15-20 % on varlen, equal on dense);
#: CUDA keeps flex's default (128), which its Triton kernels are tuned for.
BLOCK_SIZE = {"cpu": 64}
#: flex's own default tile (``torch.nn.attention.flex_attention``'s ``_DEFAULT_SPARSE_BLOCK_SIZE``)
_DEFAULT_BLOCK = 128
#: the CPU shape guard (module docstring); ``ATTNLIB_FLEX_CPU_GUARD=0`` disables it
ENV_CPU_GUARD = settings.FLEX_CPU_GUARD
#: the padded shapes' granularity above 64 (one BlockMask tile on CPU) and the smallest key bucket
_BUCKET_STEP = 64
_MIN_KEY_BUCKET = 16
#: what padded query rows and keys hold (hidden keys contribute nothing whatever they hold: a test sets it)
_PAD_VALUE = 0.0
#: head dims 8 and 16 were among the wrong CPU results reported: under the guard the kernel gets >= 32
_MIN_CPU_HEAD_DIM = 32
#: CPU LSE pass: score elements per chunk (float32), bounding its temporary memory to ~32 MiB
_LSE_CHUNK_ELEMS = 1 << 23


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):  # pragma: no cover - exotic version strings
        return (0, 0)


@probe
def _flex_module():
    """``(module, None)`` or ``(None, reason)``."""
    if _torch_version() < _MIN_TORCH:
        return None, (f"flex needs torch >= {_MIN_TORCH[0]}.{_MIN_TORCH[1]} (torch.nn.attention.flex_attention); "
                      f"this is torch {torch.__version__}")
    try:
        from torch.nn.attention import flex_attention as fa
    except Exception as e:  # ImportError, or a broken torch install
        return None, f"torch.nn.attention.flex_attention failed to import: {e}"
    return fa, None


@probe
def _environment_reason() -> str | None:
    fa, reason = _flex_module()
    if reason:
        return reason
    try:
        supported = torch._dynamo.is_dynamo_supported()
    except Exception as e:  # pragma: no cover
        return f"torch.compile is not usable: {e}"
    if not supported:
        import sys
        return f"torch.compile (dynamo) is not supported on Python {sys.version.split()[0]}; flex needs it"
    return None


@probe
def _cpu_reason() -> str | None:
    """Why inductor cannot build flex's C++ kernel here (None: it can)."""
    import sys
    cxx = os.environ.get(settings.CXX)
    found = shutil.which(cxx) if cxx else None
    if not found:
        found = next((shutil.which(c) for c in ("g++", "clang++", "c++") if shutil.which(c)), None)
    if not found:
        return ("device=cpu needs a C++ compiler for torch.compile's inductor C++ kernels and none was found "
                "(install g++ or clang++, or set CXX)")
    try:
        from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported
    except Exception:
        check_cpu_supported = None
    if check_cpu_supported is not None and not check_cpu_supported():
        return ("device=cpu: torch's CPU flex kernel needs an x86 CPU with AVX2 (and ATEN_CPU_CAPABILITY != "
                f"default, not macOS); this machine/platform ({sys.platform}) does not qualify")
    return None


@probe
def _cuda_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"device=cuda needs triton for torch.compile's flex kernels: {e}"
    return None


def cpu_guard_enabled() -> bool:
    """True unless ``ATTNLIB_FLEX_CPU_GUARD`` is ``0``/``false``/``off`` (read per call: tests flip it)."""
    return os.environ.get(ENV_CPU_GUARD, "1").strip().lower() not in settings.FLEX_CPU_GUARD_OFF


def _bucket(n: int, *, minimum: int = 1) -> int:
    """The padded length for ``n``: a power of 2 (at least ``minimum``) up to 64, then a multiple of 64."""
    n = max(n, minimum)
    if n <= _BUCKET_STEP:
        return 1 << (n - 1).bit_length()
    return -(-n // _BUCKET_STEP) * _BUCKET_STEP


def _lse_kwargs() -> dict:
    """How to ask this torch's flex for the LSE (``return_aux`` from torch 2.9, ``return_lse`` before)."""
    fa, _ = _flex_module()
    if hasattr(fa, "AuxRequest"):
        return {"return_aux": fa.AuxRequest(lse=True)}
    return {"return_lse": True}


# ---------------------------------------------------------------------------------------------
# capabilities and reasons
# ---------------------------------------------------------------------------------------------
class FlexBackend(Backend):
    name = "flex"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        features=frozenset({"causal", "window", "block_diagonal", "key_padding", "dense", "multi_tile",
                            "block_sparse", "softcap", "alibi"}),
        autograd=frozenset({"cuda"}),  # torch's CPU flex kernel has no backward
    )
    implementation = (f"torch {torch.__version__} flex_attention + torch.compile "
                      "(inductor C++ kernel on CPU, Triton on CUDA)")

    def unavailable_reason(self) -> str | None:
        return _environment_reason()

    def run_probes(self) -> None:
        if self.unavailable_reason() is None:
            _cpu_reason()
            _cuda_reason()

    def extra_reasons(self, call: AttentionCall) -> list[str]:
        out = []
        dev = call.device.type
        if dev == "cpu":
            r = _cpu_reason()
            if r:
                out.append(r)
        elif dev == "cuda":
            r = _cuda_reason()
            if r:
                out.append(r)
        return out

    def forward(self, call: AttentionCall):
        return _forward(call)

    # -- cache introspection (tests, ``attnlib info``) -------------------------------------------
    @staticmethod
    def cache_info() -> dict:
        """Counters: ``block_masks`` built, ``compiled_functions`` created, ``graph_compiles`` by dynamo,
        plus current cache sizes ``plans`` and ``functions``."""
        with _LOCK:
            info = dict(_STATS)
            info["plans"] = len(_PLANS)
            info["functions"] = len(_COMPILED)
        return info

    @staticmethod
    def clear_cache(*, plans: bool = True, compiled: bool = True) -> None:
        """Drop cached block masks and/or compiled functions (counters keep counting)."""
        with _LOCK:
            if plans:
                _PLANS.clear()
            if compiled:
                _COMPILED.clear()


_LOCK = threading.RLock()
_STATS = {"block_masks": 0, "compiled_functions": 0, "graph_compiles": 0}
_PLANS: "OrderedDict[tuple, _Lowered]" = OrderedDict()
_COMPILED: "OrderedDict[tuple, Callable]" = OrderedDict()


def _lru_get(cache: OrderedDict, key):
    with _LOCK:
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
        return hit


def _lru_put(cache: OrderedDict, key, value, size: int):
    with _LOCK:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > size:
            cache.popitem(last=False)


# ---------------------------------------------------------------------------------------------
# lowering: one _Lowered (block mask + mask_mod + score_mod) per plan, shape and device
# ---------------------------------------------------------------------------------------------
@dataclass
class _Lowered:
    """A plan in flex's terms. ``family`` names the mask_mod's parts (``runs``, ``key_padding``,
    ``dense_bool``, ``dense_bias``, ``block_sparse``, joined by ``+``)."""

    family: str
    block_mask: Any = None
    mask_mod: Callable | None = None
    score_mod: Callable | None = None
    #: CPU copies of the runs table (lo, hi) for the LSE pass's per-chunk key spans
    lo_hi_cpu: tuple | None = None
    #: the tensors this lowering was built from (key validity, dense mask, layout, ALiBi slopes):
    #: identity-checked on every cache hit
    anchors: tuple = ()


# The tensors a mask_mod or score_mod reads, when built inside a compiled region on CPU, pass through one
# opaque copy: inductor's C++ flex template (torch 2.13, and torch's main branch as of this writing) lists the
# mods' captured buffers by name before it materializes them, so a captured tensor computed in the graph
# (every lookup table attnlib builds at trace time) fails with "NoValidChoicesError: No choices to select"
# (the template's NotImplementedError from ``Pointwise.get_name``, swallowed). An extern kernel's output
# always has a name. Captured graph inputs need nothing; CUDA's Triton template realizes them first.
if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):
    @torch.library.custom_op("attnlib::flex_buffer", mutates_args=())
    def _flex_buffer(x: torch.Tensor) -> torch.Tensor:
        return x.clone(memory_format=torch.contiguous_format)

    @_flex_buffer.register_fake
    def _flex_buffer_fake(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)
else:  # pragma: no cover - torch < 2.4 has no flex either
    _flex_buffer = None


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a buffer of its own (see above); no gradient flows through torch's CPU flex kernel."""
    return _flex_buffer(t.detach())


# mask_mod / score_mod factories. Each family has one code object, so dynamo compiles a kernel once per
# family and treats the closure tensors as inputs (shape guards only, never values). They are written with
# broadcasting tensor ops, so the CPU LSE pass evaluates them on index grids too.
def _at(t4: torch.Tensor):
    """``t4[b, h, q, kv]`` with index 0 along the broadcast (size-1) dims of a 4-D tensor."""
    keep_b, keep_h, keep_q, keep_k = (n != 1 for n in t4.shape)

    def value(b, h, q_idx, kv_idx):
        return t4[b if keep_b else 0, h if keep_h else 0, q_idx if keep_q else 0, kv_idx if keep_k else 0]
    return value


def _runs_mod(lo: torch.Tensor, hi: torch.Tensor):
    """Row q sees the key runs ``lo[r, q] <= kv <= hi[r, q]`` (``r < R``, a static size)."""
    def mask_mod(b, h, q_idx, kv_idx):
        m = (kv_idx >= lo[0, q_idx]) & (kv_idx <= hi[0, q_idx])
        for r in range(1, lo.shape[0]):
            m = m | ((kv_idx >= lo[r, q_idx]) & (kv_idx <= hi[r, q_idx]))
        return m
    return mask_mod


def _key_padding_mod(valid: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return valid[b, kv_idx]
    return mask_mod


def _dense_bool_mod(mask4: torch.Tensor):
    at = _at(mask4)

    def mask_mod(b, h, q_idx, kv_idx):
        return at(b, h, q_idx, kv_idx)
    return mask_mod


def _dense_finite_mod(bias4: torch.Tensor):
    at = _at(bias4)

    def mask_mod(b, h, q_idx, kv_idx):
        return at(b, h, q_idx, kv_idx) > _NEG_INF
    return mask_mod


def _block_sparse_mod(layout4: torch.Tensor, bq: int, bk: int, q0: int, k0: int):
    """``layout[b, h, (q + q0) // bq, (kv + k0) // bk]`` (``q0``/``k0``: a restricted plan's origin)."""
    keep_b, keep_h = layout4.shape[0] != 1, layout4.shape[1] != 1

    def mask_mod(b, h, q_idx, kv_idx):
        return layout4[b if keep_b else 0, h if keep_h else 0, (q_idx + q0) // bq, (kv_idx + k0) // bk]
    return mask_mod


def _both(first, second):
    """The conjunction of two mask_mods (either may be None)."""
    if first is None or second is None:
        return first if second is None else second

    def mask_mod(b, h, q_idx, kv_idx):
        return first(b, h, q_idx, kv_idx) & second(b, h, q_idx, kv_idx)
    return mask_mod


def _score_mod(softcap: float | None, slopes: torch.Tensor | None, aligned: torch.Tensor | None,
               bias4: torch.Tensor | None):
    """softcap, then ALiBi (``- slope[b, h] * |aligned[q] - kv|``), then an additive dense bias; None if none."""
    if softcap is None and slopes is None and bias4 is None:
        return None
    bias = None if bias4 is None else _at(bias4)

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            score = score - slopes[b, h] * (aligned[q_idx] - kv_idx).abs()
        if bias is not None:
            score = score + bias(b, h, q_idx, kv_idx)
        return score
    return score_mod


# block structure from the plan: which (query block, key block) tiles hold a visible pair ("meets") and
# which are visible whole ("covers"; the kernel skips the mask_mod there). Tiles that meet nothing are not
# listed, so the kernel never reads them. A tile may be listed as meeting when it does not (the mask_mod
# then hides it pair by pair); it is never listed as whole unless it is. Tiles that stick out past the
# padded lengths are never whole (as in torch's create_block_mask).
def _runs_blocks(lo: torch.Tensor, hi: torch.Tensor, psq: int, psk: int, bq: int, bk: int):
    """``(meets, covers)`` bool ``[nQ, nK]`` of the runs table ``lo``/``hi`` ``[R, psq]``."""
    nq, nk = -(-psq // bq), -(-psk // bk)
    first = torch.arange(nk, device=lo.device, dtype=torch.int32) * bk
    last = first + (bk - 1)
    lo3, hi3 = lo[:, :, None], hi[:, :, None]
    meets = ((lo3 <= last) & (hi3 >= first) & (hi3 >= lo3)).any(0)          # [psq, nK]
    covers = ((lo3 <= first) & (hi3 >= last)).any(0)
    return (_pad_dim(meets, 0, nq * bq, False).view(nq, bq, nk).any(1),
            _pad_dim(covers, 0, nq * bq, False).view(nq, bq, nk).all(1))


def _token_blocks(vis4: torch.Tensor, psq: int, psk: int, bq: int, bk: int):
    """``(meets, covers)`` of a bool ``[B?, H?, Sq', Sk']`` visibility (size-1 dims broadcast) per tile."""
    meets, covers = vis4, vis4
    for dim, n, size in ((2, -(-psq // bq), bq), (3, -(-psk // bk), bk)):
        if vis4.shape[dim] == 1:
            continue
        def split(x, reduce):
            x = _pad_dim(x, dim, n * size, False)
            return reduce(x.reshape(x.shape[:dim] + (n, size) + x.shape[dim + 1:]), dim + 1)
        meets = split(meets, torch.any)
        covers = split(covers, torch.all)
    return meets, covers


def _layout_blocks(lay4: torch.Tensor, sp, psq: int, psk: int, bq: int, bk: int):
    """``(meets, covers)`` of a block layout (its own block sizes and origins) per kernel tile, from 2-D
    prefix sums of the layout: a tile meets when it spans a visible layout block, is covered when every
    layout block it spans is visible."""
    nq, nk = -(-psq // bq), -(-psk // bk)
    dev = lay4.device
    counts = torch.nn.functional.pad(lay4.to(torch.int32).cumsum(2).cumsum(3), (1, 0, 1, 0))

    def spans(n, size, total, origin, lsize):
        start = torch.arange(n, device=dev) * size
        stop = (start + size).clamp(max=total)
        return (start + origin) // lsize, (stop - 1 + origin) // lsize + 1

    r0, r1 = spans(nq, bq, psq, sp.q_origin, sp.bq)
    c0, c1 = spans(nk, bk, psk, sp.k_origin, sp.bk)

    def at(r, c):
        return counts[:, :, r[:, None], c[None, :]]

    n = at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)
    return n > 0, n == (r1 - r0)[:, None] * (c1 - c0)[None, :]


def _ordered(blocks: torch.Tensor):
    """A bool ``[B, H, nQ, nK]`` tile matrix as flex's ``(num_blocks, indices)`` (listed tiles first)."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def _block_size(device: torch.device) -> int:
    return BLOCK_SIZE.get(device.type, _DEFAULT_BLOCK)


def _block_mask(mask_mod, psq: int, psk: int, device: torch.device, structure, restriction):
    """flex's ``BlockMask`` from the plan's tiles (``structure``: ``(meets, covers)`` of the runs, None when
    every key is visible by structure) and the tensor restriction's tiles; ``mask_mod`` decides the rest."""
    fa, _ = _flex_module()
    if not torch.compiler.is_compiling():      # inside a compiled region the block mask is part of the graph
        with _LOCK:
            _STATS["block_masks"] += 1
    bs = _block_size(device)
    nq, nk = -(-psq // bs), -(-psk // bs)
    whole_q = (torch.arange(1, nq + 1, device=device) * bs <= psq)[:, None]
    whole_k = (torch.arange(1, nk + 1, device=device) * bs <= psk)[None, :]
    meets, covers = structure if structure is not None else (torch.ones(nq, nk, dtype=torch.bool, device=device),
                                                             whole_q & whole_k)
    if restriction is not None:
        meets, covers = meets & restriction[0], covers & restriction[1]
    meets, covers = _as4d(meets), _as4d(covers & whole_q & whole_k)
    shape = torch.broadcast_shapes(meets.shape, covers.shape)
    meets, covers = meets.expand(shape), covers.expand(shape) & meets
    num, idx = _ordered(meets & ~covers)
    full_num, full_idx = _ordered(covers)
    return fa.BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=(bs, bs), mask_mod=mask_mod,
                                       seq_lengths=(psq, psk))


def _tensor_key(t):
    """A tensor's cache identity: id and version counter (an in-place edit bumps the version; the lowering
    keeps the tensor alive, so its id cannot be reused while cached)."""
    if t is None:
        return None
    try:
        version = t._version
    except RuntimeError:   # inference tensors have no version counter: identity only
        version = None
    return (id(t), version, tuple(t.shape), t.dtype)


def _lowering_key(plan: Plan, batch: int, hq: int, device: torch.device, padded: tuple[int, int]):
    """Cache key of a plan at a shape (and the padded shape the kernel sees): the tiles by value, the
    tensors by identity, the modifiers."""
    sparse = plan.sparse
    sp = None if sparse is None else (_tensor_key(sparse.layout), sparse.bq, sparse.bk, sparse.q_origin,
                                      sparse.k_origin)
    return (plan.tiles, plan.seqlen_q, plan.seqlen_k, padded, (device.type, device.index), batch, hq,
            _tensor_key(plan.key_valid), _tensor_key(plan.dense), sp, plan.mods.softcap, _tensor_key(plan.mods.alibi))


def _anchors(plan: Plan) -> tuple:
    return (plan.key_valid, plan.dense, None if plan.sparse is None else plan.sparse.layout, plan.mods.alibi)


def _lowered(plan: Plan, batch: int, hq: int, device: torch.device, padded: tuple[int, int]) -> _Lowered:
    """The cached lowering of ``plan`` for a kernel that sees ``padded = (Sq', Sk')`` (>=) lengths."""
    key = _lowering_key(plan, batch, hq, device, padded)
    got = _lru_get(_PLANS, key)
    if got is not None and all(a is b for a, b in zip(got.anchors, _anchors(plan))):
        return got
    got = _build(plan, batch, hq, device, *padded)
    _lru_put(_PLANS, key, got, PLAN_CACHE_SIZE)
    return got


def _pad_dim(x: torch.Tensor, dim: int, to: int, value) -> torch.Tensor:
    """``x`` extended along ``dim`` to length ``to`` with ``value``."""
    extra = to - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def _as4d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def _build(plan: Plan, batch: int, hq: int, device: torch.device, psq: int | None = None,
           psk: int | None = None) -> _Lowered:
    """Lower the plan to a BlockMask and mods: padded rows see nothing, padded keys are hidden."""
    sq, sk = plan.seqlen_q, plan.seqlen_k
    psq, psk = (sq if psq is None else psq), (sk if psk is None else psk)
    own = _owned if device.type == "cpu" and torch.compiler.is_compiling() else _as_is
    bs = _block_size(device)
    parts, structure, mask_mod, lo_hi = [], None, None, None
    # the key runs each row sees: hi <= sk - 1 hides padded keys, padded query rows see nothing. Needed unless
    # the structure hides nothing and a restriction hides the padding itself (a layout's partial last block
    # would show padded keys)
    if plan.structured or not plan.structure_full or (plan.sparse is not None and psk != sk):
        lo, hi = plan.runs_table()
        lo_d = own(_pad_dim(lo, 1, psq, 0).to(device=device, dtype=torch.int32))
        hi_d = own(_pad_dim(hi, 1, psq, -1).to(device=device, dtype=torch.int32))
        parts.append("runs")
        mask_mod, structure, lo_hi = _runs_mod(lo_d, hi_d), _runs_blocks(lo_d, hi_d, psq, psk, bs, bs), (lo, hi)
    restriction, bias4 = None, None
    if plan.key_valid is not None:
        valid = own(_pad_dim(plan.key_valid.to(device), 1, psk, False))          # padded keys: hidden
        parts.append("key_padding")
        mask_mod = _both(mask_mod, _key_padding_mod(valid))
        restriction = _token_blocks(valid[:, None, None, :], psq, psk, bs, bs)
    elif plan.dense is not None:
        m4 = _as4d(plan.dense).to(device)
        hidden = False if m4.dtype == torch.bool else _NEG_INF
        if psk != sk:                  # padded keys: hidden (a mask broadcast over keys gets its key axis)
            m4 = _pad_dim(m4.expand(*m4.shape[:3], sk), 3, psk, hidden)
        if psq != sq and m4.shape[2] != 1:
            m4 = _pad_dim(m4, 2, psq, hidden)
        m4 = own(m4)
        if m4.dtype == torch.bool:
            parts.append("dense_bool")
            mod, vis = _dense_bool_mod(m4), m4
        else:
            parts.append("dense_bias")
            mod, vis, bias4 = _dense_finite_mod(m4), m4 > _NEG_INF, m4
        mask_mod = _both(mask_mod, mod)
        restriction = _token_blocks(vis, psq, psk, bs, bs)
    elif plan.sparse is not None:
        sp = plan.sparse
        lay = _as4d(sp.layout).to(device)
        # padded rows and keys (and a restricted plan's origin) must land inside the layout: pad it, hidden
        need_q = (psq - 1 + sp.q_origin) // sp.bq + 1 if psq else 0
        need_k = (psk - 1 + sp.k_origin) // sp.bk + 1 if psk else 0
        lay = own(_pad_dim(_pad_dim(lay, 2, max(need_q, lay.shape[2]), False), 3, max(need_k, lay.shape[3]), False))
        parts.append("block_sparse")
        mask_mod = _both(mask_mod, _block_sparse_mod(lay, sp.bq, sp.bk, sp.q_origin, sp.k_origin))
        restriction = _layout_blocks(lay, sp, psq, psk, bs, bs)
    mods = plan.mods
    slopes = aligned = None
    if mods.alibi is not None:
        slopes = own(mods.alibi.reshape(-1, hq).expand(batch, hq).to(device=device, dtype=torch.float32))
        aligned = own(_pad_dim(plan.aligned_keys(), 0, psq, 0).to(device=device, dtype=torch.int32))
    block_mask = _block_mask(mask_mod, psq, psk, device, structure, restriction)
    return _Lowered("+".join(parts), block_mask, mask_mod, _score_mod(mods.softcap, slopes, aligned, bias4), lo_hi,
                    _anchors(plan))


# ---------------------------------------------------------------------------------------------
# compiled entry functions
# ---------------------------------------------------------------------------------------------
def _entry(q, k, v, score_mod, block_mask, scale, enable_gqa):
    return _FLEX(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _entry_lse(q, k, v, score_mod, block_mask, scale, enable_gqa):
    out, aux = _FLEX(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                     **_LSE_KW)
    return out, (aux.lse if _LSE_AUX else aux)


_FLEX = None       # flex_attention, bound on first use (module import must not need torch >= 2.5)
_LSE_KW: dict = {}
_LSE_AUX = False   # True when the LSE comes back in an AuxOutput (torch >= 2.9)


def _counting_inductor(gm, example_inputs):
    """The inductor backend, counting the graphs dynamo hands it."""
    from torch._inductor.compile_fx import compile_fx
    with _LOCK:
        _STATS["graph_compiles"] += 1
    return compile_fx(gm, example_inputs)


def _bind_flex() -> None:
    global _FLEX, _LSE_KW, _LSE_AUX
    if _FLEX is None:
        fa, _ = _flex_module()
        _LSE_KW = _lse_kwargs()
        _LSE_AUX = "return_aux" in _LSE_KW
        _FLEX = fa.flex_attention


def _run_compiled(key: tuple, with_lse: bool, static: bool, args: tuple):
    try:
        return _compiled(key, with_lse, static)(*args)
    except Exception as e:
        if type(e).__name__ not in _RECOMPILE_LIMIT_ERRORS:
            raise
        # this key saw more shapes than dynamo's recompile limit: start it a fresh code object (and cache)
        with _LOCK:
            _COMPILED.pop(key, None)
        return _compiled(key, with_lse, static)(*args)


def _compiled(key: tuple, with_lse: bool, static: bool = False) -> Callable:
    fn = _lru_get(_COMPILED, key)
    if fn is not None:
        return fn
    _bind_flex()
    base = _entry_lse if with_lse else _entry
    with _LOCK:
        _STATS["compiled_functions"] += 1
        n = _STATS["compiled_functions"]
    # a fresh code object per key: dynamo caches (and counts recompiles) per code object
    code = base.__code__.replace(co_name=f"{base.__name__}_{n}")
    fresh = types.FunctionType(code, base.__globals__, code.co_name)
    # static: one kernel per shape (the CPU shape guard); otherwise dynamo's automatic dynamic shapes
    fn = torch.compile(fresh, backend=_counting_inductor, fullgraph=True, dynamic=False if static else None)
    _lru_put(_COMPILED, key, fn, COMPILED_CACHE_SIZE)
    return fn


#: dynamo's error when a ``fullgraph=True`` function exceeds its recompile limit (name across versions)
_RECOMPILE_LIMIT_ERRORS = ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")


def _padded_head_dim(d: int, device: torch.device, static: bool = False) -> int:
    """The head dim the kernel gets: CPU any (at least ``_MIN_CPU_HEAD_DIM`` under the CPU shape guard);
    CUDA at least 16, a power of 2 before torch 2.6. Zero columns change no score; padded value columns
    are sliced off."""
    if device.type != "cuda":
        return max(d, _MIN_CPU_HEAD_DIM) if static else d
    if _torch_version() < (2, 6):
        return max(16, 1 << (d - 1).bit_length())
    return max(16, d)


def _pad_last(x: torch.Tensor, to: int) -> torch.Tensor:
    return x if x.shape[-1] == to else torch.nn.functional.pad(x, (0, to - x.shape[-1]))


# ---------------------------------------------------------------------------------------------
# the call
# ---------------------------------------------------------------------------------------------
def _forward(call: AttentionCall):
    q, k, v = call.q, call.k, call.v
    static = q.device.type == "cpu" and cpu_guard_enabled()
    if static and torch.compiler.is_compiling():
        # the CPU shape guard inside a caller's compile (dynamic=True, automatic dynamic shapes): every size a
        # constant of the graph (operator.index specializes a symbolic size; another size recompiles), so the
        # kernel, its scale (D ** -0.5 by default) included, is built for static shapes
        for n in (*q.shape, *k.shape, *v.shape):
            operator.index(n)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))          # BSHD -> BHSD views
    b, hq, sq, sk = qh.shape[0], call.heads_q, call.seqlen_q, call.seqlen_k
    dv = call.head_dim_v
    dev = q.device
    if sq == 0 or sk == 0 or not call.plan.tiles:
        out = q.new_zeros(b, sq, hq, dv)
        return out, (torch.full((b, hq, sq), _NEG_INF, device=dev) if call.return_lse else None)
    # the CPU shape guard: static shapes, lengths padded to a bucket (module docstring)
    psq, psk = (_bucket(sq), _bucket(sk, minimum=_MIN_KEY_BUCKET)) if static else (sq, sk)
    compiling = torch.compiler.is_compiling()   # inside the caller's graph: no caches, locks or inner compile
    low = (_build(call.plan, b, hq, dev, psq, psk) if compiling
           else _lowered(call.plan, b, hq, dev, (psq, psk)))
    lse_in_kernel = call.return_lse and dev.type != "cpu"
    d_pad, dv_pad = _padded_head_dim(call.head_dim, dev, static), _padded_head_dim(dv, dev, static)
    # flex bakes the scale (and a softcap) into the kernel: a new value compiles once, under its own key;
    # head counts too: flex marks them static, so each count would recompile under a shared key.
    # static (the CPU guard): one kernel per padded shape, so the shape is part of the key; a shared key would
    # recompile per shape and hit dynamo's recompile limit (a warning, then a fresh function) in long runs
    key = (dev.type, low.family, low.score_mod is not None, call.plan.max_runs, call.dtype, d_pad, dv_pad,
           call.heads_q, call.heads_kv, lse_in_kernel, call.scale, call.plan.mods.softcap, static) \
        + ((b, psq, psk) if static else ())
    qk, kk, vk = qh, kh, vh
    if static:   # padded, and one contiguous BHSD layout whether padded or not (strides are guarded too)
        qk, kk, vk = (_pad_dim(t, 2, n, _PAD_VALUE).contiguous() for t, n in ((qh, psq), (kh, psk), (vh, psk)))
    if d_pad != call.head_dim:
        qk, kk = _pad_last(qk, d_pad), _pad_last(kk, d_pad)
    args = (qk, kk, _pad_last(vk, dv_pad), low.score_mod, low.block_mask, call.scale, call.heads_q != call.heads_kv)
    if compiling:
        _bind_flex()
        res = (_entry_lse if lse_in_kernel else _entry)(*args)
    else:
        res = _run_compiled(key, lse_in_kernel, static, args)
    if lse_in_kernel:
        out, lse = res
        lse = lse.float()
    else:
        out, lse = res, None
    if dv_pad != dv:
        out = out[..., :dv]
    if psq != sq:
        out = out[:, :, :sq]
        lse = lse[:, :, :sq] if lse is not None else None
    if call.return_lse and lse is None:
        with torch.no_grad():
            lse = _lse_pass(qh, kh, low, call.scale)
    return out.transpose(1, 2), lse


def _lse_pass(qh: torch.Tensor, kh: torch.Tensor, low: _Lowered, scale: float) -> torch.Tensor:
    """Exact float32 LSE ``[B, Hq, Sq]`` for the CPU path, in query chunks.

    Each chunk's scores go through the lowering's own score_mod/mask_mod evaluated on broadcast index grids,
    so the LSE and the kernel's output see the same scores and mask; with a runs table each chunk only
    multiplies against the span of keys its rows can see.
    """
    b, hq, sq, d = qh.shape
    hkv, sk = kh.shape[1], kh.shape[2]
    r = hq // hkv
    dev = qh.device
    lse = torch.full((b, hq, sq), _NEG_INF, dtype=torch.float32, device=dev)
    qg = qh.reshape(b, hkv, r, sq, d)
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    hi_ = torch.arange(hq, device=dev).view(1, hq, 1, 1)
    rows = max(1, min(sq, _LSE_CHUNK_ELEMS // max(1, b * hq * sk)))
    rows = max(rows, 16) if sq >= 16 else sq
    for a in range(0, sq, rows):
        e = min(sq, a + rows)
        k0, k1 = 0, sk
        if low.lo_hi_cpu is not None and not torch.compiler.is_compiling():   # CPU tensors: no device sync
            lo, hi = low.lo_hi_cpu
            seen = hi[:, a:e] >= lo[:, a:e]
            if not bool(seen.any()):
                continue          # every row of the chunk sees nothing: stays -inf
            k0, k1 = int(lo[:, a:e][seen].min()), int(hi[:, a:e][seen].max()) + 1
        s = torch.matmul(qg[:, :, :, a:e].float(), kh[:, :, None, k0:k1].float().transpose(-1, -2))
        s = s.reshape(b, hq, e - a, k1 - k0) * scale
        qi = torch.arange(a, e, device=dev).view(1, 1, -1, 1)
        ki = torch.arange(k0, k1, device=dev).view(1, 1, 1, -1)
        if low.score_mod is not None:
            s = low.score_mod(s, bi, hi_, qi, ki)
        if low.mask_mod is not None:
            s = s.masked_fill(~low.mask_mod(bi, hi_, qi, ki), _NEG_INF)
        lse[:, :, a:e] = torch.logsumexp(s, dim=-1)
    return lse
