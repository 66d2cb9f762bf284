"""``xformers``: ``xformers.ops.memory_efficient_attention`` with the matching ``attn_bias``.

Detected lazily: importing this module never imports xformers.

The module reads top to bottom: detection, the backend (capabilities, ``why_not``), the lowering from
the call's plan (:mod:`attnlib.plan`: a typed :class:`XformersBiasSpec` in pure Python, then the
tensors), then the call. xformers checks bias types by *exact* type, so each :class:`BiasKind` builds
its own class from xformers' ``attn_bias`` module:

========================================  ===================================================
plan                                      attn_bias
========================================  ===================================================
no mask, or every query sees every key    no bias
one causal block, diagonal bottom-right   ``LowerTriangularMask`` when the kept rows and the keys
                                          are as many, else ``LowerTriangularFromBottomRightMask``;
                                          ``...FromBottomRightLocalAttentionMask(W)`` with a window.
                                          Rows that see no key (``Block.visible_rows``: before the
                                          diagonal when ``Sq > Sk``) are not sent to the kernel
diagonal left of bottom-right             the keys no query sees are cut off (top-left with
(top-left with ``Sk > Sq``, restricted)   ``Sk > Sq``: the first ``Sq`` keys), then as above
diagonal 0 right of bottom-right          ``LowerTriangularMask`` (xformers' own causal is
(top-left with ``Sq > Sk``)               top-left)
``BlockDiagonal``                         ``BlockDiagonalMask`` / ``...CausalFromBottomRightMask`` /
                                          ``...CausalLocalAttentionFromBottomRightMask``, per block
                                          as above: query rows that see no key (a causal block with
                                          fewer keys than queries, which xformers rejects) are
                                          dropped and re-added as 0; keys no query sees form blocks
                                          of 0 queries
``KeyPadding`` (with ``causal``/window),  a materialized additive bias from ``Plan.materialize``,
``DenseMask``, any other plan             last dim padded to xformers' 16-byte alignment, broadcast
                                          axes expanded (stride 0)
========================================  ===================================================

GQA: the 5-D BMGHK layout with expanded (stride-0) K/V views; when gradients are needed K/V are
repeated (xformers' backward operators do not take BMGHK). LSE: ``memory_efficient_attention_forward_
requires_grad`` (the public API that returns it) with ``memory_efficient_attention_backward`` for
autograd. Rows with no visible key return 0 and LSE ``-inf``. ``why_not`` carries xformers' own
``not_supported_reasons`` when no operator fits.
"""
from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..caching import host_lru, probe

from ..inputs import AttentionCall
from ..plan import Plan, Tile
from .base import Backend, Capabilities
from .common import run_tiles

_NEG_INF = float("-inf")


def _cuda_available() -> bool:
    """Patched in tests; the one place this module asks whether CUDA exists."""
    return torch.cuda.is_available()


@dataclass(frozen=True, eq=False)
class _Xformers:
    version: str
    ops: Any          # xformers.ops
    fmha: Any         # xformers.ops.fmha
    bias: Any         # xformers.ops.fmha.attn_bias


@probe
def _detect() -> tuple[Optional[_Xformers], str]:
    """``(modules or None, reason when None)``. Cached; tests call ``_detect.cache_clear()``."""
    try:
        xf = importlib.import_module("xformers")
        ops = importlib.import_module("xformers.ops")
        fmha = importlib.import_module("xformers.ops.fmha")
        bias = importlib.import_module("xformers.ops.fmha.attn_bias")
    except ModuleNotFoundError:
        cuda = "" if _cuda_available() else " and torch has no CUDA device"
        return None, f"xformers not installed (pip install xformers){cuda}"
    except Exception as e:  # noqa: BLE001 - a broken build is reported, not raised
        return None, f"xformers failed to import: {type(e).__name__}: {e}"
    return _Xformers(str(getattr(xf, "__version__", "?")), ops, fmha, bias), ""


