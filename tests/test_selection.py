"""Backend selection: argument > use_backend > $DIFFUSION_ATTENTION_BACKEND > auto; names; fallback policy."""
import re
import threading
import warnings

import pytest
import torch

import attnlib
from attnlib import BackendUnavailableError, resolve_backend, use_backend
from attnlib.backends.base import Backend, Capabilities
from attnlib.registry import canonical_name


@pytest.fixture
def qkv():
    return torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)


def test_auto_on_cpu_picks_sdpa(qkv):
    assert resolve_backend(*qkv) == "sdpa"


def test_argument_beats_context_beats_environment(qkv, monkeypatch):
    monkeypatch.setenv("DIFFUSION_ATTENTION_BACKEND", "math")
    assert resolve_backend(*qkv) == "math"
    with use_backend("sdpa"):
        assert resolve_backend(*qkv) == "sdpa"
        assert resolve_backend(*qkv, backend="math") == "math"
    assert resolve_backend(*qkv) == "math"


@pytest.mark.parametrize("spelling,name", [
    ("TORCH_SDPA", "sdpa"), ("native", "sdpa"), ("_native_math", "math"), ("FLASH_ATTN", "flash"),
    ("flash_varlen", "flash"), ("_flash_3", "flash"), ("flex", "flex"), ("XFORMERS", "xformers"),
    ("Triton", "triton"), ("auto", "auto"), ("  Sdpa ", "sdpa"),
])
def test_vllm_omni_and_diffusers_spellings_resolve(spelling, name):
    assert canonical_name(spelling) == name


def test_unknown_backend_name_lists_the_valid_ones(qkv, monkeypatch):
    with pytest.raises(ValueError, match="valid names: auto, math, sdpa"):
        attnlib.attention(*qkv, backend="sage")
    monkeypatch.setenv("DIFFUSION_ATTENTION_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attnlib.attention(*qkv)
    with pytest.raises(ValueError):
        with use_backend("nope"):
            pass


class _Fp64Only(Backend):
    name = "fp64only"
    capabilities = Capabilities(dtypes=frozenset({torch.float64}), features=frozenset())

    def forward(self, call):
        return attnlib.get_backend("math").forward(call)


@pytest.fixture(scope="module")
def fp64only():
    return attnlib.register_backend(_Fp64Only(), aliases=["F64"], replace=True)


def test_a_backend_that_cannot_serve_falls_back_with_one_warning_per_reason(qkv, fp64only):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            out = attnlib.attention(*qkv, backend="fp64only")
    msgs = [str(x.message) for x in w if "fp64only" in str(x.message)]
    assert len(msgs) == 1 and "dtype=fp32 (supported: fp64)" in msgs[0] and "using 'sdpa'" in msgs[0]
    torch.testing.assert_close(out, attnlib.attention(*qkv, backend="sdpa"))


def test_fallback_error_mode_raises_with_the_reasons(qkv, fp64only, monkeypatch):
    monkeypatch.setenv("ATTNLIB_FALLBACK", "error")
    with pytest.raises(BackendUnavailableError, match="dtype=fp32") as e:
        attnlib.attention(*qkv, attnlib.Causal(), backend="f64")
    assert "causal" in str(e.value) and e.value.reasons["fp64only"]


def test_registered_backend_serves_calls_it_can(qkv, fp64only):
    q, k, v = (t.double() for t in qkv)
    assert resolve_backend(q, k, v, backend="F64") == "fp64only"


def test_registering_a_taken_name_needs_replace(fp64only):
    with pytest.raises(ValueError, match="already registered"):
        attnlib.register_backend(_Fp64Only())
    with pytest.raises(TypeError):
        attnlib.register_backend(object())


def test_unavailable_builtin_backend_reports_why_and_falls_back(qkv):
    rows = {r["name"]: r for r in attnlib.list_backends()}
    assert set(rows) >= {"math", "sdpa", "flex", "flash", "xformers", "triton"}
    for name, row in rows.items():
        assert row["available"] or row["reason"], name
    if not rows["flash"]["available"]:
        with pytest.warns(RuntimeWarning, match="'flash'"):
            attnlib.attention(*qkv, backend="FLASH_ATTN")


def test_use_backend_is_thread_local(qkv):
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name):
        with use_backend(name):
            barrier.wait()
            seen[name] = resolve_backend(*qkv)
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("math", "sdpa")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"math": "math", "sdpa": "sdpa"}


def test_attention_module_pins_its_backend(qkv):
    layer = attnlib.Attention(2, 8, backend="_native_math")
    assert layer.backend == "math"
    torch.testing.assert_close(layer(*qkv), attnlib.attention(*qkv, backend="math"))


def test_an_unknown_name_in_the_environment_names_the_variable(qkv, monkeypatch):
    monkeypatch.setenv("DIFFUSION_ATTENTION_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$DIFFUSION_ATTENTION_BACKEND='bogus'.*valid names: auto, math"):
        attnlib.attention(*qkv)


def test_an_unknown_fallback_policy_raises_with_the_valid_values(qkv, monkeypatch):
    monkeypatch.setenv("ATTNLIB_FALLBACK", "bogus")
    with pytest.raises(ValueError, match=r"\$ATTNLIB_FALLBACK='bogus'.*valid values: warn, error"):
        attnlib.attention(*qkv, backend="sdpa")        # raised even when no fallback happens
    monkeypatch.setenv("ATTNLIB_FALLBACK", " Error ")
    assert resolve_backend(*qkv, backend="sdpa") == "sdpa"


