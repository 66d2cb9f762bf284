"""``flash``: FlashAttention, dense and varlen, from the best implementation installed.

Implementations, detected lazily (importing this module never fails), first found wins:

1. FA3 ``flash_attn_interface`` (Hopper build of flash-attn 3);
2. FA2 ``flash_attn`` (``flash_attn_func`` / ``flash_attn_varlen_func``);
3. FA4 ``flash_attn.cute`` (CuTe-DSL, Hopper/Blackwell; ``window_size=(None, None)``, returns a tuple);
4. PyTorch's built-in FlashAttention kernels when torch has CUDA: ``torch.nn.attention.varlen.varlen_attn``
   (torch >= 2.10) for varlen, and SDPA restricted to ``SDPBackend.FLASH_ATTENTION`` for plain dense calls.

``$ATTNLIB_FLASH_IMPL`` (``fa3``, ``fa2``, ``fa4``, ``torch``) pins one; ``implementation`` names the one in use.

Lowering (pure helpers in :mod:`attnlib.backends.lowering`):

- ``Causal``: flash-attn's causal is bottom-right (>= 2.1), window ``W`` is ``window_size=(W-1, 0)``.
  Top-left with ``Sk > Sq`` runs on the first ``Sq`` keys (the rest are never visible, and then the two
  alignments agree); top-left with ``Sq > Sk`` is reported in ``why_not``.
- ``BlockDiagonal``: ``flash_attn_varlen_func`` with the mask's cached device ``cu_seqlens`` and
  Python-int max lengths (no device sync); causal / window per block, bottom-right.
- ``KeyPadding``: varlen over *keys* only: the valid keys of every batch row are gathered with an index
  (any pattern: left, right, holes), queries stay ``[B*Sq]`` (never dropped), output reshaped back.
- ``DenseMask``: not expressible (``why_not``).
- Head dims are zero-padded to one multiple of 8 when needed (``Dv != D`` or ``D % 8``).
- Rows with no visible key: flash-attn writes output 0 and LSE ``+inf``; LSE is mapped to ``-inf``.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..inputs import AttentionCall
from ..masks import BlockDiagonal, Causal, KeyPadding
from .base import ALL_MASK_FEATURES, Backend, Capabilities
from .common import repeat_kv
from .lowering import (flash_causal_plan, flash_window_size, lower_key_padding, pad_head_dims, uniform_cu_seqlens,
                       unpad_keys, varlen_lse_to_dense)

ENV_IMPL = "ATTNLIB_FLASH_IMPL"
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


_FINDERS = {"fa3": _try_fa3, "fa2": _try_fa2, "fa4": _try_fa4}


@functools.lru_cache(maxsize=1)
def _detect() -> tuple[Optional[_Impl], str]:
    """``(implementation or None, reason when None)``. Cached; tests call ``_detect.cache_clear()``."""
    pinned = os.environ.get(ENV_IMPL, "").strip().lower()
    if pinned and pinned not in (*_FINDERS, "torch"):
        return None, f"${ENV_IMPL}={pinned!r} is not one of fa3, fa2, fa4, torch"
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


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


class FlashBackend(Backend):
    name = "flash"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        max_head_dim=256,
        masks=ALL_MASK_FEATURES - {"dense"},
        notes=("bottom-right causal native; top-left only when Sk >= Sq", "KeyPadding via varlen over keys",
               "head dims zero-padded to a multiple of 8"),
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
        mask = call.mask
        if isinstance(mask, Causal):
            plan = flash_causal_plan(mask, call.seqlen_q, call.seqlen_k)
            if plan.reason:
                out.append(plan.reason)
        if impl.kind == "torch":
            out += _torch_reasons(impl, call)
        elif impl.kind == "fa4" and call.return_lse:
            params = impl.params_varlen if isinstance(mask, (BlockDiagonal, KeyPadding)) else impl.params_dense
            if "return_lse" not in params:
                out.append(f"{impl.label} has no return_lse: it returns the LSE only when gradients are needed")
        return out

    def forward(self, call: AttentionCall):
        impl, reason = _detect()
        if impl is None:
            raise RuntimeError(reason)
        d_v = call.head_dim_v
        q, k, v = pad_head_dims(call.q, call.k, call.v)
        mask = call.mask
        if isinstance(mask, BlockDiagonal):
            out, lse = _varlen(impl, q, k, v, mask.cu_seqlens_q_on(q.device), mask.cu_seqlens_k_on(q.device),
                               mask.max_seqlen_q, mask.max_seqlen_k, call.scale, mask.causal,
                               flash_window_size(mask.window), call.return_lse)
        elif isinstance(mask, KeyPadding):
            out, lse = _key_padding(impl, q, k, v, mask, call.scale, call.return_lse)
        else:
            if call.packed:
                q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            out, lse = _dense(impl, q, k, v, mask, call.scale, call.return_lse)
            if call.packed:
                out, lse = out[0], (lse[0] if lse is not None else None)
        if out.shape[-1] != d_v:
            out = out[..., :d_v]
        if lse is not None:
            lse = _fix_lse(lse)
        return out, lse


def _fix_lse(lse: torch.Tensor) -> torch.Tensor:
    """flash-attn writes LSE ``+inf`` for a row with no visible key; the attnlib contract is ``-inf``."""
    lse = lse.float()
    return torch.where(torch.isnan(lse) | (lse == float("inf")), torch.full_like(lse, _NEG_INF), lse)


# ---------------------------------------------------------------------------------------------
# dense calls (BSHD)
# ---------------------------------------------------------------------------------------------
def _dense(impl: _Impl, q, k, v, mask, scale: float, return_lse: bool):
    """BSHD in, ``(out, lse [B, H, Sq] | None)`` out, for mask None or Causal."""
    b, sq, hq = q.shape[:3]
    plan = flash_causal_plan(mask, sq, k.shape[1])
    if plan.reason:
        raise ValueError(plan.reason)
    if plan.key_stop is not None:
        k, v = k[:, : plan.key_stop], v[:, : plan.key_stop]
    sk = k.shape[1]
    if sq == 0 or sk == 0:
        out = q.new_zeros(b, sq, hq, v.shape[-1])
        return out, (torch.full((b, hq, sq), _NEG_INF, device=q.device) if return_lse else None)
    if impl.kind == "torch":
        return _torch_dense(impl, q, k, v, plan, scale, return_lse)
    kwargs = _window_kwargs(impl, plan.window_size, impl.params_dense)
    kwargs.update(_lse_kwargs(impl, impl.params_dense, return_lse))
    res = impl.dense(q, k, v, softmax_scale=scale, causal=plan.causal, **kwargs)
    return _split_result(res, return_lse)


def _key_padding(impl: _Impl, q, k, v, mask: KeyPadding, scale: float, return_lse: bool):
    """Varlen over the valid keys of each batch row; every query row is kept."""
    b, sq, hq = q.shape[:3]
    low = lower_key_padding(mask.valid, sq)
    qp = q.reshape(b * sq, *q.shape[2:])
    kp, vp = unpad_keys(k, low.key_index), unpad_keys(v, low.key_index)
    out, lse = _varlen(impl, qp, kp, vp, low.cu_seqlens_q, low.cu_seqlens_k, low.max_seqlen_q, low.max_seqlen_k,
                       scale, False, (-1, -1), return_lse)
    out = out.view(b, sq, hq, out.shape[-1])
    empty = low.empty_rows[:, None, None]                 # broadcasts over [B, Sq, H] and [B, H, Sq]
    out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    if lse is not None:
        lse = varlen_lse_to_dense(lse, b, sq).masked_fill(empty, _NEG_INF)
    return out, lse


# ---------------------------------------------------------------------------------------------
# varlen calls (THD)
# ---------------------------------------------------------------------------------------------
def _varlen(impl: _Impl, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool, window,
            return_lse: bool):
    """THD in, ``(out [Tq, H, D], lse [H, Tq] | None)`` out."""
    if impl.kind == "torch":
        return _torch_varlen(impl, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, return_lse)
    kwargs = _window_kwargs(impl, window, impl.params_varlen)
    kwargs.update(_lse_kwargs(impl, impl.params_varlen, return_lse))
    res = impl.varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal, **kwargs)
    return _split_result(res, return_lse)


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


def _sdpa_can(plan, sq: int, sk: int, return_lse: bool) -> bool:
    """SDPA's flash path: no LSE, and ``is_causal`` only where top-left == bottom-right (``Sq == Sk``)."""
    if return_lse or plan.window_size != (-1, -1):
        return False
    return not plan.causal or sq == sk


