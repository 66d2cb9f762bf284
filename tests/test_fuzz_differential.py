"""Differential fuzzing: every backend that runs here against an independent float64 reference.

Each example is one random call: lengths biased towards 1, multiples of 8 and 16 and their neighbours;
head dims 8..256 (non-powers of two included) and ``Dv != D``; GQA ratios 1/2/4; every mask kind and
option (alignment, windows, chunks, sinks, per-block caches, empty blocks, fully masked rows, holes in the
padding, additive masks, block-sparse layouts per head with partial blocks), every score modifier
(softcap, ALiBi slopes per head or per batch row, learnable sinks), paged keys (shuffled pages, page sizes
1..16, partial last pages); fp32 and bf16; the LSE always and gradients (sinks included) where the backend
differentiates. Garbage (NaN, inf, huge values) is planted in every key and value slot the mask hides as
padding or as another sequence, and in unused pages: it must never reach an output. Examples run one
after another in this process, so they also catch caches that go stale across shapes.

The oracle is ``tests/reference64.py`` (not the ``math`` backend); the tolerance is attnlib's one policy
(``attnlib.testing``). A backend that refuses a call it must serve fails the test: the strategies leave
out only what a backend documents it cannot do here (DenseMask on ``triton``, gradients on CPU ``flex``).

CI runs a fixed, derandomized budget per backend; ``pytest --fuzz-long`` runs 20x as many random ones.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import attnlib
from attnlib import BlockDiagonal, BlockSparse, Causal, DenseMask, KeyPadding
from attnlib.inputs import validate_call
from attnlib.registry import get_backend
from attnlib.testing import compare, gradient_magnitudes

from reference64 import attention64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Limits:
    """What one backend's examples may contain on this machine (features beyond these: what its capability
    table serves)."""

    examples: int
    max_len: int = 130
    max_head_dim: int = 256
    grads: bool = True
    served: frozenset = frozenset()


#: per backend: the CI budget and shape limits (flex compiles per shape, triton runs interpreted on CPU)
LIMITS = {
    "math": Limits(40),
    "sdpa": Limits(40),
    "flex": Limits(12, grads=DEVICE != "cpu"),
    "triton": Limits(10, max_len=24 if DEVICE == "cpu" else 130),
    "flash": Limits(40),
    "xformers": Limits(40),
}
LONG_FACTOR = 20

#: lengths where tiled kernels change behaviour: tile multiples and their neighbours
RISKY_LENGTHS = sorted({n + e for n in (8, 16, 24, 32, 40, 48, 64, 128) for e in (-1, 0, 1)} | {1, 2, 3})
HEAD_DIMS = (8, 12, 16, 24, 32, 40, 48, 64, 72, 80, 96, 128, 160, 192, 256)


def _lengths(lim: Limits, minimum: int = 1):
    risky = [n for n in RISKY_LENGTHS if minimum <= n <= lim.max_len]
    return st.one_of(st.just(max(1, minimum)), st.sampled_from(risky), st.integers(minimum, lim.max_len))


def _head_dims(lim: Limits):
    fixed = [d for d in HEAD_DIMS if d <= lim.max_head_dim]
    return st.one_of(st.sampled_from(fixed), st.integers(8, lim.max_head_dim))


@dataclass(repr=False)
class Example:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: object
    scale: float | None
    grad: bool
    mods: dict = None          # softcap / alibi_slopes / sinks / block_table
    clean: tuple = None        # (k, v) before garbage was planted in hidden slots (for the gradients' scale)

    def __repr__(self):  # what hypothesis prints for a failing example
        shapes = " ".join(f"{n}={tuple(t.shape)}" for n, t in (("q", self.q), ("k", self.k), ("v", self.v)))
        m = self.mask
        if isinstance(m, KeyPadding):
            m = f"KeyPadding(valid={m.valid.int().tolist()}, causal={m.causal}, window={m.window})"
        elif isinstance(m, DenseMask):
            m = f"DenseMask({tuple(m.mask.shape)}, {m.mask.dtype})"
        elif isinstance(m, BlockSparse):
            m = f"BlockSparse({m.layout.int().tolist()}, {m.block_size}, causal={m.causal})"
        mods = {n: (t.tolist() if isinstance(t, torch.Tensor) and t.numel() < 64 else
                    (tuple(t.shape) if isinstance(t, torch.Tensor) else t)) for n, t in (self.mods or {}).items()}
        return f"Example({shapes} {self.q.dtype} mask={m} scale={self.scale} grad={self.grad} mods={mods})"


#: what planted garbage holds (hidden slots must never reach an output whatever they hold)
GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e30)


def _chunk(draw, sk: int, allow_tuple: bool = True):
    """None, an int chunk length, or a tuple of lengths summing to ``sk``."""
    kind = draw(st.sampled_from(["none", "int"] + (["tuple"] if allow_tuple and sk > 0 else [])))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(1, max(1, sk)))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, sk - 1)), max_size=4)))) if sk > 1 else []
    bounds = [0] + cuts + [sk]
    return tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))


def _plant(x: torch.Tensor, hidden: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``x`` with garbage in the token slots where ``hidden`` (bool over x's token axes) is True."""
    if not bool(hidden.any()):
        return x
    pick = GARBAGE[int(torch.randint(len(GARBAGE), (1,), generator=g))]
    return x.masked_fill(hidden.reshape(hidden.shape + (1,) * (x.dim() - hidden.dim())), pick)