@pytest.mark.parametrize("via", ["function", "module"])
def test_the_fallback_warning_points_at_the_users_line(qkv, fp64only, via):
    layer = attnlib.Attention(2, 8, backend="fp64only")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        if via == "function":
            attnlib.attention(*qkv, backend="fp64only")
        else:
            layer(*qkv)
    (hit,) = [x for x in w if "fp64only" in str(x.message)]
    assert hit.filename == __file__, hit.filename


def test_warnings_do_not_leak_between_tests_part_1(qkv, fp64only):
    with pytest.warns(RuntimeWarning, match="fp64only"):
        attnlib.attention(*qkv, backend="fp64only")


def test_warnings_do_not_leak_between_tests_part_2(qkv, fp64only):
    with pytest.warns(RuntimeWarning, match="fp64only"):          # warned again: the registry state was reset
        attnlib.attention(*qkv, backend="fp64only")


class _Named(Backend):
    def __init__(self, name):
        self.name = name

    def forward(self, call):
        return attnlib.get_backend("math").forward(call)


def test_alias_collisions_raise_unless_replace(isolated_registry):
    with pytest.raises(ValueError, match="'torch_sdpa' of backend 'clash' already means 'sdpa'"):
        attnlib.register_backend(_Named("clash"), aliases=["TORCH_SDPA"])
    assert "clash" not in isolated_registry._registry           # nothing half-registered
    with pytest.raises(ValueError, match="is the name of the registered backend 'math'"):
        attnlib.register_backend(_Named("clash"), aliases=["math"])
    with pytest.raises(ValueError, match="is the name of the registered backend 'math'"):
        attnlib.register_backend(_Named("clash"), aliases=["math"], replace=True)   # the name would always win
    with pytest.raises(ValueError, match="reserved"):
        attnlib.register_backend(_Named("clash"), aliases=["auto"])
    attnlib.register_backend(_Named("clash"), aliases=["CLASH", "my-clash"])       # its own name: harmless
    assert canonical_name("my_clash") == "clash"
    with pytest.raises(ValueError, match="'my_clash' of backend 'other' already means 'clash'"):
        attnlib.register_backend(_Named("other"), aliases=["my_clash"])
    attnlib.register_backend(_Named("other"), aliases=["my_clash"], replace=True)
    assert canonical_name("my_clash") == "other"
    attnlib.register_backend(_Named("clash"), aliases=["my_clash"], replace=True)   # moves it back
    assert canonical_name("my_clash") == "clash"


def test_the_unknown_name_error_quotes_aliases_from_ALIASES():
    from attnlib.registry import ALIASES, BUILTIN_BACKENDS

    with pytest.raises(ValueError) as e:
        canonical_name("sage")
    msg = str(e.value)
    quoted = re.search(r"aliases such as (.*?);", msg).group(1).split(", ")
    assert quoted and all(a in attnlib.registry.alias_map() for a in quoted)
    assert {ALIASES[a] for a in quoted if a in ALIASES} == set(BUILTIN_BACKENDS)   # one per built-in backend
    assert "attnlib info --aliases" in msg


class _CountingProbes(Backend):
    name = "lazy_probes"
    capabilities = Capabilities(dtypes=frozenset({torch.float32}))

    def __init__(self):
        self.probes = 0

    def run_probes(self):
        self.probes += 1

    def forward(self, call):
        return attnlib.get_backend("math").forward(call)


def test_a_backend_is_probed_once_and_only_when_selection_asks_it(qkv, isolated_registry):
    lazy = attnlib.register_backend(_CountingProbes(), auto_before="math")
    assert resolve_backend(*qkv) == "sdpa" and lazy.probes == 0        # auto stopped at sdpa: never asked
    assert resolve_backend(*qkv, backend="lazy_probes") == "lazy_probes"
    assert resolve_backend(*qkv, backend="lazy_probes") == "lazy_probes" and lazy.probes == 1
    new = attnlib.register_backend(_CountingProbes(), replace=True)
    resolve_backend(*qkv, backend="lazy_probes")
    assert (lazy.probes, new.probes) == (1, 1)                            # a replacement is probed afresh


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu"), torch.device("cpu", 0)])
def test_auto_order_takes_a_device_or_its_string(device):
    assert attnlib.registry.auto_order(device) == attnlib.registry.AUTO_ORDER["cpu"]


def test_auto_order_of_an_indexed_cuda_device_is_the_cuda_order():
    want = attnlib.registry.AUTO_ORDER["cuda"]
    assert attnlib.registry.auto_order("cuda:1") == attnlib.registry.auto_order(torch.device("cuda", 1)) == want


@pytest.mark.parametrize("bad,error,match", [(0, TypeError, "torch.device or a str.*got int"),
                                             (None, TypeError, "got NoneType"),
                                             ("gpu", ValueError, "'gpu' is not a device string")])
def test_auto_order_rejects_what_is_not_a_device(bad, error, match):
    with pytest.raises(error, match=match):
        attnlib.registry.auto_order(bad)
