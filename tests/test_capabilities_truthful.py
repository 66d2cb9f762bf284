"""Every ``Capabilities`` claim of every backend that runs here is true, and every non-claim is refused.

For each claim (each dtype, each mask feature, GQA, LSE, autograd on this device, Dv != D, packed THD) a
tiny call that needs exactly that claim on top of a plain baseline (fp32, no mask, Hq == Hkv, D == Dv,
dense BSHD, no LSE, no grad) must have an empty ``why_not`` and match the float64 reference under the
tolerance policy (``attnlib.testing``). For each thing a backend does not claim, ``why_not`` must say so.
Shapes are shared between calls (flex compiles once per shape family on CPU).
"""
import os

import pytest
import torch

import attnlib
from attnlib.backends import ALL_FEATURES, Backend, Capabilities
from attnlib.inputs import validate_call
from attnlib.masks import BlockDiagonal, BlockSparse, Causal, DenseMask, KeyPadding
from attnlib.reference import reference_for
from attnlib.registry import get_backend
from attnlib.testing import compare, gradient_magnitudes, reference_and_naive

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, S, H, D, DV = 1, 16, 2, 32, 16          # one shape for every call (B=1: packed THD reuses it)
ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _backends():
    names = []
    for row in attnlib.list_backends():
        if row["name"] not in ("math", "sdpa", "flex", "triton") or not row["available"]:
            continue
        if row["name"] == "triton" and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        names.append(row["name"])
    return names


BACKENDS = _backends()


def _mask_for(feature: str):
    """``(mask, packed, modifiers)``: the smallest call that needs ``feature`` (block_diagonal needs packed THD)."""
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, 11:] = False
    g = torch.Generator().manual_seed(1)
    dense = torch.rand(B, 1, S, S, generator=g) > 0.4
    layout = torch.rand(4, 4, generator=g) > 0.5
    if feature == "paged":
        return None, True, {}
    mods = {"softcap": {"softcap": 2.0}, "alibi": {"alibi_slopes": torch.tensor([0.5, 0.25], device=DEVICE)},
            "sinks": {"sinks": torch.tensor([0.3, -1.0], device=DEVICE)}}
    if feature in mods:
        return None, False, mods[feature]
    return {
        "causal": (Causal(), False, {}),
        "window": (Causal(window=5), False, {}),
        "multi_tile": (Causal(window=3, sink=2), False, {}),
        "block_diagonal": (BlockDiagonal([5, 11]), True, {}),
        "key_padding": (KeyPadding(valid.to(DEVICE)), False, {}),
        "dense": (DenseMask(dense.to(DEVICE)), False, {}),
        "block_sparse": (BlockSparse(layout, 4), False, {}),
    }[feature]