class XformersBackend(Backend):
    name = "xformers"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        features=frozenset({"causal", "window", "block_diagonal", "key_padding", "dense", "block_sparse", "alibi"}),
        isolates_sequences=True,      # block-diagonal biases: each sequence reads its own keys
    )

    @property
    def implementation(self) -> str:  # type: ignore[override]
        xf, _ = _detect()
        return f"xformers {xf.version} memory_efficient_attention" if xf is not None else ""

    def unavailable_reason(self) -> Optional[str]:
        xf, reason = _detect()
        if xf is None:
            return reason
        if not _cuda_available():
            return (f"xformers {xf.version} is installed but torch has no CUDA device "
                    "(torch.cuda.is_available() is False)")
        return None

    def extra_reasons(self, call: AttentionCall) -> list[str]:
        """xformers' own dispatch on stand-ins: the typed spec (pure Python from the plan), views of the
        call's tensors, and stride-0 stand-ins where forward would copy (no bias tensor, no state kept)."""
        xf, _ = _detect()
        spec = xformers_bias_spec(call.plan)
        if spec.kind in (BiasKind.EMPTY, BiasKind.TILES) or torch.compiler.is_compiling():
            # inside a compiled region xformers' Python dispatcher cannot be traced: a call none of its
            # operators takes raises from xformers at run time instead of falling back
            return []
        return _xformers_reasons(xf, _lower(xf, call, spec, stand_ins=True), call)

    def forward(self, call: AttentionCall):
        xf, reason = _detect()
        if xf is None:
            raise RuntimeError(reason)
        spec = xformers_bias_spec(call.plan)
        if spec.kind is BiasKind.EMPTY:
            return _no_key(call)
        if spec.kind is BiasKind.TILES:
            return run_tiles(call, self.forward)
        return _run(xf, _lower(xf, call, spec), call)


# ---------------------------------------------------------------------------------------------
# lowering, from the plan: which attn_bias (pure Python), then the tensors
#
# xformers ``...FromBottomRight...LocalAttention...(W)``: ``i + off - W < j <= i + off`` (the same W as
# attnlib). ``BlockDiagonalCausalFromBottomRightMask`` rejects blocks with fewer keys than queries:
# the rows that see no key are dropped before the call instead.
# ---------------------------------------------------------------------------------------------
class BiasKind(enum.Enum):
    """Which ``attn_bias`` serves a plan. Structured members carry the name of their exact class in
    ``xformers.ops.fmha.attn_bias`` and :meth:`build` it; ``NONE``: no bias; ``TENSOR``: a materialized
    additive bias (:func:`additive_bias`); ``EMPTY``: no query sees any key (output 0, LSE -inf, no
    kernel call)."""

    NONE = "none"
    TENSOR = "tensor"
    EMPTY = "empty"
    TILES = "tiles"
    LOWER_TRIANGULAR = "LowerTriangularMask"
    LOWER_TRIANGULAR_BOTTOM_RIGHT = "LowerTriangularFromBottomRightMask"
    LOWER_TRIANGULAR_BOTTOM_RIGHT_LOCAL = "LowerTriangularFromBottomRightLocalAttentionMask"
    BLOCK_DIAGONAL = "BlockDiagonalMask"
    BLOCK_DIAGONAL_CAUSAL_BOTTOM_RIGHT = "BlockDiagonalCausalFromBottomRightMask"
    BLOCK_DIAGONAL_CAUSAL_LOCAL_BOTTOM_RIGHT = "BlockDiagonalCausalLocalAttentionFromBottomRightMask"

    @property
    def varlen(self) -> bool:
        """A block-diagonal bias: batch 1, per-block seqlens, the varlen LSE layout."""
        return self in _BLOCK_DIAGONAL_KINDS

    def build(self, attn_bias, spec: "XformersBiasSpec", device: torch.device):
        """The bias object from xformers' ``attn_bias`` module, of exactly this kind's class (None: no bias)."""
        if self is BiasKind.NONE:
            return None
        if self in (BiasKind.TENSOR, BiasKind.EMPTY, BiasKind.TILES):
            raise ValueError(f"{self} has no attn_bias class (see additive_bias)")
        cls = getattr(attn_bias, self.value)
        if self in (BiasKind.LOWER_TRIANGULAR, BiasKind.LOWER_TRIANGULAR_BOTTOM_RIGHT):
            obj = cls()
        elif self is BiasKind.LOWER_TRIANGULAR_BOTTOM_RIGHT_LOCAL:
            obj = cls(spec.window)
        else:
            obj = _from_seqlens(attn_bias.BlockDiagonalMask, list(spec.q_seqlens), list(spec.kv_seqlens), device)
            if self is BiasKind.BLOCK_DIAGONAL_CAUSAL_BOTTOM_RIGHT:
                obj = obj.make_causal_from_bottomright()
            elif self is BiasKind.BLOCK_DIAGONAL_CAUSAL_LOCAL_BOTTOM_RIGHT:
                obj = obj.make_local_attention_from_bottomright(spec.window)
        if type(obj) is not cls:
            raise RuntimeError(f"xformers built {type(obj).__name__} where {self.value} was needed")
        return obj