def _torch_reasons(impl: _Impl, call: AttentionCall) -> list[str]:
    mask = call.mask
    if isinstance(mask, (BlockDiagonal, KeyPadding)):
        needs_varlen = True
    elif mask is not None and not isinstance(mask, Causal):
        return []                                   # DenseMask: already refused by the capability table
    else:
        plan = flash_causal_plan(mask, call.seqlen_q, call.seqlen_k)
        if plan.reason:
            return []
        sk = plan.key_stop if plan.key_stop is not None else call.seqlen_k
        needs_varlen = not _sdpa_can(plan, call.seqlen_q, sk, call.return_lse)
    if not needs_varlen:
        return []
    params = impl.params_varlen
    if impl.varlen is None:
        return [f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (torch >= 2.10) and "
                "flash-attn is not installed: torch's built-in flash kernel serves only full or square-causal dense "
                "calls without LSE"]
    out = []
    if getattr(mask, "window", None) is not None and "window_size" not in params:
        out.append(f"torch {torch.__version__} varlen_attn has no window_size: sliding windows need flash-attn or "
                   "a newer torch")
    if call.return_lse and "return_aux" not in params:
        out.append(f"torch {torch.__version__} varlen_attn cannot return the LSE (no return_aux)")
    return out


def _torch_dense(impl: _Impl, q, k, v, plan, scale: float, return_lse: bool):
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
