"""``flash``: FlashAttention, dense and varlen, from the best implementation installed.

Implementations, detected lazily (importing this module never fails), first found wins:

1. FA3 ``flash_attn_interface`` (Hopper build of flash-attn 3);
2. FA2 ``flash_attn`` (``flash_attn_func`` / ``flash_attn_varlen_func``);
3. FA4 ``flash_attn.cute`` (CuTe-DSL, Hopper/Blackwell; ``window_size=(None, None)``, returns a tuple);
4. PyTorch's built-in FlashAttention kernels when torch has CUDA: ``torch.nn.attention.varlen.varlen_attn``
   (torch >= 2.10) for varlen, and SDPA restricted to ``SDPBackend.FLASH_ATTENTION`` for plain dense calls.

``$ATTNLIB_FLASH_IMPL`` (``fa3``, ``fa2``, ``fa4``, ``torch``) pins one; ``implementation`` names the one in use.

The module reads top to bottom: implementation detection, the backend (capabilities, ``why_not``),
the lowering from the call's plan (:mod:`attnlib.plan`; pure Python and tensor helpers, unit-tested on
the CPU), then the calls. Lowering (:func:`lower`, one typed result per call):

- one causal block (``Causal``): flash-attn's causal is bottom-right (>= 2.1), window ``W`` is
  ``window_size=(W-1, 0)``. A diagonal offset ``o`` runs natively when ``o == Sk - Sq``; when
  ``o < Sk - Sq`` (top-left with ``Sk > Sq``, restricted plans) on the first ``Sq + o`` keys (later keys
  are never visible, and the diagonal is then bottom-right; ``Sq + o <= 0``: no row sees a key). A
  diagonal right of the bottom-right one (top-left with ``Sq > Sk``) is reported in ``why_not``, unless
  every query sees every key (then no causal at all).
- ``BlockDiagonal``: ``flash_attn_varlen_func`` with the mask's cached device ``cu_seqlens`` and
  Python-int max lengths (no device sync); causal / window per block, bottom-right.
- ``KeyPadding``: varlen over *keys* only: the valid keys of every batch row are gathered with an index
  (any pattern: left, right, holes), queries stay ``[B*Sq]`` (never dropped), output reshaped back.
  ``KeyPadding(causal=True)`` is served only when every query sees the same span of key positions
  (one-query decode, or a diagonal past every key): gathering the valid keys moves them, and bottom-right
  causal over the gathered keys equals the mask only for left padding, which cannot be known without
  reading the tensor; otherwise ``why_not`` says so.
- ``DenseMask``: not expressible (``why_not``).
- Head dims are zero-padded to one multiple of 8 when needed (``Dv != D`` or ``D % 8``).
- Rows with no visible key: flash-attn writes output 0 and LSE ``+inf``; LSE is mapped to ``-inf``;
  the KeyPadding path zeroes the rows the plan reports empty (``Plan.empty_rows_on``, on the device).
"""
from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ..caching import host_lru, probe

from .. import settings
from ..inputs import AttentionCall
from ..plan import Plan, Tile, Varlen
from .base import Backend, Capabilities
from .common import repeat_kv, run_tiles

ENV_IMPL = settings.FLASH_IMPL
_NEG_INF = float("-inf")
#: minimum CUDA compute capability per implementation (flash-attn 2: Ampere; 3/4: Hopper)
_MIN_CAPABILITY = {"fa2": (8, 0), "fa3": (8, 0), "fa4": (9, 0), "torch": (8, 0)}


def _cuda_available() -> bool:
    """Patched in tests; the one place this module asks whether CUDA exists."""
    return torch.cuda.is_available()


@dataclass(frozen=True)
class _Impl:
    """One FlashAttention implementation: ``dense(q,k,v,...)`` and ``varlen(q,k,v,cu_q,cu_k,...)``."""

    kind: str                 # "fa3" | "fa2" | "fa4" | "torch"
    label: str                # for attnlib info
    dense: Optional[Callable]
    varlen: Optional[Callable]
    params_dense: frozenset = frozenset()
    params_varlen: frozenset = frozenset()


def _params(fn) -> frozenset:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _try_fa3():
    mod = importlib.import_module("flash_attn_interface")
    version = getattr(mod, "__version__", None) or _dist_version("flash_attn_3") or "3"
    return _Impl("fa3", f"flash-attn {version} (FA3, flash_attn_interface)", mod.flash_attn_func,
                 mod.flash_attn_varlen_func, _params(mod.flash_attn_func), _params(mod.flash_attn_varlen_func))