_BLOCK_DIAGONAL_KINDS = frozenset({BiasKind.BLOCK_DIAGONAL, BiasKind.BLOCK_DIAGONAL_CAUSAL_BOTTOM_RIGHT,
                                   BiasKind.BLOCK_DIAGONAL_CAUSAL_LOCAL_BOTTOM_RIGHT})


@dataclass(frozen=True)
class XformersBiasSpec:
    """Which xformers ``attn_bias`` serves a plan, and how the call is cut around it.

    ``q_seqlens``/``kv_seqlens``/``window``: constructor arguments. Dense calls run on
    ``q[:, q_start:q_stop]`` (None: to the end) and ``k[:, :key_stop]``; packed calls on the query rows
    listed by ``kept_queries`` (``(start, count)`` runs; None = all). The rows left out see no key.
    """

    kind: BiasKind
    q_seqlens: Optional[tuple] = None
    kv_seqlens: Optional[tuple] = None
    window: Optional[int] = None
    q_start: int = 0
    q_stop: Optional[int] = None
    key_stop: Optional[int] = None
    kept_queries: Optional[tuple] = None


_EMPTY = XformersBiasSpec(BiasKind.EMPTY)
_TENSOR = XformersBiasSpec(BiasKind.TENSOR)
#: structured tiles no one bias class expresses (chunked causal): one call per run of equal tiles
_TILES = XformersBiasSpec(BiasKind.TILES)


def xformers_bias_spec(plan: Plan) -> XformersBiasSpec:
    """The attn_bias for a call's plan. Pure Python on the plan's ints (cached for structured plans);
    plans holding a tensor (KeyPadding, DenseMask, a block layout) or ALiBi get a materialized bias."""
    if plan.structured and plan.mods.alibi is None:
        return _structured_spec(plan)
    return _EMPTY if _no_visible_row(plan) else _TENSOR


def _no_visible_row(plan: Plan) -> bool:
    return all(a == z for a, z in (t.visible_rows() for t in plan.tiles))


@host_lru(1024)
def _structured_spec(plan: Plan) -> XformersBiasSpec:
    if _no_visible_row(plan):
        return _EMPTY
    if plan.packed:
        return _block_diagonal_spec(plan)
    tile = plan.single
    if tile is None:
        return _TILES
    return _dense_spec(tile)


