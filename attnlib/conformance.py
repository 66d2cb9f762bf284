"""The conformance matrix: named cases (one per mask situation) run on a backend against ``math``.

Shared by ``attnlib check`` and ``tests/test_conformance.py``, so the CLI and CI check the same
thing. Shapes are small: the matrix must run in well under a minute on a 2-core CPU (and the Triton
interpreter).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .masks import BlockDiagonal, BlockSparse, Causal, DenseMask, KeyPadding
from .testing import Comparison, compare, gradient_magnitudes, reference_and_naive

#: (Hq, Hkv) per GQA ratio checked
HEADS = {1: (4, 4), 2: (4, 2), 4: (4, 1)}
HEAD_DIM = 32
#: dtypes of the matrix
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: backends that compile per shape (flex) or run interpreted (triton) on a CPU: they get the diagonal
#: of the dtype x GQA grid (fp32/GQA1, bf16/GQA2, fp16/GQA4) there; every case still runs on them.
SLOW_ON_CPU = frozenset({"flex", "triton"})


def gqa_ratios(backend: str, dtype: torch.dtype, device: str = "cpu") -> list[int]:
    """The GQA ratios checked for ``backend`` at ``dtype`` on ``device`` (one place for tests and CLI)."""
    ratios = list(HEADS)
    if str(device).startswith("cpu") and backend in SLOW_ON_CPU:
        return [ratios[DTYPES.index(dtype) % len(ratios)]] if dtype in DTYPES else ratios[:1]
    return ratios


@dataclass(frozen=True)
class Case:
    """A named call: ``build(dtype, device, hq, hkv, gen) -> (q, k, v, mask)`` or ``(q, k, v, mask, options)``
    with ``options`` the call's score modifiers / ``block_table`` (keyword arguments of ``attention``)."""

    name: str
    kind: str            # the mask kind it exercises (table column)
    build: Callable
    packed: bool = False
    note: str = ""


def _rand(gen, *shape, dtype, device):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _dense(b, sq, sk, mask_fn=lambda b, sq, sk, hq, gen, device: None, d=HEAD_DIM, dv=None):
    dv = d if dv is None else dv

    def build(dtype, device, hq, hkv, gen):
        q = _rand(gen, b, sq, hq, d, dtype=dtype, device=device)
        k = _rand(gen, b, sk, hkv, d, dtype=dtype, device=device)
        v = _rand(gen, b, sk, hkv, dv, dtype=dtype, device=device)
        return q, k, v, mask_fn(b, sq, sk, hq, gen, device)
    return build


def _packed(q_lens, kv_lens=None, causal=False, window=None, d=HEAD_DIM, chunk=None, sink=0):
    mask = BlockDiagonal(q_lens, kv_lens, causal=causal, window=window, chunk=chunk, sink=sink)

    def build(dtype, device, hq, hkv, gen):
        q = _rand(gen, mask.total_q, hq, d, dtype=dtype, device=device)
        k = _rand(gen, mask.total_k, hkv, d, dtype=dtype, device=device)
        v = _rand(gen, mask.total_k, hkv, d, dtype=dtype, device=device)
        return q, k, v, mask
    return build


def _padding(kind, causal=False, window=None):
    def mask_fn(b, sq, sk, hq, gen, device):
        valid = torch.ones(b, sk, dtype=torch.bool)
        valid[0, sk - 5:] = False                  # right padding
        valid[1, :7] = False                       # left padding
        valid[2, 3:9] = False                      # a hole
        valid[2, sk - 2:] = False
        if kind == "empty":
            valid[1] = False                       # a row with no visible key at all
        return KeyPadding(valid.to(device), causal=causal, window=window)
    return mask_fn


def _dense_bool(b, sq, sk, hq, gen, device):
    m = torch.rand(b, 1, sq, sk, generator=gen) > 0.4
    m[0, 0, 2] = False                             # one query row sees nothing
    return DenseMask(m.to(device))


def _dense_additive(b, sq, sk, hq, gen, device):
    bias = torch.randn(1, hq, sq, sk, generator=gen)
    bias[..., ::3] = float("-inf")
    return DenseMask(bias.to(device))