def _try_fa2():
    mod = importlib.import_module("flash_attn")
    version = getattr(mod, "__version__", "2")
    if not str(version).startswith("2"):
        raise ImportError(f"flash_attn {version} is not flash-attn 2")
    return _Impl("fa2", f"flash-attn {version} (FA2)", mod.flash_attn_func, mod.flash_attn_varlen_func,
                 _params(mod.flash_attn_func), _params(mod.flash_attn_varlen_func))


def _try_fa4():
    mod = importlib.import_module("flash_attn.cute")
    dense = getattr(mod, "flash_attn_func", None)
    varlen = getattr(mod, "flash_attn_varlen_func", None)
    if dense is None or varlen is None:
        iface = importlib.import_module("flash_attn.cute.interface")
        dense, varlen = iface.flash_attn_func, iface.flash_attn_varlen_func
    version = _dist_version("flash-attn-4") or _dist_version("flash_attn") or "4"
    return _Impl("fa4", f"flash-attn {version} (FA4, flash_attn.cute)", dense, varlen, _params(dense), _params(varlen))


def _torch_varlen_attn():
    """``torch.nn.attention.varlen.varlen_attn`` when this torch has it (>= 2.10), else None. Patched in tests."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # noqa: BLE001 - older torch
        return None
    return varlen_attn


def _torch_active_flash_impl() -> Optional[str]:
    """The FlashAttention build activated inside PyTorch (``activate_flash_attention_impl("FA4")``), if any."""
    try:
        from torch.nn import attention
        current = getattr(attention, "current_flash_attention_impl", None)
        return current() if current is not None else None
    except Exception:  # noqa: BLE001
        return None


def _try_torch():
    varlen = _torch_varlen_attn()
    what = "varlen_attn + SDPA(FLASH_ATTENTION)" if varlen is not None else "SDPA(FLASH_ATTENTION); no varlen_attn"
    active = _torch_active_flash_impl()
    if active:
        what += f", {active} activated"
    return _Impl("torch", f"torch {torch.__version__} built-in FlashAttention ({what})", _torch_sdpa_flash, varlen,
                 frozenset(), _params(varlen) if varlen is not None else frozenset())


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


#: the library finders, tried in ``settings.FLASH_IMPLS`` order ("torch", PyTorch's own kernels, comes last)
_FINDERS = {kind: {"fa3": _try_fa3, "fa2": _try_fa2, "fa4": _try_fa4}[kind]
            for kind in settings.FLASH_IMPLS if kind != "torch"}


@probe
def _detect() -> tuple[Optional[_Impl], str]:
    """``(implementation or None, reason when None)``. Cached; tests call ``_detect.cache_clear()``."""
    pinned = os.environ.get(ENV_IMPL, "").strip().lower()
    if pinned and pinned not in settings.FLASH_IMPLS:
        return None, f"${ENV_IMPL}={pinned!r} is not one of {', '.join(settings.FLASH_IMPLS)}"
    errors = []
    for kind, find in _FINDERS.items():
        if pinned and pinned != kind:
            continue
        try:
            return find(), ""
        except ImportError as e:
            if not isinstance(e, ModuleNotFoundError) or kind == pinned:
                errors.append(f"{kind}: {e}")
        except Exception as e:  # noqa: BLE001 - a broken install (CUDA/ABI mismatch) is reported, not raised
            errors.append(f"{kind} failed to import: {type(e).__name__}: {e}")
    if pinned and pinned != "torch":
        return None, f"${ENV_IMPL}={pinned} but it cannot be imported ({'; '.join(errors)})"
    if not _cuda_available():
        broken = f" ({'; '.join(errors)})" if errors else ""
        what = "CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
        return None, (f"flash-attn not installed{broken} (pip install flash-attn; or flash_attn_interface for FA3, "
                      f"flash_attn.cute for FA4) and torch {torch.__version__} has no CUDA device for its built-in "
                      f"FlashAttention kernels ({what})")
    return _try_torch(), ""


@host_lru(16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


class FlashBackend(Backend):
    name = "flash"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        max_head_dim=256,
        features=frozenset({"causal", "window", "block_diagonal", "key_padding", "softcap", "alibi"}),
        isolates_padding=True,        # KeyPadding gathers the valid keys; varlen reads each sequence's own
        isolates_sequences=True,
    )

    @property
    def implementation(self) -> str:  # type: ignore[override]
        impl, _ = _detect()
        return impl.label if impl is not None else ""

    def unavailable_reason(self) -> Optional[str]:
        impl, reason = _detect()
        if impl is None:
            return reason
        if impl.kind != "torch" and not _cuda_available():
            return f"{impl.label} is installed but torch has no CUDA device (torch.cuda.is_available() is False)"
        return None

    def extra_reasons(self, call: AttentionCall) -> list[str]:
        impl, _ = _detect()
        out = []
        if call.device.type == "cuda":
            cap = _capability(call.device.index if call.device.index is not None else torch.cuda.current_device())
            need = _MIN_CAPABILITY[impl.kind]
            if cap < need:
                out.append(f"{impl.kind} needs a GPU of compute capability >= {need[0]}.{need[1]}, this one is "
                           f"{cap[0]}.{cap[1]}")
        low = lower(call.plan)
        if isinstance(low, Refused):
            if call.plan.dense is None and call.plan.sparse is None:   # already refused by the capability table
                out.append(low.reason)
            return out
        out += _score_reasons(impl, call, low)
        if impl.kind == "torch":
            out += _torch_reasons(impl, call, low)
        elif impl.kind == "fa4" and call.return_lse:
            params = impl.params_dense if isinstance(low, FlashDense) else impl.params_varlen
            if "return_lse" not in params:
                out.append(f"{impl.label} has no return_lse: it returns the LSE only when gradients are needed")
        return out

    def forward(self, call: AttentionCall):
        impl, reason = _detect()
        if impl is None:
            raise RuntimeError(reason)
        low = lower(call.plan)
        if isinstance(low, Refused):
            raise ValueError(low.reason)
        if isinstance(low, FlashTiles):
            return run_tiles(call, self.forward)
        d_v = call.head_dim_v
        q, k, v = pad_head_dims(call.q, call.k, call.v)
        if isinstance(low, FlashVarlen):
            vl = low.varlen
            cu_q, cu_k = vl.cu_on(q.device)
            out, lse = _varlen(impl, q[0], k[0], v[0], cu_q, cu_k, vl.max_seqlen_q, vl.max_seqlen_k, call.scale,
                               vl.causal, flash_window_size(vl.window), call.return_lse, _score(call.plan))
            out, lse = out.unsqueeze(0), (lse.unsqueeze(0) if lse is not None else None)
        elif isinstance(low, FlashKeyPadding):
            out, lse = _key_padding(impl, q, k, v, call.plan, low, call.scale, call.return_lse, _score(call.plan))
        elif isinstance(low, FlashSplit):
            score = _score(call.plan)
            parts = [_dense(impl, q[:, :low.rows], k, v, FlashDense(True, key_stop=low.key_stop), call.scale,
                            call.return_lse, score),
                     _dense(impl, q[:, low.rows:], k, v, FlashDense(), call.scale, call.return_lse, score)]
            out = torch.cat([o for o, _ in parts], 1)
            lse = torch.cat([lse_ for _, lse_ in parts], -1) if call.return_lse else None
        else:
            out, lse = _dense(impl, q, k, v, low, call.scale, call.return_lse, _score(call.plan))
        if out.shape[-1] != d_v:
            out = out[..., :d_v]
        if lse is not None:
            lse = _fix_lse(lse)
        return out, lse


# ---------------------------------------------------------------------------------------------
# lowering, from the plan (pure Python on the plan's ints, plus tensor helpers; no kernel call)
#
# flash-attn ``window_size=(left, right)``: ``i + off - left <= j <= i + off + right`` (``off = Sk - Sq``,
# ``-1`` = unlimited); ``causal=True`` forces ``right = 0``. attnlib ``window=W`` is ``(W - 1, 0)``.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlashDense:
    """A dense call on flash-attn's bottom-right kernel: ``k[:, :key_stop]`` (None: every key) with
    ``causal`` / ``window_size``. Keys from ``key_stop`` on are never visible; ``key_stop=0``: no row
    sees a key (output 0, no kernel call)."""

    causal: bool = False
    window_size: tuple = (-1, -1)
    key_stop: Optional[int] = None


@dataclass(frozen=True)
class FlashSplit:
    """A causal diagonal right of the bottom-right one: rows ``[0, rows)`` run causal on ``k[:, :key_stop]``
    (where the diagonal is bottom-right), the later rows see every key (no causal)."""

    rows: int
    key_stop: int


@dataclass(frozen=True)
class FlashKeyPadding:
    """KeyPadding: every query sees key positions ``[key_start, key_stop)`` by structure; varlen over the
    valid keys of that span of each batch row (queries are never dropped)."""

    key_start: int
    key_stop: int


@dataclass(frozen=True)
class FlashVarlen:
    """Packed sequences: varlen with the plan's own sequences (:meth:`attnlib.plan.Plan.varlen`): cached
    ``cu_seqlens`` and Python-int max lengths."""

    varlen: Varlen


@dataclass(frozen=True)
class FlashTiles:
    """Tiles no single flash call takes (chunked causal, restricted packed plans): one dense call per run of
    equal tiles (strided views)."""


@dataclass(frozen=True)
class Refused:
    """The plan has no exact flash-attn form; ``reason`` is the sentence ``why_not`` reports."""

    reason: str


FlashLowering = Union[FlashDense, FlashSplit, FlashKeyPadding, FlashVarlen, FlashTiles, Refused]

KEY_PADDING_CAUSAL_REASON = ("KeyPadding(causal=True): flash's varlen-over-keys lowering cannot keep key positions "
                             "(queries see different spans of keys); use triton, sdpa, flex or xformers")


def _score(plan: Plan) -> tuple:
    """``(softcap, alibi_slopes)`` as flash-attn takes them (0.0 / None: off); ALiBi slopes float32 ``[H]``."""
    mods = plan.mods
    alibi = mods.alibi
    if alibi is not None and alibi.dim() == 2 and alibi.shape[0] == 1:
        alibi = alibi[0]
    return (mods.softcap or 0.0, alibi)


def flash_window_size(window: Optional[int]) -> tuple[int, int]:
    """attnlib ``window=W`` (the W newest keys, diagonal included) -> flash-attn ``(W - 1, 0)``."""
    return (-1, -1) if window is None else (window - 1, 0)


def lower(plan: Plan) -> FlashLowering:
    """How the call whose plan is ``plan`` runs on flash-attn. Pure Python, cheap: ``why_not`` and
    ``forward`` both call it."""
    if plan.dense is not None:
        return Refused("DenseMask: flash-attn takes no mask tensor; use sdpa, xformers or flex")
    if plan.sparse is not None:
        return Refused("BlockSparse: flash-attn takes no block layout; use triton, flex or sdpa")
    tile = plan.single
    if tile is not None and not plan.packed:
        if plan.key_valid is not None:
            return lower_key_padding_block(tile)
        return lower_block(tile)
    if plan.key_valid is not None:
        return Refused(f"a key-padding plan whose tile does not cover the call ({plan.describe()})")
    if not plan.tiles:
        return FlashDense(key_stop=0)                       # no row sees a key
    vl = plan.varlen() if plan.packed else None
    if vl is not None:
        return FlashVarlen(vl)
    for t in plan.tiles:
        low = lower_block(t)
        if isinstance(low, Refused):
            return low
    return FlashTiles()


def lower_block(block: Tile) -> Union[FlashDense, FlashSplit, Refused]:
    """The single block of a dense plan (no tensors) on flash-attn's bottom-right causal / window."""
    if not block.causal or block.full:
        return FlashDense()
    window = flash_window_size(block.window)
    offset, native = block.offset, block.k_len - block.q_len
    if offset == native:
        return FlashDense(True, window)
    if offset < native:
        # the last row's diagonal is key q_len - 1 + offset: later keys are never visible. On the first
        # q_len + offset keys the diagonal is bottom-right (q_len + offset <= 0: no row sees a key).
        return FlashDense(True, window, key_stop=max(block.q_len + offset, 0))
    if block.window is None:
        # a diagonal right of the bottom-right one (top-left with more queries than keys, ring steps): the
        # first rows see a prefix of the keys, bottom-right there; the rows after it see every key
        rows = min(block.q_len, max(0, block.k_len - 1 - offset))
        return FlashSplit(rows, rows + offset)
    what = f"a windowed causal block with diagonal offset {offset} ({block.q_len} queries x {block.k_len} keys)"
    return Refused(f"{what} cannot be expressed with flash-attn's bottom-right causal/window_size (its diagonal "
                   f"is at offset {native}); use sdpa, xformers, triton or flex")