def _dense_spec(block: Tile) -> XformersBiasSpec:
    """One block covering the call: the kept rows are ``Block.visible_rows()``."""
    start, stop = block.visible_rows()
    rows = {"q_start": start, "q_stop": None if stop == block.q_len else stop}
    if not block.causal:
        return XformersBiasSpec(BiasKind.NONE, **rows)
    kept = stop - start
    offset = block.offset + start               # the kept rows' diagonal
    keys = block.k_len
    if Tile(0, kept, 0, keys, True, offset, block.window).full:
        return XformersBiasSpec(BiasKind.NONE, **rows)
    key_stop = None
    if offset < keys - kept:                    # later keys are never visible: cut them, now bottom-right
        key_stop = keys = kept + offset
    elif offset > keys - kept:
        if offset == 0 and block.window is None:
            return XformersBiasSpec(BiasKind.LOWER_TRIANGULAR, **rows)      # xformers' own causal is top-left
        return _TENSOR
    if block.window is not None:
        return XformersBiasSpec(BiasKind.LOWER_TRIANGULAR_BOTTOM_RIGHT_LOCAL, window=block.window,
                                key_stop=key_stop, **rows)
    kind = BiasKind.LOWER_TRIANGULAR if kept == keys else BiasKind.LOWER_TRIANGULAR_BOTTOM_RIGHT
    return XformersBiasSpec(kind, key_stop=key_stop, **rows)


def _block_diagonal_spec(plan: Plan) -> XformersBiasSpec:
    """Packed blocks, per block as :func:`_dense_spec`: the rows ``Block.visible_rows()`` keeps, the keys
    no kept row sees as blocks of 0 queries. Tiles that do not fit one bias class run one call per run."""
    if not plan.tiles:
        return _EMPTY
    first = plan.tiles[0]
    causal, window = first.causal, first.window
    q_lens, k_lens, runs = [], [], []
    q_pos = k_pos = 0
    for b in plan.tiles:
        if b.causal != causal or b.window != window or b.q_start < q_pos or b.k_start < k_pos:
            return _TILES                       # (rows of no tile, before b.q_start, see nothing: dropped)
        if b.k_start > k_pos:                   # keys of no block
            q_lens.append(0)
            k_lens.append(b.k_start - k_pos)
        start, stop = b.visible_rows()
        kept, keys = stop - start, b.k_len
        if causal and kept:
            offset = b.offset + start
            if offset > keys - kept:
                return _TILES
            keys = kept + offset                # == b.k_len when the diagonal is bottom-right
        if kept:
            runs.append((b.q_start + start, kept))
        q_lens.append(kept)
        k_lens.append(keys)
        if keys < b.k_len:
            q_lens.append(0)
            k_lens.append(b.k_len - keys)
        q_pos, k_pos = b.q_start + b.q_len, b.k_start + b.k_len
    if k_pos > plan.seqlen_k:
        return _TILES
    if k_pos < plan.seqlen_k:
        q_lens.append(0)
        k_lens.append(plan.seqlen_k - k_pos)
    if not causal:
        kind = BiasKind.BLOCK_DIAGONAL
    elif window is None:
        kind = BiasKind.BLOCK_DIAGONAL_CAUSAL_BOTTOM_RIGHT
    else:
        kind = BiasKind.BLOCK_DIAGONAL_CAUSAL_LOCAL_BOTTOM_RIGHT
    dropped = sum(q_lens) != plan.seqlen_q
    return XformersBiasSpec(kind, q_seqlens=tuple(q_lens), kv_seqlens=tuple(k_lens), window=window,
                            kept_queries=_merge_runs(runs) if dropped else None)


def _merge_runs(runs):
    out = []
    for s, n in runs:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((s, n))
    return tuple(out)


def kept_query_index(kept_queries: tuple, device) -> torch.Tensor:
    """int64 index of the kept packed query rows (cached per device)."""
    return _kept_index(kept_queries, str(torch.device(device)))


@host_lru(256)
def _kept_index(kept_queries: tuple, device: str) -> torch.Tensor:
    if not kept_queries:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(s, s + n) for s, n in kept_queries]).to(device)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def bias_alignment(dtype: torch.dtype) -> int:
    """xformers wants every bias stride but the last to be a multiple of 16 bytes (8 fp16/bf16 elements)."""
    return 128 // torch.finfo(dtype).bits


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t