def _const(mask):
    return lambda b, sq, sk, hq, gen, device: mask


def _with(build, **make):
    """``build`` plus call options made per call: ``make[name](hq, gen, device) -> value``."""
    def wrapped(dtype, device, hq, hkv, gen):
        q, k, v, mask = build(dtype, device, hq, hkv, gen)
        return q, k, v, mask, {name: fn(hq, gen, device) for name, fn in make.items()}
    return wrapped


def _slopes(hq, gen, device):
    """ALiBi's geometric slopes (as BLOOM/MPT define them for ``hq`` heads)."""
    return torch.tensor([2 ** (-8 * (h + 1) / hq) for h in range(hq)], dtype=torch.float32, device=device)


def _sinks(hq, gen, device):
    return (torch.randn(hq, generator=gen) * 2).to(device)


def _layout(nq, nk, heads=False, causal=False):
    def mask_fn(b, sq, sk, hq, gen, device):
        lay = torch.rand(*((hq,) if heads else ()), nq, nk, generator=gen) < 0.4
        lay[..., 0, 0] = True
        return BlockSparse(lay, (-(-sq // nq), -(-sk // nk)), causal=causal)
    return mask_fn


def _garbage_padding(kind="holes"):
    """KeyPadding whose padded slots hold NaN / inf garbage (a ``torch.empty`` cache tail): never read."""
    pad = _padding(kind)

    def build(dtype, device, hq, hkv, gen):
        q, k, v, mask = _dense(3, 10, 21, pad)(dtype, device, hq, hkv, gen)
        hidden = ~mask.valid[:, :, None, None]
        return q, k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("inf")), mask
    return build


def _paged(q_lens, kv_lens, page, causal=True, d=HEAD_DIM):
    """Requests' keys in a shuffled page pool; unused slots and pages hold NaN garbage."""
    mask = BlockDiagonal(q_lens, kv_lens, causal=causal)

    def build(dtype, device, hq, hkv, gen):
        q = _rand(gen, mask.total_q, hq, d, dtype=dtype, device=device)
        k = _rand(gen, mask.total_k, hkv, d, dtype=dtype, device=device)
        v = _rand(gen, mask.total_k, hkv, d, dtype=dtype, device=device)
        pages = [-(-n // page) for n in kv_lens]
        total = sum(pages) + 2
        order = torch.randperm(total, generator=gen).tolist()
        table = torch.zeros(len(kv_lens), max(pages) + 1, dtype=torch.int32)
        pool_k = torch.full((total, page, hkv, d), float("nan"), dtype=dtype, device=device)
        pool_v = torch.full((total, page, hkv, d), float("nan"), dtype=dtype, device=device)
        pos = 0
        for r, n in enumerate(kv_lens):
            for j in range(pages[r]):
                pid = order.pop()
                table[r, j] = pid
                take = min(page, n - j * page)
                pool_k[pid, :take] = k[pos + j * page:pos + j * page + take]
                pool_v[pid, :take] = v[pos + j * page:pos + j * page + take]
            pos += n
        return q, pool_k, pool_v, mask, {"block_table": table.to(device)}
    return build


CASES: tuple[Case, ...] = (
    Case("full", "none", _dense(2, 33, 33)),
    Case("full_cross", "none", _dense(2, 17, 40), note="Sq != Sk"),
    Case("single_token", "none", _dense(1, 1, 1)),
    Case("odd_head_dim", "none", _dense(2, 13, 21, d=24), note="D=24"),
    Case("head_dim_v", "none", _dense(2, 13, 21, d=32, dv=16), note="Dv != D"),
    Case("causal", "causal", _dense(2, 33, 33, _const(Causal()))),
    Case("causal_decode", "causal", _dense(2, 1, 37, _const(Causal())), note="1 query vs 37-key cache"),
    Case("causal_cache", "causal", _dense(2, 6, 29, _const(Causal())), note="prefill with cache: bottom-right"),
    Case("causal_q_longer", "causal", _dense(2, 12, 7, _const(Causal())), note="Sq > Sk: 5 empty rows"),
    Case("causal_top_left", "causal", _dense(2, 6, 29, _const(Causal(align="top_left")))),
    Case("causal_window", "causal+window", _dense(2, 33, 33, _const(Causal(window=8)))),
    Case("causal_window_cache", "causal+window", _dense(2, 5, 30, _const(Causal(window=7)))),
    Case("varlen", "block_diagonal", _packed([7, 1, 19, 12]), packed=True),
    Case("varlen_causal", "block_diagonal", _packed([7, 1, 19, 12], causal=True), packed=True),
    Case("varlen_cache", "block_diagonal", _packed([3, 1, 5], [10, 1, 20], causal=True), packed=True,
         note="per-request KV caches"),
    Case("varlen_short_cache", "block_diagonal", _packed([5, 2], [2, 4], causal=True), packed=True,
         note="a block with fewer keys than queries: 3 empty rows"),
    Case("varlen_window", "block_diagonal", _packed([11, 16], causal=True, window=4), packed=True),
    Case("cfg_branches", "block_diagonal", _packed([9, 9, 9], [30, 21, 14]), packed=True,
         note="3 CFG branches, different cache lengths"),
    Case("key_padding", "key_padding", _dense(3, 10, 21, _padding("holes"))),
    Case("key_padding_empty_row", "key_padding", _dense(3, 10, 21, _padding("empty"))),
    Case("key_padding_causal", "key_padding+causal", _dense(3, 10, 21, _padding("holes", causal=True)),
         note="padded prompts in a decoder (bottom-right)"),
    Case("key_padding_causal_window", "key_padding+causal", _dense(3, 12, 12, _padding("holes", True, 4))),
    Case("dense_bool", "dense", _dense(2, 11, 19, _dense_bool)),
    Case("dense_additive", "dense", _dense(2, 11, 19, _dense_additive)),
    # structured sparsity
    Case("chunked_causal", "causal+chunk", _dense(2, 24, 24, _const(Causal(chunk=6))), note="frame-causal, 4 chunks"),
    Case("chunked_window_sink", "causal+chunk", _dense(2, 12, 30, _const(Causal(chunk=(6, 6, 6, 6, 6), window=2,
                                                                               sink=6))),
         note="chunks of 6, 2-chunk window, a sink chunk (rows see 2 key runs)"),
    Case("window_sink", "causal+window", _dense(2, 20, 20, _const(Causal(window=5, sink=3)))),
    Case("varlen_chunk_sink", "block_diagonal", _packed([9, 7], [15, 7], causal=True, window=2, chunk=3, sink=2),
         packed=True),
    Case("block_sparse", "block_sparse", _dense(2, 20, 28, _layout(3, 4)), note="host layout, partial blocks"),
    Case("block_sparse_heads_causal", "block_sparse", _dense(2, 16, 16, _layout(4, 4, heads=True, causal=True))),
    # score modifiers
    Case("softcap", "softcap", _with(_dense(2, 13, 21, _const(Causal())), softcap=lambda h, g, d: 5.0)),
    Case("alibi", "alibi", _with(_dense(2, 13, 21, _const(Causal())), alibi_slopes=_slopes)),
    Case("alibi_varlen", "alibi", _with(_packed([5, 8], [9, 8], causal=True), alibi_slopes=_slopes), packed=True),
    Case("sinks", "sinks", _with(_dense(3, 13, 21, _padding("empty")), sinks=_sinks),
         note="a row with no key returns 0 and LSE = the sink"),
    Case("softcap_alibi_sinks", "modifiers", _with(_dense(2, 12, 12, _const(Causal(window=4, sink=2))),
                                                  softcap=lambda h, g, d: 10.0, alibi_slopes=_slopes, sinks=_sinks)),
    # paged keys and garbage in hidden slots
    Case("paged", "paged", _paged([3, 1, 2], [9, 6, 13], page=4), packed=True,
         note="shuffled pages, partial last pages, NaN in unused slots"),
    Case("garbage_in_padding", "key_padding", _garbage_padding(), note="NaN/inf in padded K/V slots"),
    # shapes where tiled/compiled kernels have gone wrong: small head dims, key lengths = 8 mod 16, decode
    # against a cache; they share head dims, so they also run several shapes through one compiled kernel
    Case("risky_d8_keys24", "none", _dense(2, 9, 24, d=8), note="D=8, Sk=24 (8 mod 16)"),
    Case("risky_d16_causal_keys40", "causal", _dense(2, 7, 40, _const(Causal()), d=16),
         note="D=16, Sk=40 (8 mod 16), bottom-right offset 33"),
    Case("risky_d16_decode_keys24", "causal", _dense(3, 1, 24, _const(Causal()), d=16),
         note="decode: 1 query vs a 24-key cache"),
    Case("risky_d16_keys8", "none", _dense(2, 16, 8, d=16), note="D=16, Sk=8"),
    Case("risky_d16_padding_keys24", "key_padding", _dense(3, 12, 24, _padding("holes"), d=16)),
    Case("risky_d72_varlen", "block_diagonal", _packed([8, 24, 1], [24, 40, 8], causal=True, d=72), packed=True,
         note="D=72 (not a power of 2), per-block lengths 8 mod 16"),
)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype whose tolerance the LSE gets: float32 (what every backend returns) for fp64 inputs."""
    return torch.float32 if dtype == torch.float64 else dtype


#: mask kinds the fuzz cases draw from (``fuzz_cases``) -> the table's mask column
_FUZZ_KINDS = {"none": "none", "causal": "causal", "causal_window": "causal+window", "top_left": "causal",
               "block_diagonal": "block_diagonal", "key_padding": "key_padding"}
_FUZZ_LENGTHS = (1, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 40, 47, 48, 49, 63, 64, 65)
_FUZZ_HEAD_DIMS = (8, 16, 24, 40, 64, 72, 96, 128)


def fuzz_cases(n: int, seed: int = 0) -> list[Case]:
    """``n`` random cases (lengths biased to tile edges, head dims 8..128, every structured mask kind),
    the same for a given seed: ``attnlib check``'s short fuzz pass (the test suite's fuzzer is larger)."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = tuple(_FUZZ_KINDS)[i % len(_FUZZ_KINDS)]
        d = rng.choice(_FUZZ_HEAD_DIMS)
        sq, sk = rng.choice(_FUZZ_LENGTHS), rng.choice(_FUZZ_LENGTHS)
        b = rng.randint(1, 3)
        if kind == "block_diagonal":
            nb = rng.randint(1, 4)
            ql = [rng.choice((0, 1, 7, 8, 9, 16, 24)) for _ in range(nb)]
            ql[0] = max(ql[0], 1)
            kl = [max(x, 1) + rng.choice((0, 0, 8, 15)) for x in ql]
            build = _packed(ql, kl, causal=rng.random() < 0.5, d=d)
            out.append(Case(f"fuzz{i}", _FUZZ_KINDS[kind], build, packed=True, note=f"D={d} q={ql} kv={kl}"))
            continue
        if kind == "none":
            mask_fn = _const(None)
        elif kind == "causal":
            mask_fn = _const(Causal())
        elif kind == "causal_window":
            mask_fn = _const(Causal(window=rng.randint(1, 20)))
        elif kind == "top_left":
            mask_fn = _const(Causal(align="top_left"))
        else:
            p = rng.uniform(0.2, 0.9)

            def mask_fn(b_, sq_, sk_, hq_, gen, device, p=p):
                valid = torch.rand(b_, sk_, generator=gen) < p
                return KeyPadding(valid.to(device))
        out.append(Case(f"fuzz{i}", _FUZZ_KINDS[kind], _dense(b, sq, sk, mask_fn, d=d),
                        note=f"{kind} B={b} Sq={sq} Sk={sk} D={d}"))
    return out


def case_names() -> list[str]:
    return [c.name for c in CASES]


def get_case(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)


@dataclass
class Result:
    backend: str
    case: str
    dtype: torch.dtype
    gqa: int
    comparisons: list[Comparison] = field(default_factory=list)
    skipped: str = ""          # why the backend cannot serve this call (then not a failure)

    @property
    def passed(self) -> bool:
        return bool(self.skipped) or all(c.passed for c in self.comparisons)

    @property
    def worst(self) -> Comparison | None:
        if not self.comparisons:
            return None
        return max(self.comparisons, key=lambda c: c.error / c.tol if c.tol else float("inf"))


def run_case(backend: str, case: Case, dtype: torch.dtype, gqa: int = 1, *, device="cpu", grad: bool = False,
             seed: int = 0) -> Result:
    """Run one case on one backend and compare out, LSE (and grads) with the float64 reference."""
    from .api import attention
    from .inputs import validate_call
    from .registry import get_backend

    gen = torch.Generator().manual_seed(seed)
    hq, hkv = HEADS[gqa]
    built = case.build(dtype, torch.device(device), hq, hkv, gen)
    q, k, v, mask = built[:4]
    opts = built[4] if len(built) > 4 else {}
    result = Result(backend, case.name, dtype, gqa)
    grad = grad and "block_table" not in opts        # a page pool holds garbage: no gradient checked through it
    if grad:
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    call = validate_call(q, k, v, mask, None, True, **opts)
    why = get_backend(backend).why_not(call)
    if why:
        result.skipped = "; ".join(why)
        return result
    out, lse = attention(q, k, v, mask, backend=backend, return_lse=True, **opts)
    (ref_out, ref_lse), (naive_out, naive_lse) = reference_and_naive(q, k, v, mask, call.scale, **opts)
    result.comparisons.append(compare(out, ref_out, naive_out, dtype, "out"))
    # the LSE is float32 on every backend: an fp64 call's LSE is held to the float32 policy
    result.comparisons.append(compare(lse, ref_lse, naive_lse, lse_dtype(dtype), "lse"))
    if grad:
        result.comparisons.extend(_grad_comparisons(out, q, k, v, mask, call.scale, dtype, gen, opts))
    return result


def _grad_comparisons(out, q, k, v, mask, scale, dtype, gen, opts):
    from .reference import reference_for

    dout = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    got = torch.autograd.grad(out, (q, k, v), dout)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_out, _ = reference_for(*leaves64, mask, scale, compute_dtype=torch.float64, **opts)
    ref = torch.autograd.grad(ref_out, leaves64, dout.double())
    leaves_lp = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    naive_out, _ = reference_for(*leaves_lp, mask, scale, compute_dtype=dtype, **opts)
    naive = torch.autograd.grad(naive_out, leaves_lp, dout)
    finite = [torch.nan_to_num(t.detach(), nan=0.0, posinf=0.0, neginf=0.0) for t in (q, k, v)]
    mags = gradient_magnitudes(*finite, dout, scale)
    return [compare(g, r, n, dtype, name, mags[name]) for g, r, n, name in zip(got, ref, naive, ("dq", "dk", "dv"))]


# ---------------------------------------------------------------------------------------------------
# extra sections of `attnlib check`, contributed by other packages (the core imports none of them)
# ---------------------------------------------------------------------------------------------------
#: entry-point group a package declares its sections in: ``name = "module:function"``
CHECK_SECTIONS_GROUP = "attnlib.check_sections"
_sections: dict[str, Callable] = {}
_entry_points_loaded = False


def register_check_section(name: str, fn: Callable, *, replace: bool = False) -> None:
    """Add a section to ``attnlib check``: ``fn(backends: list[str], device: str) -> int`` prints its rows
    and returns its failure count. ``attnlib check --skip-section NAME`` leaves it out. Packages can
    declare one instead in the ``attnlib.check_sections`` entry-point group (loaded on first use)."""
    if name in _sections and not replace:
        raise ValueError(f"a check section named {name!r} is already registered; pass replace=True")
    _sections[name] = fn


def check_sections() -> dict[str, Callable]:
    """Every section, by name: those registered plus the entry points of installed packages. A section
    whose entry point cannot load is a function that says so (``attnlib check`` never fails on it)."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=CHECK_SECTIONS_GROUP):
            if ep.name in _sections:
                continue
            try:
                _sections[ep.name] = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plugin is reported, not fatal
                _sections[ep.name] = _unloadable(ep.name, e)
    return dict(_sections)


def _unloadable(name: str, error: Exception) -> Callable:
    def section(backends, device) -> int:
        print(f"\n{name}: not checked ({type(error).__name__}: {error})")
        return 0
    return section