def lower_key_padding_block(block: Tile) -> Union[FlashKeyPadding, Refused]:
    """KeyPadding's block: served when every query sees the same span of key positions (always without
    causal; with causal: one-query decode, or a diagonal past every key), then varlen over that span."""
    start, stop = block.visible_rows()
    if start == stop:
        return FlashKeyPadding(0, 0)                        # no row sees a key by structure
    first = block.key_span(0)
    if (start, stop) == (0, block.q_len) and block.key_span(block.q_len - 1) == first:
        return FlashKeyPadding(first[0], first[1] + 1)      # spans grow with the row: equal ends, equal all
    return Refused(KEY_PADDING_CAUSAL_REASON)


@dataclass(frozen=True)
class KeyPaddingVarlen:
    """Varlen arguments for a dense call with ``KeyPadding``: batch row ``b`` is one sequence.

    ``key_index`` (int64 ``[Tk]``) gathers the valid keys of ``k.reshape(B * Sk, ...)`` in order (any
    pattern: left, right, holes); queries are packed as ``q.reshape(B * Sq, ...)``, so
    ``cu_seqlens_q = [0, Sq, 2 Sq, ...]``. ``max_seqlen_k`` is ``Sk``, an upper bound known without a
    device sync. Rows with no valid key come from the plan (``Plan.empty_rows_on``).
    """

    key_index: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def uniform_cu_seqlens(batch: int, seqlen: int, device) -> torch.Tensor:
    """int32 ``[0, S, 2S, ..., B*S]`` on ``device`` (cached; no sync)."""
    return _uniform_cu(batch, seqlen, str(torch.device(device)))