@st.composite
def examples(draw, lim: Limits):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    d = draw(_head_dims(lim))
    dv = d if draw(st.booleans()) else draw(_head_dims(lim))
    hkv = draw(st.sampled_from([1, 2]))
    hq = hkv * draw(st.sampled_from([1, 2, 4]))
    served = lim.served
    kinds = ["none", "causal", "block_diagonal", "key_padding", "block_sparse", "paged", "dense_bool",
             "dense_additive"]
    needs = {"block_diagonal": "block_diagonal", "key_padding": "key_padding", "block_sparse": "block_sparse",
             "paged": "block_diagonal", "dense_bool": "dense", "dense_additive": "dense"}
    kind = draw(st.sampled_from([k for k in kinds if needs.get(k, "causal") in served]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    hidden_k = None            # bool over k's token axes: slots hidden as padding / another sequence
    mods = {}
    if kind in ("block_diagonal", "paged"):
        n = draw(st.integers(1, 4))
        per = max(1, lim.max_len // n)
        q_lens = draw(st.lists(st.integers(0, per), min_size=n, max_size=n).filter(lambda xs: sum(xs) > 0))
        kv_lens = q_lens if draw(st.booleans()) else draw(
            st.lists(st.integers(0, per), min_size=n, max_size=n).filter(lambda xs: sum(xs) > 0))
        causal = draw(st.booleans())
        window = draw(st.one_of(st.none(), st.integers(1, per))) if causal else None
        chunk = _chunk(draw, per, allow_tuple=False) if causal else None
        sink = draw(st.integers(0, 3)) if causal else 0
        mask = BlockDiagonal(q_lens, kv_lens, causal=causal, window=window, chunk=chunk, sink=sink)
        shape_q, shape_k = (mask.total_q, hq), (mask.total_k, hkv)
        batch = 1
    else:
        batch = draw(st.integers(1, 3))
        sq, sk = draw(_lengths(lim)), draw(_lengths(lim))
        shape_q, shape_k = (batch, sq, hq), (batch, sk, hkv)
        if kind == "none":
            mask = None
        elif kind == "causal":
            window = draw(st.one_of(st.none(), st.integers(1, lim.max_len)))
            align = draw(st.sampled_from(["bottom_right", "top_left"]))
            chunk = _chunk(draw, sk, allow_tuple=align == "bottom_right" or sq <= sk)
            sink = draw(st.integers(0, 4))
            mask = Causal(align=align, window=window, chunk=chunk, sink=sink)
        elif kind == "key_padding":
            valid = torch.rand(batch, sk, generator=g) < draw(st.floats(0.05, 1.0))
            if draw(st.booleans()):
                valid[draw(st.integers(0, batch - 1))] = False          # a sequence with no key at all
            causal = draw(st.booleans())
            window = draw(st.one_of(st.none(), st.integers(1, lim.max_len))) if causal else None
            mask = KeyPadding(valid, causal=causal, window=window)
            hidden_k = ~valid
        elif kind == "block_sparse":
            bq, bk = draw(st.sampled_from([1, 2, 4, 8, 16])), draw(st.sampled_from([1, 2, 4, 8, 16]))
            nq, nk = -(-sq // bq), -(-sk // bk)
            lead = draw(st.sampled_from([(), (hq,), (batch, hq)]))
            layout = torch.rand(*lead, nq, nk, generator=g) < draw(st.floats(0.0, 1.0))
            mask = BlockSparse(layout, (bq, bk), causal=draw(st.booleans()))
        elif kind == "dense_bool":
            m = torch.rand(batch, draw(st.sampled_from([1, hq])), sq, sk, generator=g) < draw(st.floats(0.1, 1.0))
            mask = DenseMask(m)
        else:
            bias = torch.randn(1, hq, sq, sk, generator=g, dtype=torch.float32)
            bias = bias.masked_fill(torch.rand(1, hq, sq, sk, generator=g) < draw(st.floats(0.0, 0.9)), float("-inf"))
            mask = DenseMask(bias)
    if "softcap" in served and draw(st.booleans()):
        mods["softcap"] = draw(st.floats(1.0, 50.0))
    if "alibi" in served and draw(st.booleans()):
        shape = draw(st.sampled_from([(hq,), (batch, hq)])) if kind != "paged" else (hq,)
        mods["alibi_slopes"] = torch.rand(*shape, generator=g) * draw(st.sampled_from([0.05, 0.5]))
    if "sinks" in served and draw(st.booleans()):
        mods["sinks"] = torch.randn(hq, generator=g) * 2
    scale = draw(st.one_of(st.none(), st.floats(0.05, 1.0)))
    grad = lim.grads and draw(st.booleans())

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = rand(*shape_q, d), rand(*shape_k, d), rand(*shape_k, dv)
    if kind == "paged":
        page = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
        per_req = [-(-n // page) for n in mask.kv_seqlens]
        spare = draw(st.integers(0, 3))
        n_pages = sum(per_req) + spare
        order = torch.randperm(n_pages, generator=g)                     # shuffled pages, some unused
        table = torch.zeros(len(per_req), max(1, max(per_req)) + draw(st.integers(0, 2)), dtype=torch.int32)
        pools_k = torch.full((n_pages, page, hkv, d), GARBAGE[int(torch.randint(4, (1,), generator=g))]).to(dtype)
        pools_v = torch.full((n_pages, page, hkv, dv), GARBAGE[int(torch.randint(4, (1,), generator=g))]).to(dtype)
        pos = used = 0
        for r, n in enumerate(mask.kv_seqlens):
            for j in range(per_req[r]):
                pid = int(order[used])
                used += 1
                table[r, j] = pid
                take = min(page, n - j * page)
                pools_k[pid, :take] = k[pos + j * page:pos + j * page + take]
                pools_v[pid, :take] = v[pos + j * page:pos + j * page + take]
            pos += n
        for r, n in enumerate(per_req):          # entries past a request's pages are never read: any page id
            table[r, n:] = torch.randint(n_pages, (table.shape[1] - n,), generator=g, dtype=torch.int32)
        k, v = pools_k, pools_v
        mods["block_table"] = table
        return Example(q, k, v, mask, scale, grad, mods)
    clean = None
    if hidden_k is not None:
        clean = (k, v)
        k, v = _plant(k, hidden_k, g), _plant(v, hidden_k, g)
    return Example(q, k, v, mask, scale, grad, mods, clean)


def _to_device(ex: Example) -> Example:
    if DEVICE == "cpu":
        return ex
    mask = None if ex.mask is None else ex.mask.to(DEVICE)
    mods = {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in (ex.mods or {}).items()}
    return Example(ex.q.to(DEVICE), ex.k.to(DEVICE), ex.v.to(DEVICE), mask, ex.scale, ex.grad, mods, ex.clean)


def check_example(backend: str, ex: Example) -> None:
    """One call on ``backend`` vs the float64 oracle: out, LSE and (if asked) dq/dk/dv."""
    ex = _to_device(ex)
    mods = dict(ex.mods or {})
    sinks = mods.pop("sinks", None)
    # the pools of a paged call hold garbage in unused slots: no gradient is checked through them
    grad = ex.grad and "block_table" not in mods
    leaves = [t.detach().clone().requires_grad_(grad) for t in (ex.q, ex.k, ex.v)]
    if sinks is not None:
        leaves.append(sinks.detach().clone().requires_grad_(grad))
        mods["sinks"] = leaves[-1]
    call = validate_call(*leaves[:3], ex.mask, ex.scale, True, **mods)
    why = get_backend(backend).why_not(call)
    assert not why, f"{backend} refused a call it must serve: {why}"
    out, lse = attnlib.attention(*leaves[:3], ex.mask, scale=ex.scale, backend=backend, return_lse=True, **mods)

    def oracle(dtype, device_leaves):
        m = dict(mods)
        if sinks is not None:
            m["sinks"] = device_leaves[3]
        return attention64(*device_leaves[:3], ex.mask, call.scale, dtype=dtype, **m)

    ref64 = [t.detach().cpu().double().requires_grad_(grad) for t in leaves]
    naive_in = [t.detach().cpu().clone().requires_grad_(grad) for t in leaves]
    ref_out, ref_lse = oracle(torch.float64, ref64)
    naive_out, naive_lse = oracle(ex.q.dtype, naive_in)
    results = [compare(out.cpu(), ref_out, naive_out, ex.q.dtype, "out"),
               compare(lse.cpu(), ref_lse, naive_lse.float(), ex.q.dtype, "lse")]
    if grad:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        got = torch.autograd.grad(out, leaves, dout.to(out.device))
        ref = torch.autograd.grad(ref_out, ref64, dout.double())
        naive = torch.autograd.grad(naive_out, naive_in, dout)
        k_clean, v_clean = ex.clean if ex.clean is not None else (ex.k, ex.v)
        mags = gradient_magnitudes(ref64[0], k_clean.cpu().double(), v_clean.cpu().double(), dout.double(), call.scale)
        if sinks is not None:     # d sink_h = -sum over rows of P_sink * rowsum(dO * O): its terms' total size
            rows = (dout.double() * ref_out.detach()).sum(-1)
            p_sink = torch.exp(ref64[3].detach()[None, :, None] - (ref_lse.detach() if ref_lse.dim() == 3 else
                                                                   ref_lse.detach()[None]))
            lead = rows if rows.dim() == 3 else rows[None]
            mags["dsinks"] = float((p_sink.nan_to_num(0.0) * lead.transpose(1, 2).abs()).sum(dim=(0, 2)).max())
        names = ("dq", "dk", "dv", "dsinks")
        results += [compare(gt.cpu(), r, n, ex.q.dtype, name, mags[name])
                    for gt, r, n, name in zip(got, ref, naive, names)]
    bad = [c for c in results if not c.passed]
    assert not bad, "; ".join(f"{c.what}: max error {c.error:.3g} > tolerance {c.tol:.3g} (naive {c.naive:.3g})"
                              for c in bad)


def _backends():
    out = []
    for row in attnlib.list_backends():
        if row["name"] not in LIMITS:
            continue
        marks = [] if row["available"] else [pytest.mark.skip(reason=f"{row['name']} not installed here: {row['reason']}")]
        out.append(pytest.param(row["name"], marks=marks, id=row["name"]))
    return out


@pytest.mark.parametrize("backend", _backends())
def test_backend_agrees_with_float64_reference(backend, fuzz_long):
    lim = replace(LIMITS[backend], served=get_backend(backend).capabilities.served())
    n = lim.examples * (LONG_FACTOR if fuzz_long else 1)

    @settings(max_examples=n, derandomize=not fuzz_long, database=None, deadline=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(ex=examples(lim))
    def run(ex):
        check_example(backend, ex)

    run()


def test_the_oracle_is_not_the_math_backend():
    """The oracle itself against hand-computed values, so the fuzzer cannot pass against a wrong oracle."""
    q = torch.tensor([[[[1.0]], [[0.0]]]])                      # B=1, Sq=2, H=1, D=1
    k = torch.tensor([[[[1.0]], [[2.0]], [[0.0]]]])             # Sk=3
    v = torch.tensor([[[[10.0]], [[20.0]], [[30.0]]]])
    out, lse = attention64(q, k, v, Causal(), scale=1.0)          # bottom-right: row 0 sees keys 0-1, row 1 all
    e1, e2 = torch.exp(torch.tensor(1.0, dtype=torch.float64)), torch.exp(torch.tensor(2.0, dtype=torch.float64))
    assert out[0, 0, 0, 0].item() == pytest.approx(float((10 * e1 + 20 * e2) / (e1 + e2)))
    assert out[0, 1, 0, 0].item() == pytest.approx(20.0)       # equal scores: the mean
    assert lse[0, 0, 1].item() == pytest.approx(float(torch.log(torch.tensor(3.0))))
    out, lse = attention64(q, k, v, Causal(align="top_left", window=1), scale=1.0)
    assert out[0, :, 0, 0].tolist() == [10.0, 20.0]             # each row sees only its diagonal key
    empty = KeyPadding(torch.zeros(1, 3, dtype=torch.bool))
    out, lse = attention64(q, k, v, empty)
    assert out.abs().max().item() == 0 and torch.isinf(lse).all()