def _unexpand(t: torch.Tensor) -> torch.Tensor:
    """Collapse the broadcast (stride-0) axes of ``t`` to size 1: the values without the repeats."""
    for d in range(t.dim() - 1):
        if t.shape[d] > 1 and t.stride(d) == 0:
            t = t.narrow(d, 0, 1)
    return t


def additive_bias(plan: Plan, batch: int, heads: int, dtype: torch.dtype, device):
    """Materialize ``plan`` (``Plan.materialize``) as an additive bias ``[B, H, Sq, Sk]`` laid out as
    xformers requires; a DenseMask's additive values are kept.

    Storage has its last dim padded to :func:`bias_alignment` and is sliced back to ``Sk``; broadcast
    axes are ``expand``-ed (stride 0), never copied. Rows with no visible key are *unmasked* (bias 0)
    so the kernel computes finite numbers, and reported as ``empty_rows`` (``Plan.empty_rows_on``: bool
    ``[b?, h?, Sq?]``, broadcastable to ``[B, H, Sq]``; None when no row can be empty) for the caller to
    zero.
    """
    sq, sk = plan.seqlen_q, plan.seqlen_k
    visible = _unexpand(_as_4d(plan.materialize(device)))
    values = plan.bias(heads, device)                # ALiBi and a float DenseMask's values (finite part)
    if values is not None:
        values = _unexpand(_as_4d(values))
    empty = plan.empty_rows_on(device)
    while empty is not None and empty.dim() < 3:
        empty = empty.unsqueeze(0)
    shapes = [visible.shape] + ([values.shape] if values is not None else []) + \
        ([tuple(empty.shape) + (sk,)] if empty is not None else [])
    shape = torch.broadcast_shapes(*shapes)
    store = torch.zeros(*shape[:-1], round_up(sk, bias_alignment(dtype)), dtype=dtype, device=device)
    body = store[..., :sk]
    unmask = None if empty is None else empty.unsqueeze(-1)
    hidden = ~visible if unmask is None else ~(visible | unmask)
    if values is None:
        body.masked_fill_(hidden, _NEG_INF)
    else:
        values = values.masked_fill(~visible, _NEG_INF)
        body.copy_((values if unmask is None else values.masked_fill(unmask, 0.0)).expand(body.shape))
    return body.expand(batch, heads, sq, sk), empty


def xformers_dense_lse(lse: torch.Tensor, heads: int, seqlen_q: int) -> torch.Tensor:
    """xformers dense LSE ``[B, H, M]`` or ``[B, G, H/G, M]`` (M may be padded) -> ``[B, H, Sq]``."""
    return lse.reshape(lse.shape[0], heads, lse.shape[-1])[..., :seqlen_q]


def xformers_varlen_lse(lse: torch.Tensor, q_seqlens: tuple, heads: int) -> torch.Tensor:
    """xformers varlen LSE -> ``[H, Tq]``.

    Packed operators (flash) return ``[1, H, >=Tq]``; padded ones (cutlass) ``[N, H, >=max_q]``, one
    row per block. With one block both read the same.
    """
    lse = lse.reshape(lse.shape[0], heads, lse.shape[-1])
    total = sum(q_seqlens)
    if lse.shape[0] == 1:
        return lse[0, :, :total]
    if lse.shape[0] != len(q_seqlens):
        raise ValueError(f"xformers LSE of shape {tuple(lse.shape)} matches neither packed [1, H, {total}] nor "
                         f"padded [{len(q_seqlens)}, H, max_q]")
    block, pos = _padded_lse_index(tuple(q_seqlens), str(lse.device))
    return lse[block, :, pos].transpose(0, 1)


@host_lru(256)
def _padded_lse_index(q_seqlens: tuple, device: str):
    block = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(q_seqlens)])
    pos = torch.cat([torch.arange(n) for n in q_seqlens])
    return block.to(device), pos.to(device)