@host_lru(256)
def _uniform_cu(batch: int, seqlen: int, device: str) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)[: batch + 1]


def lower_key_padding(valid: torch.Tensor, seqlen_q: int) -> KeyPaddingVarlen:
    """``valid`` bool ``[B, Sk]`` -> varlen arguments. One device sync (the number of valid keys)."""
    if valid.dtype != torch.bool or valid.dim() != 2:
        raise TypeError(f"valid must be a bool [B, Sk] tensor, got {valid.dtype} {tuple(valid.shape)}")
    batch, seqlen_k = valid.shape
    key_index = valid.reshape(-1).nonzero().squeeze(1)
    counts = valid.sum(dim=1, dtype=torch.int32)
    cu_k = torch.zeros(batch + 1, dtype=torch.int32, device=valid.device)
    cu_k[1:] = torch.cumsum(counts, 0, dtype=torch.int32)
    return KeyPaddingVarlen(key_index, uniform_cu_seqlens(batch, seqlen_q, valid.device), cu_k, seqlen_q, seqlen_k)


def unpad_keys(x: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
    """``x [B, Sk, H, D]`` -> the valid keys packed ``[Tk, H, D]`` (a gather; differentiable)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).index_select(0, key_index)


def pad_keys(packed: torch.Tensor, key_index: torch.Tensor, batch: int, seqlen_k: int) -> torch.Tensor:
    """Inverse of :func:`unpad_keys`: ``[Tk, H, D]`` -> ``[B, Sk, H, D]`` with zeros at invalid keys."""
    out = packed.new_zeros(batch * seqlen_k, *packed.shape[1:])
    out = out.index_copy(0, key_index, packed)
    return out.view(batch, seqlen_k, *packed.shape[1:])


def varlen_lse_to_dense(lse: torch.Tensor, batch: int, seqlen_q: int) -> torch.Tensor:
    """Varlen LSE ``[H, B * Sq]`` of equal-length sequences -> dense ``[B, H, Sq]`` (a view)."""
    return lse.view(lse.shape[0], batch, seqlen_q).permute(1, 0, 2)


def pad_head_dims(q, k, v, multiple: int = 8):
    """Zero-pad head dims to one common size, a multiple of ``multiple`` (flash kernels need both).

    Zero columns in q/k change no score; zero columns in v add zero output columns (sliced off by the
    caller, who keeps the original ``Dv``). Returns ``(q, k, v)`` unchanged when nothing is needed.
    """
    d, dv = q.shape[-1], v.shape[-1]
    target = -(-max(d, dv) // multiple) * multiple
    if d == dv == target:
        return q, k, v
    pad = torch.nn.functional.pad
    if d != target:
        q, k = pad(q, (0, target - d)), pad(k, (0, target - d))
    if dv != target:
        v = pad(v, (0, target - dv))
    return q, k, v


def _fix_lse(lse: torch.Tensor) -> torch.Tensor:
    """flash-attn writes LSE ``+inf`` for a row with no visible key; the attnlib contract is ``-inf``."""
    lse = lse.float()
    return torch.where(torch.isnan(lse) | (lse == float("inf")), torch.full_like(lse, _NEG_INF), lse)


# ---------------------------------------------------------------------------------------------
# dense calls (BSHD)
# ---------------------------------------------------------------------------------------------
def _dense(impl: _Impl, q, k, v, plan: FlashDense, scale: float, return_lse: bool, score=(0.0, None)):
    """BSHD in, ``(out, lse [B, H, Sq] | None)`` out, for one block without tensors (None or Causal)."""
    b, sq, hq = q.shape[:3]
    if plan.key_stop is not None:
        k, v = k[:, : plan.key_stop], v[:, : plan.key_stop]
    sk = k.shape[1]
    if sq == 0 or sk == 0:
        out = q.new_zeros(b, sq, hq, v.shape[-1])
        return out, (torch.full((b, hq, sq), _NEG_INF, device=q.device) if return_lse else None)
    if impl.kind == "torch":
        return _torch_dense(impl, q, k, v, plan, scale, return_lse)
    return _library_call(impl, q, k, v, None, None, sq, sk, scale, plan.causal, plan.window_size, return_lse, score)


def _key_padding(impl: _Impl, q, k, v, plan: Plan, span: FlashKeyPadding, scale: float, return_lse: bool,
                 score=(0.0, None)):
    """Varlen over the valid keys of each batch row (inside the span every query sees); every query row
    is kept, and the rows the plan reports empty return 0 / -inf."""
    b, sq, hq = q.shape[:3]
    if span.key_stop <= span.key_start:
        out = q.new_zeros(b, sq, hq, v.shape[-1])
        return out, (torch.full((b, hq, sq), _NEG_INF, device=q.device) if return_lse else None)
    k, v = k[:, span.key_start:span.key_stop], v[:, span.key_start:span.key_stop]
    low = lower_key_padding(plan.key_valid[:, span.key_start:span.key_stop].to(q.device), sq)
    qp = q.reshape(b * sq, *q.shape[2:])
    kp, vp = unpad_keys(k, low.key_index), unpad_keys(v, low.key_index)
    out, lse = _varlen(impl, qp, kp, vp, low.cu_seqlens_q, low.cu_seqlens_k, low.max_seqlen_q, low.max_seqlen_k,
                       scale, False, (-1, -1), return_lse, (score[0], None))
    out = out.view(b, sq, hq, out.shape[-1])
    empty = plan.empty_rows_on(q.device)                  # [B, 1, Sq or 1]: the [B, H, Sq] layout
    out = out.masked_fill(empty.transpose(1, 2).unsqueeze(-1), 0.0)
    if lse is not None:
        lse = varlen_lse_to_dense(lse, b, sq).masked_fill(empty, _NEG_INF)
    return out, lse


# ---------------------------------------------------------------------------------------------
# varlen calls (THD)
# ---------------------------------------------------------------------------------------------
def _varlen(impl: _Impl, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool, window,
            return_lse: bool, score=(0.0, None)):
    """THD in, ``(out [Tq, H, D], lse [H, Tq] | None)`` out."""
    if impl.kind == "torch":
        return _torch_varlen(impl, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, return_lse)
    return _library_call(impl, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, return_lse, score)


# ---------------------------------------------------------------------------------------------
# the library kernels (FA2/FA3/FA4) as one torch.library custom op
# ---------------------------------------------------------------------------------------------
def _library_call(impl: _Impl, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool, window,
                  return_lse: bool, score=(0.0, None)):
    """Dense (``cu_q is None``, BSHD) or varlen (THD) call of the installed flash-attn.

    Without gradients it goes through ``torch.ops.attnlib.flash_attention``: one opaque node with a fake
    implementation under torch.compile / torch.export. With gradients the library's own autograd function
    is called (flash-attn 2.7+ registers it as torch custom ops, so compiled training traces it too).
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _run_library(impl, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, tuple(window), return_lse, *score)
    out, lse = _flash_op(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, int(window[0]), int(window[1]), return_lse,
                         float(score[0]), score[1])
    return out, (lse if return_lse else None)


def _run_library(impl: _Impl, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, return_lse, softcap=0.0,
                 alibi=None):
    score = {}
    if softcap:
        score["softcap"] = float(softcap)
    if alibi is not None:
        score["alibi_slopes"] = alibi
    if cu_q is None:
        kwargs = _window_kwargs(impl, window, impl.params_dense)
        kwargs.update(_lse_kwargs(impl, impl.params_dense, return_lse))
        res = impl.dense(q, k, v, softmax_scale=scale, causal=causal, **kwargs, **score)
    else:
        kwargs = _window_kwargs(impl, window, impl.params_varlen)
        kwargs.update(_lse_kwargs(impl, impl.params_varlen, return_lse), **score)
        res = impl.varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal, **kwargs)
    return _split_result(res, return_lse)


