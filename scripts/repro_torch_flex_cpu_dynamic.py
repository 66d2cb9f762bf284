#!/usr/bin/env python
"""Standalone reproduction: compiled ``flex_attention`` on CPU, dynamic shapes, wrong results.

Needs only torch (CPU build, an x86 CPU with AVX2 and a C++ compiler, as torch's CPU flex kernel does).
Run: ``python scripts/repro_torch_flex_cpu_dynamic.py``. Exit code 1: the defect is present (details
printed); 0: this torch computes every call right (the guard in attnlib's ``flex`` backend may go).

What happens: ``torch.compile(flex_attention)`` first compiles for static shapes. A second call with a
different key length makes dynamo recompile with symbolic sizes (automatic dynamic shapes), and the
C++ flex template then indexes the ``mask_mod``'s tensor (here a key-padding table ``valid[B, Sk]``
read from a global) with the query block size instead of its own size: "index out of bounds"
errors for some shapes and silently wrong outputs for others. Eager ``flex_attention`` is right, and so
is the compiled one with ``dynamic=False``. Seen with torch 2.13.0+cpu.
"""
from __future__ import annotations

import sys

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

#: (B, H, Sq, Sk, D): the first compiles static; the second recompiles dynamic and raises, the third is
#: silently wrong
SHAPES = ((3, 1, 5, 24, 16), (3, 1, 5, 9, 16), (3, 1, 10, 9, 16))
TOLERANCE = 1e-4

valid = torch.ones(1, 1, dtype=torch.bool)   # the key-padding table the mask_mod reads (set per call)


def key_padding(b, h, q_idx, kv_idx):
    return valid[b, kv_idx]


def one_call(compiled, batch: int, heads: int, sq: int, sk: int, d: int) -> str | None:
    """None when the compiled call matches a float64 reference, else what went wrong."""
    global valid
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, sq, d, generator=g)
    k = torch.randn(batch, heads, sk, d, generator=g)
    v = torch.randn(batch, heads, sk, d, generator=g)
    valid = torch.rand(batch, sk, generator=g) > 0.3
    valid[:, -1] = True                                        # every row sees at least one key
    block_mask = create_block_mask(key_padding, batch, None, sq, sk, device="cpu")
    scores = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5
    ref = torch.softmax(scores.masked_fill(~valid[:, None, None, :], float("-inf")), -1) @ v.double()
    try:
        out = compiled(q, k, v, block_mask=block_mask)
    except RuntimeError as e:
        return f"RuntimeError: {str(e).splitlines()[-1].strip()[-100:]}"
    err = (out.double() - ref).abs().nan_to_num(float("inf")).max().item()
    return None if err <= TOLERANCE else f"max |error| {err:.3g} vs float64 (tolerance {TOLERANCE})"


def main() -> int:
    print(f"torch {torch.__version__}")
    compiled = torch.compile(flex_attention, fullgraph=True)
    bad = 0
    for shape in SHAPES:
        problem = one_call(compiled, *shape)
        bad += problem is not None
        print(f"  B,H,Sq,Sk,D={shape}: {problem or 'ok'}")
    print("defect present" if bad else "defect not reproduced: every compiled call is right")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