@dataclass
class _Lowered:
    """One call in xformers' terms: kernel tensors, attn_bias, and how to map results back."""

    spec: XformersBiasSpec
    q: Any = None
    k: Any = None
    v: Any = None
    bias: Any = None
    empty: Optional[torch.Tensor] = None     # tensor bias: rows with no key, [b?, h?, sq] (LSE layout)
    bmghk: bool = False


def _stand_in(like: torch.Tensor, shape) -> torch.Tensor:
    """A tensor of ``shape`` with ``like``'s dtype and device that costs no memory and no compute: one
    row expanded (stride 0 on every axis but the last, which has stride 1)."""
    return like.new_empty(shape[-1]).expand(*shape)


def _lower(xf: _Xformers, call: AttentionCall, spec: XformersBiasSpec, *, stand_ins: bool = False) -> _Lowered:
    """The kernel's tensors and attn_bias for ``call``. ``stand_ins`` (for ``why_not``): every tensor forward
    would copy or build (kept-row gather, K/V repeat, the additive bias) is a :func:`_stand_in` of the same
    shape, dtype and device, and a bias stand-in has the aligned layout (strides 0 but the last: what
    xformers' ``not_supported_reasons`` read is the shape, dtype, device, last-dim stride and the other
    strides' 16-byte alignment, all of which the stand-ins share with the real tensors)."""
    q, k, v = call.q, call.k, call.v
    if spec.q_start or spec.q_stop is not None:
        q = q[:, spec.q_start:spec.q_stop]
    if spec.key_stop is not None:
        k, v = k[:, : spec.key_stop], v[:, : spec.key_stop]
    if spec.kept_queries is not None:
        if stand_ins:
            q = _stand_in(q, (q.shape[0], sum(n for _, n in spec.kept_queries), *q.shape[2:]))
        else:
            q = q.index_select(1, kept_query_index(spec.kept_queries, q.device))
    b, sq, hq = q.shape[:3]
    sk = k.shape[1]
    empty = None
    if spec.kind is BiasKind.TENSOR:
        if stand_ins:
            bias = q.new_empty(round_up(sk, bias_alignment(q.dtype)))[:sk].expand(b, hq, sq, sk)
        else:
            bias, empty = additive_bias(call.plan, b, hq, q.dtype, q.device)
    else:
        # structured biases are objects: built here for xformers' autograd and dispatcher; the no-grad op
        # rebuilds them inside from the typed spec (a compiled region never builds one)
        bias = _bias_object(xf, spec, str(q.device)) if call.requires_grad or stand_ins else None
    hkv = k.shape[2]
    bmghk = False
    if hq != hkv:
        ratio = hq // hkv
        if call.requires_grad:  # xformers' backward operators do not take BMGHK: repeat K/V (a copy)
            if stand_ins:
                k, v = _stand_in(k, (b, sk, hq, k.shape[-1])), _stand_in(v, (b, sk, hq, v.shape[-1]))
            else:
                k, v = k.repeat_interleave(ratio, dim=2), v.repeat_interleave(ratio, dim=2)
        else:
            bmghk = True
            q = q.unflatten(2, (hkv, ratio))
            k = k.unsqueeze(3).expand(b, sk, hkv, ratio, k.shape[-1])
            v = v.unsqueeze(3).expand(b, sk, hkv, ratio, v.shape[-1])
            if isinstance(bias, torch.Tensor):
                bias = bias.unflatten(1, (hkv, ratio))
    return _Lowered(spec, q, k, v, bias, empty, bmghk)


@host_lru(512)
def _bias_object(xf: _Xformers, spec: XformersBiasSpec, device: str):
    """The exact xformers attn_bias for ``spec`` (cached: block-diagonal seqstarts go to the device once)."""
    return spec.kind.build(xf.bias, spec, torch.device(device))