def _lse_shape(q: torch.Tensor, varlen: bool) -> tuple:
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op("attnlib::flash_attention", mutates_args=())
def _flash_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: Optional[torch.Tensor],
              cu_k: Optional[torch.Tensor], max_q: int, max_k: int, scale: float, causal: bool, window_left: int,
              window_right: int, return_lse: bool, softcap: float = 0.0,
              alibi: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: LSE float32 ``[B, H, Sq]`` dense / ``[H, Tq]`` varlen, or an empty tensor."""
    impl, reason = _detect()
    if impl is None:
        raise RuntimeError(reason)
    out, lse = _run_library(impl, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, (window_left, window_right),
                            return_lse, softcap, alibi)
    if not return_lse:
        return out, q.new_empty((0,), dtype=torch.float32)
    want = _lse_shape(q, cu_q is not None)
    if tuple(lse.shape) != want:
        raise RuntimeError(f"{impl.label} returned an LSE of shape {tuple(lse.shape)}, expected {list(want)}")
    return out, lse.float()


@_flash_op.register_fake
def _flash_fake(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window_left, window_right, return_lse, softcap=0.0,
                alibi=None):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse_shape = _lse_shape(q, cu_q is not None) if return_lse else (0,)
    return out, q.new_empty(lse_shape, dtype=torch.float32)


def _window_kwargs(impl: _Impl, window, params: frozenset) -> dict:
    if impl.kind == "fa4":
        return {"window_size": (None, None) if tuple(window) == (-1, -1) else tuple(window)}
    if tuple(window) == (-1, -1):
        return {}
    return {"window_size": tuple(window)}


def _lse_kwargs(impl: _Impl, params: frozenset, return_lse: bool) -> dict:
    if not return_lse:
        return {}
    if "return_lse" in params:                  # FA4
        return {"return_lse": True}
    if "return_attn_probs" in params:           # FA2 (S_dmask stays empty without dropout), newer FA3
        return {"return_attn_probs": True}
    return {}                                   # older FA3 always returns (out, lse)


def _split_result(res, return_lse: bool):
    if isinstance(res, (tuple, list)):
        out, lse = res[0], (res[1] if len(res) > 1 else None)
    else:
        out, lse = res, None
    if return_lse and lse is None:
        raise RuntimeError("the flash implementation returned no LSE although it was requested")
    return out, (lse if return_lse else None)


# ---------------------------------------------------------------------------------------------
# PyTorch built-in flash kernels
# ---------------------------------------------------------------------------------------------
def _torch_sdpa_flash(q, k, v, scale: float, causal: bool):
    """BSHD in and out; SDPA restricted to its FlashAttention kernel (raises rather than falling back)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = {"enable_gqa": True} if qh.shape[1] != kh.shape[1] else {}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, **gqa)
    return out.transpose(1, 2)


