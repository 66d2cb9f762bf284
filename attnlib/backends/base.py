"""What every backend is: capabilities as data, reasons as sentences, and one ``forward``.

A backend module reads top to bottom: ``Capabilities``, ``unavailable_reason`` (environment),
``extra_reasons`` (call-specific limits the table cannot express), mask lowering, the call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    """What a backend can serve. ``why_not`` turns a mismatch into a sentence per field."""

    devices: frozenset = frozenset({"cpu", "cuda"})
    dtypes: frozenset = frozenset({torch.float16, torch.bfloat16, torch.float32})
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    masks: frozenset = ALL_MASK_FEATURES
    packed: bool = True          # THD inputs (with BlockDiagonal)
    gqa: bool = True
    lse: bool = True
    autograd: bool = True
    head_dim_v_differs: bool = True  # Dv != D
    notes: tuple = field(default=())

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
            elif d % self.head_dim_multiple:
                out.append(f"{what}={d} (must be a multiple of {self.head_dim_multiple})")
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
        if call.requires_grad and not self.autograd:
            out.append("autograd (inputs require grad) is not supported")
        if call.head_dim_v != call.head_dim and not self.head_dim_v_differs:
            out.append(f"head_dim_v={call.head_dim_v} != head_dim={call.head_dim} is not supported")
        return out


class Backend:
    """Base class. Subclasses set ``name``, ``capabilities`` and implement ``forward``."""

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: which implementation runs (e.g. "flash-attn 2.8.3"); shown by ``attnlib info``
    implementation: str = ""

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run in this process at all (package missing...); None if it can."""
        return None

    def extra_reasons(self, call: AttentionCall) -> list[str]:
        """Call-specific limits the capability table cannot express."""
        return []

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
