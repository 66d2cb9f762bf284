"""The silent bugs attnlib exists to prevent, pinned on every available backend."""
import pytest
import torch

import attnlib
from attnlib import BlockDiagonal, Causal, KeyPadding
from attnlib.testing import assert_close_to_reference, reference_and_naive

BACKENDS = [r["name"] for r in attnlib.list_backends() if r["available"]]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_with_kv_cache_sees_every_cached_key(backend):
    q, k, v = rand(1, 1, 2, 16), rand(1, 12, 2, 16, seed=1), rand(1, 12, 2, 16, seed=2)
    causal = attnlib.attention(q, k, v, Causal(), backend=backend)
    full = attnlib.attention(q, k, v, None, backend=backend)
    torch.testing.assert_close(causal, full)
    # and the top-left reading of the same call would see only key 0
    top_left = attnlib.attention(q, k, v, Causal(align="top_left"), backend=backend)
    torch.testing.assert_close(top_left, v[:, :1].expand_as(top_left))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_by_step_decode_equals_one_causal_prefill(backend):
    q, k, v = rand(1, 7, 2, 16), rand(1, 7, 2, 16, seed=1), rand(1, 7, 2, 16, seed=2)
    full = attnlib.attention(q, k, v, Causal(), backend=backend)
    steps = [attnlib.attention(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], Causal(), backend=backend) for i in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-6, rtol=1e-5)
    chunk = attnlib.attention(q[:, 4:], k, v, Causal(), backend=backend)  # chunked prefill against a cache
    torch.testing.assert_close(chunk, full[:, 4:], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cfg_branches_do_not_attend_to_each_other(backend):
    m = BlockDiagonal([5, 5, 5], [9, 7, 6])
    q, k, v = rand(15, 2, 16), rand(22, 2, 16, seed=1), rand(22, 2, 16, seed=2)
    out = attnlib.attention(q, k, v, m, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[9:], v2[9:] = 100.0, -100.0           # change branches 2 and 3 completely
    out2 = attnlib.attention(q, k2, v2, m, backend=backend)
    assert torch.equal(out[:5], out2[:5])    # branch 1 cannot tell
    assert not torch.allclose(out[5:], out2[5:])
    alone = attnlib.attention(q[:5], k[:9], v[:9], backend=backend)
    torch.testing.assert_close(out[:5], alone, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_varlen_equals_padded_batch_with_key_padding(backend):
    lens = [3, 8, 5]
    seqs = [(rand(n, 2, 16, seed=i), rand(n, 2, 16, seed=10 + i), rand(n, 2, 16, seed=20 + i)) for i, n in enumerate(lens)]
    packed = attnlib.attention(*(torch.cat([s[j] for s in seqs]) for j in range(3)), BlockDiagonal(lens), backend=backend)
    pad = max(lens)
    dense = [torch.zeros(3, pad, 2, 16) for _ in range(3)]
    valid = torch.zeros(3, pad, dtype=torch.bool)
    for b, (s, n) in enumerate(zip(seqs, lens)):
        for j in range(3):
            dense[j][b, pad - n:] = s[j]         # left padding
        valid[b, pad - n:] = True
    out = attnlib.attention(*dense, KeyPadding(valid), backend=backend)
    for b, n in enumerate(lens):
        torch.testing.assert_close(out[b, pad - n:], packed[sum(lens[:b]):sum(lens[:b + 1])], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_query_head_reads_kv_head_h_over_ratio(backend):
    q, k, v = rand(1, 4, 6, 16), rand(1, 4, 2, 16, seed=1), rand(1, 4, 2, 16, seed=2)
    out = attnlib.attention(q, k, v, backend=backend)
    for h in range(6):
        one = attnlib.attention(q[:, :, h:h + 1], k[:, :, h // 3:h // 3 + 1], v[:, :, h // 3:h // 3 + 1], backend="math")
        torch.testing.assert_close(out[:, :, h:h + 1], one, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_do_not_depend_on_the_backend(backend):
    q, k, v = rand(2, 9, 4, 16).bfloat16(), rand(2, 13, 2, 16, seed=1).bfloat16(), rand(2, 13, 2, 16, seed=2).bfloat16()
    out = attnlib.attention(q, k, v, Causal(window=4), backend=backend)
    (ref, _), (naive, _) = reference_and_naive(q, k, v, Causal(window=4), 16 ** -0.5, packed=False)
    assert_close_to_reference(out, ref, naive, torch.bfloat16)


def test_the_tolerance_policy_catches_a_top_left_bug():
    """A backend with the classic bug (is_causal for bottom-right masks) fails the conformance matrix."""
    from attnlib.backends.base import Backend, Capabilities
    from attnlib.conformance import get_case, run_case

    class TopLeftBug(Backend):
        name = "topleft_bug"
        capabilities = Capabilities(dtypes=frozenset({torch.float32, torch.bfloat16}))

        def forward(self, call):
            mask = Causal(align="top_left") if isinstance(call.mask, Causal) else call.mask
            return attnlib.get_backend("math").forward(call.replace(mask=mask))

    attnlib.register_backend(TopLeftBug(), replace=True)
    assert run_case("topleft_bug", get_case("causal"), torch.float32).passed      # Sq == Sk: no difference
    bad = run_case("topleft_bug", get_case("causal_cache"), torch.float32)
    assert not bad.passed and bad.worst.error > 100 * bad.worst.tol