def _sdpa_can(plan: FlashDense, sq: int, sk: int, return_lse: bool) -> bool:
    """SDPA's flash path: no LSE, and ``is_causal`` only where top-left == bottom-right (``Sq == Sk``)."""
    if return_lse or plan.window_size != (-1, -1):
        return False
    return not plan.causal or sq == sk


def _score_reasons(impl: _Impl, call: AttentionCall, low: FlashLowering) -> list[str]:
    """Softcap and ALiBi need a flash-attn that takes them (FA2 >= 2.6 both; FA3 and FA4 softcap), and ALiBi
    needs key positions flash-attn keeps (not gathered valid keys; a diagonal at its own offset)."""
    mods, out = call.plan.mods, []
    params = impl.params_varlen if isinstance(low, (FlashVarlen, FlashKeyPadding)) else impl.params_dense
    if mods.softcap is not None and "softcap" not in params:
        out.append(f"softcap: {impl.label} takes no softcap (flash-attn >= 2.6, FA3 and FA4 do)")
    if mods.alibi is not None:
        if "alibi_slopes" not in params:
            out.append(f"alibi_slopes: {impl.label} takes none (flash-attn 2 does)")
        elif mods.alibi.dim() == 2 and mods.alibi.shape[0] != 1 and isinstance(low, FlashVarlen):
            out.append("per-batch ALiBi slopes with packed sequences: flash-attn's varlen takes one slope per head")
        elif isinstance(low, FlashKeyPadding):
            out.append("ALiBi with KeyPadding: flash gathers the valid keys, which moves their positions")
        elif any(isinstance(lower_block(t), FlashSplit) or (not t.causal and not t.bottom_right)
                 for t in call.plan.tiles):
            out.append("ALiBi with a diagonal left of the bottom-right one: flash-attn measures distances from "
                       "the bottom-right one")
    return out