def _from_seqlens(cls, q_seqlens, kv_seqlens, device: torch.device):
    try:
        return cls.from_seqlens(q_seqlens, kv_seqlens, device=device)
    except TypeError:  # older xformers: no device argument; seqstart built on the CPU then moved
        obj = cls.from_seqlens(q_seqlens, kv_seqlens)
        return obj.to(device) if hasattr(obj, "to") else obj


def _xformers_reasons(xf: _Xformers, low: _Lowered, call: AttentionCall) -> list[str]:
    """xformers' own dispatch: when no operator fits, its per-operator ``not_supported_reasons``.

    Uses xformers' dispatcher (``fmha.dispatch._dispatch_fw`` / ``_dispatch_bw``, whose
    ``NotImplementedError`` lists every operator's reasons); if that private API moved, the kernel
    call itself reports instead.
    """
    try:
        dispatch = importlib.import_module("xformers.ops.fmha.dispatch")
        inp = xf.fmha.Inputs(query=low.q, key=low.k, value=low.v, attn_bias=low.bias, p=0.0, scale=call.scale)
    except Exception:  # noqa: BLE001
        return []
    needs_grad = call.requires_grad or call.return_lse
    try:
        fw = dispatch._dispatch_fw(inp, needs_grad)
    except NotImplementedError as e:
        return [f"xformers has no forward operator for this call: {_condense(e)}"]
    except Exception:  # noqa: BLE001
        return []
    if call.requires_grad:
        try:
            varlen = low.spec.kind.varlen
            dispatch._dispatch_bw(inp, varlen_lse_packed=getattr(fw, "VARLEN_LSE_PACKED", None) if varlen else None)
        except NotImplementedError as e:
            return [f"xformers has no backward operator for this call: {_condense(e)}"]
        except Exception:  # noqa: BLE001
            return []
    return []