def _inputs(dtype=torch.float32, *, hkv=H, dv=D, packed=False, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if packed else (B,)
    make = lambda h, d: torch.randn(*lead, S, h, d, generator=g).to(DEVICE, dtype)  # noqa: E731
    q, k, v = make(H, D), make(hkv, D), make(hkv, dv)
    if grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    return q, k, v


def _claims(caps: Capabilities):
    """``(claim id, call kwargs)`` for each claim of ``caps``."""
    out = [(f"dtype={str(d)[6:]}", dict(dtype=d)) for d in ALL_DTYPES if d in caps.dtypes]
    out += [(f"feature={f}", dict(feature=f)) for f in sorted(caps.served() - {"paged"})]
    if caps.gqa:
        out.append(("gqa", dict(hkv=1)))
    if caps.lse:
        out.append(("lse", dict(lse=True)))
    if caps.autograd_on(DEVICE):
        out.append((f"autograd-{DEVICE}", dict(grad=True)))
    if caps.head_dim_v_differs:
        out.append(("dv!=d", dict(dv=DV)))
    return out


def _non_claims(caps: Capabilities):
    out = [(f"dtype={str(d)[6:]}", dict(dtype=d)) for d in ALL_DTYPES if d not in caps.dtypes]
    out += [(f"feature={f}", dict(feature=f)) for f in sorted(ALL_FEATURES - caps.served())]
    if not caps.gqa:
        out.append(("gqa", dict(hkv=1)))
    if not caps.lse:
        out.append(("lse", dict(lse=True)))
    if not caps.autograd_on(DEVICE):
        out.append((f"autograd-{DEVICE}", dict(grad=True)))
    if not caps.head_dim_v_differs:
        out.append(("dv!=d", dict(dv=DV)))
    if caps.max_head_dim is not None:
        out.append(("head_dim>max", dict(d=caps.max_head_dim + 8)))
    return out


def _call(dtype=torch.float32, feature=None, hkv=H, dv=D, lse=False, grad=False, packed=False, d=None):
    """``(q, k, v, mask, lse, modifiers)``"""
    mask, mods = None, {}
    if feature is not None:
        mask, packed, mods = _mask_for(feature)
    if d is not None:                                   # only the "too large a head dim" refusal
        q = k = v = torch.zeros(B, S, H, d, device=DEVICE, dtype=dtype)
    else:
        q, k, v = _inputs(dtype, hkv=hkv, dv=dv, packed=packed, grad=grad)
    return q, k, v, mask, lse, mods


def _params(claims: bool):
    out = []
    for name in BACKENDS:
        caps = get_backend(name).capabilities
        if DEVICE not in caps.devices:
            continue
        for cid, kw in (_claims(caps) if claims else _non_claims(caps)):
            out.append(pytest.param(name, kw, id=f"{name}-{cid}"))
    return out


@pytest.mark.parametrize("backend,kw", _params(claims=True))
def test_each_claim_serves_and_matches_the_reference(backend, kw):
    q, k, v, mask, lse, mods = _call(**kw)
    call = validate_call(q, k, v, mask, None, lse, **mods)
    assert get_backend(backend).why_not(call) == [], f"{backend} claims {kw} but refuses it"
    dtype = q.dtype
    res = attnlib.attention(q, k, v, mask, backend=backend, return_lse=lse, **mods)
    out, got_lse = res if lse else (res, None)
    (ref, ref_lse), (naive, naive_lse) = reference_and_naive(q, k, v, mask, call.scale, **mods)
    checks = [compare(out, ref, naive, dtype, "out")]
    if lse:
        checks.append(compare(got_lse, ref_lse, naive_lse, torch.float32 if dtype == torch.float64 else dtype, "lse"))
    if kw.get("grad"):
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
        got = torch.autograd.grad(out, (q, k, v), dout)
        leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        ref_g = torch.autograd.grad(reference_for(*leaves64, mask, call.scale, compute_dtype=torch.float64)[0],
                                    leaves64, dout.double())
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        naive_g = torch.autograd.grad(reference_for(*leaves, mask, call.scale, compute_dtype=dtype)[0], leaves, dout)
        mags = gradient_magnitudes(q, k, v, dout, call.scale)
        checks += [compare(g, r, n, dtype, w, mags[w]) for g, r, n, w in zip(got, ref_g, naive_g, ("dq", "dk", "dv"))]
    for c in checks:
        assert c.passed, f"{backend} {kw} {c.what}: error {c.error:.3g} > tolerance {c.tol:.3g}"


@pytest.mark.parametrize("backend,kw", _params(claims=False))
def test_each_non_claim_is_refused(backend, kw):
    q, k, v, mask, lse, mods = _call(**kw)
    assert get_backend(backend).why_not(validate_call(q, k, v, mask, None, lse, **mods)), \
        f"{backend} serves {kw} unclaimed"


def test_a_device_outside_the_claims_is_refused():
    for name in BACKENDS:
        caps = get_backend(name).capabilities
        for dev in {"cpu", "cuda"} - caps.devices:
            assert any(f"device={dev}" in r for r in caps.reasons(_FakeCall(dev))), name


class _FakeCall:
    """Just enough of an AttentionCall for ``Capabilities.reasons`` on a device this machine lacks."""

    def __init__(self, dev):
        self.device, self.dtype = torch.device(dev), torch.float32
        self.head_dim = self.head_dim_v = D
        self.features, self.packed, self.heads_q, self.heads_kv = frozenset(), False, H, H
        self.mask = None
        self.return_lse = self.requires_grad = False


class _Nothing(Backend):
    """Claims only the baseline: every optional field off (what a minimal third-party backend declares)."""

    name = "claims_nothing"
    capabilities = Capabilities(devices=frozenset({DEVICE}), dtypes=frozenset({torch.float32}), max_head_dim=D,
                                features=frozenset(), gqa=False, lse=False, autograd=False,
                                head_dim_v_differs=False)


@pytest.mark.parametrize("cid,kw", _non_claims(_Nothing.capabilities), ids=lambda x: x if isinstance(x, str) else "")
def test_every_field_refuses_when_not_claimed(cid, kw):
    q, k, v, mask, lse, mods = _call(**kw)
    reasons = _Nothing().why_not(validate_call(q, k, v, mask, None, lse, **mods))
    # one sentence per missing capability (D > max also has Dv > max)
    assert len(reasons) == (2 if cid == "head_dim>max" else 1), (cid, reasons)
    q, k, v, mask, lse, _ = _call()
    assert _Nothing().why_not(validate_call(q, k, v, mask, None, lse)) == []


def test_autograd_per_device_is_one_sentence_naming_where_it_works():
    caps = Capabilities(devices=frozenset({"cpu", "cuda"}), autograd=frozenset({"cuda"}))
    q, k, v = _inputs(grad=True)
    reasons = caps.reasons(validate_call(q, k, v))
    if DEVICE == "cpu":
        assert reasons == ["autograd (inputs require grad) on device=cpu (supported: cuda)"]
    assert caps.autograd_on("cuda") and not caps.autograd_on("mps")
    with torch.no_grad():
        assert caps.reasons(validate_call(q, k, v)) == []