def _torch_reasons(impl: _Impl, call: AttentionCall, low: FlashLowering) -> list[str]:
    if isinstance(low, FlashDense):
        sk = low.key_stop if low.key_stop is not None else call.seqlen_k
        needs_varlen = not _sdpa_can(low, call.seqlen_q, sk, call.return_lse)
        windowed = low.window_size != (-1, -1)
    else:
        needs_varlen = True
        windowed = isinstance(low, FlashVarlen) and low.varlen.window is not None
    if not needs_varlen:
        return []
    params = impl.params_varlen
    if impl.varlen is None:
        return [f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (torch >= 2.10) and "
                "flash-attn is not installed: torch's built-in flash kernel serves only full or square-causal dense "
                "calls without LSE"]
    out = []
    if windowed and "window_size" not in params:
        out.append(f"torch {torch.__version__} varlen_attn has no window_size: sliding windows need flash-attn or "
                   "a newer torch")
    if call.return_lse and "return_aux" not in params:
        out.append(f"torch {torch.__version__} varlen_attn cannot return the LSE (no return_aux)")
    return out


def _torch_dense(impl: _Impl, q, k, v, plan: FlashDense, scale: float, return_lse: bool):
    b, sq, hq = q.shape[:3]
    sk = k.shape[1]
    if _sdpa_can(plan, sq, sk, return_lse):
        try:
            return impl.dense(q, k, v, scale, plan.causal), None
        except RuntimeError:
            # an FA3/FA4 build activated inside PyTorch raises on inputs it cannot take instead of falling
            # back; varlen_attn (below) is the same kernel family through another entry point
            if impl.varlen is None:
                raise
    # bottom-right causal with Sq != Sk, windows, LSE: flatten the batch into equal-length varlen sequences
    cu_q = uniform_cu_seqlens(b, sq, q.device)
    cu_k = uniform_cu_seqlens(b, sk, q.device)
    out, lse = _torch_varlen(impl, q.reshape(b * sq, *q.shape[2:]), k.reshape(b * sk, *k.shape[2:]),
                             v.reshape(b * sk, *v.shape[2:]), cu_q, cu_k, sq, sk, scale, plan.causal,
                             plan.window_size, return_lse)
    out = out.view(b, sq, hq, out.shape[-1])
    return out, (varlen_lse_to_dense(lse, b, sq) if lse is not None else None)


