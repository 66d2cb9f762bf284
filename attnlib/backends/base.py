"""What every backend is: capabilities as data, reasons as sentences, and one ``forward``.

A backend module reads top to bottom: ``Capabilities``, ``unavailable_reason`` (environment),
``extra_reasons`` (call-specific limits the table cannot express), mask lowering, the call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..inputs import AttentionCall

#: every mask capability name (``attnlib.masks.mask_features`` produces subsets of these)
ALL_MASK_FEATURES = frozenset({"causal", "top_left", "window", "block_diagonal", "key_padding", "dense"})

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype))


@dataclass(frozen=True)
class Capabilities:
    """What a backend can serve: every field is a claim ``tests/test_capabilities_truthful.py`` checks
    by running it. ``reasons`` turns each mismatch with a call into one sentence; limits the fields
    cannot express belong in ``Backend.extra_reasons``."""

    devices: frozenset = frozenset({"cpu", "cuda"})
    dtypes: frozenset = frozenset({torch.float16, torch.bfloat16, torch.float32})
    max_head_dim: int | None = None      # for D and Dv; None: any
    masks: frozenset = ALL_MASK_FEATURES
    packed: bool = True                  # THD inputs (with BlockDiagonal)
    gqa: bool = True                     # Hq != Hkv
    lse: bool = True                     # return_lse=True
    #: backward: True (on every device of ``devices``), False (nowhere) or the device types that have it
    autograd: bool | frozenset = True
    head_dim_v_differs: bool = True      # Dv != D

    def autograd_on(self, device_type: str) -> bool:
        """Whether calls whose inputs require grad are served on ``device_type``."""
        if isinstance(self.autograd, bool):
            return self.autograd and device_type in self.devices
        return device_type in self.autograd and device_type in self.devices

    def reasons(self, call: AttentionCall) -> list[str]:
        out = []
        dev = call.device.type
        if dev not in self.devices:
            out.append(f"device={dev} (supported: {', '.join(sorted(self.devices))})")
        if call.dtype not in self.dtypes:
            names = ", ".join(sorted(dtype_name(d) for d in self.dtypes))
            out.append(f"dtype={dtype_name(call.dtype)} (supported: {names})")
        for d, what in ((call.head_dim, "head_dim"), (call.head_dim_v, "head_dim_v")):
            if self.max_head_dim is not None and d > self.max_head_dim:
                out.append(f"{what}={d} (supported: <= {self.max_head_dim})")
        missing = call.features - self.masks
        if missing:
            out.append(f"mask {type(call.mask).__name__} needs {', '.join(sorted(missing))} "
                       f"(supported: {', '.join(sorted(self.masks)) or 'no mask'})")
        if call.packed and not self.packed:
            out.append("packed THD inputs are not supported")
        if call.heads_q != call.heads_kv and not self.gqa:
            out.append(f"GQA/MQA (Hq={call.heads_q}, Hkv={call.heads_kv}) is not supported")
        if call.return_lse and not self.lse:
            out.append("return_lse=True is not supported")
        if call.requires_grad and dev in self.devices and not self.autograd_on(dev):
            where = sorted(self.autograd & self.devices) if not isinstance(self.autograd, bool) else []
            out.append(f"autograd (inputs require grad) on device={dev} (supported: {', '.join(where)})" if where
                       else "autograd (inputs require grad) is not supported")
        if call.head_dim_v != call.head_dim and not self.head_dim_v_differs:
            out.append(f"head_dim_v={call.head_dim_v} != head_dim={call.head_dim} is not supported")
        return out


class Backend:
    """Base class. Subclasses set ``name``, ``capabilities`` and implement ``forward``."""

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: which implementation runs (e.g. "flash-attn 2.8.3"); shown by ``attnlib info``
    implementation: str = ""
    #: True when the returned LSE is differentiable (its gradient reaches q and k); otherwise the front
    #: door attaches the exact gradient (``attnlib.lse_gradient``), so gradients through the LSE are right
    #: on every backend
    lse_has_gradient: ClassVar[bool] = False

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run in this process at all (package missing...); None if it can."""
        return None

    def extra_reasons(self, call: AttentionCall) -> list[str]:
        """Call-specific limits the capability table cannot express."""
        return []

    def run_probes(self) -> None:
        """Run (and cache) every environment probe ``why_not`` may consult, outside any compiled region:
        the registry calls it once before the first selection, so compiled code only reads cached values.
        Backends whose ``extra_reasons`` consult more probes than ``unavailable_reason`` extend it."""
        self.unavailable_reason()

    def why_not(self, call: AttentionCall) -> list[str]:
        """Sentences saying why this backend cannot serve ``call``; empty means it can."""
        env = self.unavailable_reason()
        if env:
            return [env]
        return self.capabilities.reasons(call) + self.extra_reasons(call)

    def forward(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(out, lse)``; ``lse`` is None unless ``call.return_lse``. Packed calls are THD."""
        raise NotImplementedError

    def __repr__(self):
        return f"<attnlib backend {self.name!r}>"


class PlaceholderBackend(Backend):
    """A registered name whose implementation is not built yet: it resolves and falls back cleanly."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self._reason = reason

    def unavailable_reason(self) -> str | None:
        return self._reason

    def forward(self, call):  # pragma: no cover - never selected
        raise RuntimeError(self._reason)