def _condense(err: Exception) -> str:
    """xformers' dispatch error on one line, without its echo of the input shapes."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    first = next((i for i, ln in enumerate(lines) if "is not supported because" in ln), None)
    if first is not None:
        lines = lines[first:]
    return " ".join(lines)


# ---------------------------------------------------------------------------------------------
# the call
# ---------------------------------------------------------------------------------------------
class _MemEffWithLse(torch.autograd.Function):
    """Output and LSE in one pass, differentiable through ``memory_efficient_attention_backward``."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale, ops):
        out, lse = ops.memory_efficient_attention_forward_requires_grad(q, k, v, attn_bias=bias, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bias, ctx.scale, ctx.ops = bias, scale, ops
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.ops.memory_efficient_attention_backward(dout.contiguous(), out, lse, q, k, v,
                                                                 attn_bias=ctx.bias, scale=ctx.scale)
        return dq, dk, dv, None, None, None


def _lse_layout(lse: torch.Tensor, spec: XformersBiasSpec, heads: int, seqlen_q: int) -> torch.Tensor:
    """xformers' LSE in attnlib's layout: ``[H, Tq']`` (block-diagonal) or ``[B, H, Sq']``, float32."""
    lse = lse.float()
    return xformers_varlen_lse(lse, spec.q_seqlens, heads) if spec.kind.varlen else \
        xformers_dense_lse(lse, heads, seqlen_q)


def _op_spec(kind: str, q_seqlens: list, kv_seqlens: list, window: int) -> XformersBiasSpec:
    return XformersBiasSpec(BiasKind(kind), tuple(q_seqlens) or None, tuple(kv_seqlens) or None,
                            None if window < 0 else window)


def _op_lse_shape(q: torch.Tensor, spec: XformersBiasSpec) -> tuple:
    heads = q.shape[2] * (q.shape[3] if q.dim() == 5 else 1)
    return (heads, sum(spec.q_seqlens)) if spec.kind.varlen else (q.shape[0], heads, q.shape[1])


@torch.library.custom_op("attnlib::xformers_attention", mutates_args=())
def _xformers_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], kind: str,
                 q_seqlens: list[int], kv_seqlens: list[int], window: int, scale: float,
                 return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``memory_efficient_attention`` with the bias rebuilt from its typed description (custom ops take
    tensors and plain values, not bias objects); ``(out, lse in attnlib's layout or an empty tensor)``."""
    xf, reason = _detect()
    if xf is None:
        raise RuntimeError(reason)
    spec = _op_spec(kind, q_seqlens, kv_seqlens, window)
    attn_bias = bias if spec.kind is BiasKind.TENSOR else _bias_object(xf, spec, str(q.device))
    if not return_lse:
        out = xf.ops.memory_efficient_attention(q, k, v, attn_bias=attn_bias, scale=scale)
        return out, q.new_empty((0,), dtype=torch.float32)
    out, lse = xf.ops.memory_efficient_attention_forward_requires_grad(q, k, v, attn_bias=attn_bias, scale=scale)
    heads = _op_lse_shape(q, spec)[-2 if not spec.kind.varlen else 0]
    return out, _lse_layout(lse, spec, heads, q.shape[1]).contiguous()


@_xformers_op.register_fake
def _xformers_fake(q, k, v, bias, kind, q_seqlens, kv_seqlens, window, scale, return_lse):
    spec = _op_spec(kind, q_seqlens, kv_seqlens, window)
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    return out, q.new_empty(_op_lse_shape(q, spec) if return_lse else (0,), dtype=torch.float32)


def _no_key(call: AttentionCall):
    """No query sees any key: output 0, LSE -inf, no kernel call."""
    out = call.q.new_zeros(*call.q.shape[:-1], call.head_dim_v)
    lse = None
    if call.return_lse:
        lse = torch.full((call.batch, call.heads_q, call.seqlen_q), _NEG_INF, device=call.device)
    return out, lse


def _run(xf: _Xformers, low: _Lowered, call: AttentionCall):
    spec = low.spec
    hq = call.heads_q
    if call.requires_grad:              # xformers' own autograd (its backward operators)
        if call.return_lse:
            out, lse = _MemEffWithLse.apply(low.q, low.k, low.v, low.bias, call.scale, xf.ops)
            lse = _lse_layout(lse, spec, hq, low.q.shape[1])
        else:
            out = xf.ops.memory_efficient_attention(low.q, low.k, low.v, attn_bias=low.bias, scale=call.scale)
            lse = None
    else:                               # one opaque custom-op node under torch.compile / torch.export
        bias_t = low.bias if isinstance(low.bias, torch.Tensor) else None
        out, lse = _xformers_op(low.q, low.k, low.v, bias_t, spec.kind.value, list(spec.q_seqlens or ()),
                                list(spec.kv_seqlens or ()), -1 if spec.window is None else spec.window, call.scale,
                                call.return_lse)
        lse = lse if call.return_lse else None
    if low.bmghk:
        out = out.flatten(2, 3)
    if low.empty is not None:
        out = out.masked_fill(low.empty.transpose(1, 2).unsqueeze(-1), 0.0)
        if lse is not None:
            lse = lse.masked_fill(low.empty, _NEG_INF)
    # rows that were not sent to the kernel see no key: 0 / -inf
    if spec.q_start or spec.q_stop is not None:
        tail = 0 if spec.q_stop is None else call.seqlen_q - spec.q_stop
        out = F.pad(out, (0, 0, 0, 0, spec.q_start, tail))
        if lse is not None:
            lse = F.pad(lse, (spec.q_start, tail), value=_NEG_INF)
    if spec.kept_queries is not None:
        idx = kept_query_index(spec.kept_queries, out.device)
        out = out.new_zeros(1, call.seqlen_q, hq, out.shape[-1]).index_copy(1, idx, out)
        if lse is not None:
            lse = torch.full((hq, call.seqlen_q), _NEG_INF, device=lse.device).index_copy(1, idx, lse)
    if lse is not None and lse.dim() == 2:        # block-diagonal biases: the varlen layout [H, Tq]
        lse = lse.unsqueeze(0)
    return out, lse