def _torch_varlen(impl: _Impl, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool, window,
                  return_lse: bool):
    params = impl.params_varlen
    hq, hkv = q.shape[1], k.shape[1]
    kwargs = {"scale": scale}
    if hq != hkv:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # older torch: expand kv heads (a copy)
            k, v = repeat_kv(k, hq // hkv, head_dim=1), repeat_kv(v, hq // hkv, head_dim=1)
    window = tuple(window)
    if "window_size" in params:
        # varlen_attn has no is_causal: causal is exactly window_size == (-1, 0) (a tuple, compared by value)
        kwargs["window_size"] = (window[0], 0) if causal else window
    elif causal:
        kwargs["is_causal"] = True
    if return_lse:
        from torch.nn.attention.varlen import AuxRequest
        kwargs["return_aux"] = AuxRequest(lse=True)
    res = impl.varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    out, lse = (res[0], res[1]) if isinstance(res, (tuple, list)) else (res, None)
    if lse is not None:
        lse = _torch_lse_layout(lse, q.shape[0], hq)
    return out, lse


def _torch_lse_layout(lse: torch.Tensor, total_q: int, heads: int) -> torch.Tensor:
    """varlen_attn's LSE is the kernel's ``[H, Tq]`` (its docstring says ``[Tq, H]``): accept both."""
    if tuple(lse.shape) == (heads, total_q):
        return lse
    if tuple(lse.shape) == (total_q, heads):
        return lse.transpose(0, 1)
    raise RuntimeError(f"varlen_attn returned LSE of shape {tuple(lse.shape)}, expected [{heads}, {total_q}]")
