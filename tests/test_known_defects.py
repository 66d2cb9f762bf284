"""Upstream defects attnlib routes around: the guard works, its padding is invisible, and the
reproduction tells us when an upgrade makes the guard unnecessary."""
import os
import subprocess
import sys

import pytest
import torch

import attnlib
from attnlib import BlockDiagonal, Causal, DenseMask, KeyPadding
from attnlib.backends import flex as flexmod
from attnlib.known_defects import FLEX_CPU_DYNAMIC_SHAPES, KNOWN_DEFECTS
from attnlib.testing import assert_close_to_reference

from reference64 import attention64

CPU_FLEX = FLEX_CPU_DYNAMIC_SHAPES.applies()
needs_cpu_flex = pytest.mark.skipif(not CPU_FLEX, reason="torch's CPU flex kernel cannot run here")


@needs_cpu_flex
def test_flex_cpu_reproduction_still_reproduces_on_this_torch():
    """Fails once torch computes the reproduction right: then drop the CPU shape guard in flex.py."""
    present, output = FLEX_CPU_DYNAMIC_SHAPES.run_reproduction()
    assert present, (f"torch {torch.__version__} no longer shows {FLEX_CPU_DYNAMIC_SHAPES.name}; the CPU shape guard "
                     f"in attnlib/backends/flex.py may go (keep it for older torch versions):\n{output}")


def test_every_defect_names_a_reproduction_that_exists():
    from attnlib.known_defects import SCRIPTS

    for d in KNOWN_DEFECTS:
        assert (SCRIPTS / d.reproduction).is_file(), d.name
        assert d.symptom and d.handling and d.affected


def test_buckets():
    assert [flexmod._bucket(n) for n in (1, 2, 3, 5, 9, 33, 64, 65, 130)] == [1, 2, 4, 8, 16, 64, 64, 128, 192]
    assert [flexmod._bucket(n, minimum=16) for n in (1, 8, 9, 24, 40, 56)] == [16, 16, 16, 32, 64, 64]


def _cases():
    g = torch.Generator().manual_seed(0)
    valid = torch.rand(2, 24, generator=g) > 0.4
    valid[1] = False
    dense = torch.rand(2, 1, 5, 24, generator=g) > 0.5
    bias = torch.randn(1, 2, 5, 24, generator=g).masked_fill(torch.rand(1, 2, 5, 24, generator=g) > 0.6, float("-inf"))
    return [("none", None), ("causal", Causal()), ("window", Causal(window=3)), ("key_padding", KeyPadding(valid)),
            ("dense_bool", DenseMask(dense)), ("dense_bias", DenseMask(bias)),
            ("varlen", BlockDiagonal([2, 3], [9, 15], causal=True))]


@needs_cpu_flex
@pytest.mark.parametrize("name,mask", _cases(), ids=[c[0] for c in _cases()])
def test_flex_cpu_padding_is_invisible(name, mask, monkeypatch):
    """Sq=5 -> 8 and Sk=24 -> 32, D=8 -> 32 under the guard: whatever the padded keys hold, the result is
    bit-identical and equal to the float64 reference (padded rows are sliced off, padded keys hidden)."""
    g = torch.Generator().manual_seed(1)
    if isinstance(mask, BlockDiagonal):
        q, k, v = torch.randn(5, 2, 8, generator=g), torch.randn(24, 1, 8, generator=g), torch.randn(24, 1, 12, generator=g)
    else:
        q, k, v = torch.randn(2, 5, 2, 8, generator=g), torch.randn(2, 24, 1, 8, generator=g), \
            torch.randn(2, 24, 1, 12, generator=g)
    out, lse = attnlib.attention(q, k, v, mask, backend="flex", return_lse=True)
    monkeypatch.setattr(flexmod, "_PAD_VALUE", 1e4)
    out_big, lse_big = attnlib.attention(q, k, v, mask, backend="flex", return_lse=True)
    assert torch.equal(out, out_big) and torch.equal(lse, lse_big)
    ref, ref_lse = attention64(q.double(), k.double(), v.double(), mask)
    naive, naive_lse = attention64(q, k, v, mask, dtype=torch.float32)
    assert_close_to_reference(out, ref, naive, torch.float32)
    assert_close_to_reference(lse, ref_lse, naive_lse, torch.float32, "lse")


@needs_cpu_flex
def test_flex_cpu_lengths_in_one_bucket_share_one_kernel():
    """Static shapes, but not a compile per length: Sk 9..16 with Sq 5..8 is one bucket (8, 16)."""
    flexmod.FlexBackend.clear_cache()
    before = flexmod.FlexBackend.cache_info()["graph_compiles"]
    for sq, sk in ((5, 9), (6, 12), (8, 16), (7, 13)):
        attnlib.attention(torch.randn(1, sq, 2, 40), torch.randn(1, sk, 2, 40), torch.randn(1, sk, 2, 40), Causal(),
                          backend="flex")
    assert flexmod.FlexBackend.cache_info()["graph_compiles"] - before == 1


@needs_cpu_flex
def test_attnlib_check_fails_without_the_guard_and_passes_with_it():
    """The user's proof: with ATTNLIB_FLEX_CPU_GUARD=0 on an affected torch, ``attnlib check`` exits 1."""
    cmd = [sys.executable, "-m", "attnlib", "check", "--backend", "flex", "--case", "risky_d16_keys8",
           "--dtype", "fp32", "--no-models", "--fuzz", "0"]
    guarded = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert guarded.returncode == 0, guarded.stdout + guarded.stderr
    assert "guarded" in guarded.stdout
    off = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, ATTNLIB_FLEX_CPU_GUARD="0"))
    assert off.returncode == 1, off.stdout + off.stderr
    assert "PRESENT and unguarded" in off.stdout
