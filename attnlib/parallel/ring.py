"""Ring attention: each rank keeps its query shard; the K/V shards travel around the ring.

Step ``t`` on rank ``r`` attends the local queries to the K/V shard of rank ``(r - t) mod n`` under the
slice of the whole mask's plan (``Plan.restrict``), converted back to an attnlib mask: a structured one
when the slice is expressible (``None``, ``Causal`` bottom-right / top-left, ``KeyPadding``,
``BlockDiagonal``), else an exact ``DenseMask`` of the slice; a slice in which no query sees a key is
skipped (no compute: the causal future blocks). Partial results merge with the float32 LSE rule.

The next K/V transfer is posted before each step's compute (they overlap). Backward is autograd through
the steps: the K/V hand-off is a differentiable ring shift (its backward sends the K/V gradients back to
the rank they came from, synchronously), every step's LSE carries its exact gradient (on backends whose
kernels return it without one, ``attnlib.attention`` attaches it: two extra attention calls in backward,
one of them with its own backward), and the chain of shifts is tied to the output so every rank runs the
same communication in the same order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..masks import BlockDiagonal, Causal, DenseMask, KeyPadding

SKIP = object()


# -- the mask of one step -----------------------------------------------------------------------------
def step_mask(p):
    """An attnlib mask equal to the restricted plan ``p`` (``SKIP`` when no query row sees a key)."""
    sq, sk = p.seqlen_q, p.seqlen_k
    if p.dense is not None:
        return DenseMask(p.dense.mask)
    live = [b for b in p.blocks if b.visible_rows()[1] > b.visible_rows()[0]]
    if not live or sq == 0 or sk == 0:
        return SKIP
    b = p.single
    whole = b is not None and (b.q_start, b.q_len, b.k_start, b.k_len) == (0, sq, 0, sk)
    if p.key_valid is not None:
        if whole and (not b.causal or b.full):
            return KeyPadding(p.key_valid)
        if whole and b.offset == sk - sq:
            return KeyPadding(p.key_valid, causal=True, window=b.window)
        return DenseMask(p.materialize())
    if whole:
        if not b.causal or b.full:
            return None
        if b.offset == sk - sq:
            return Causal(window=b.window)
        if b.offset == 0:
            return Causal(align="top_left", window=b.window)
        return DenseMask(p.materialize())
    if p.packed and _tiles(p):
        first = p.blocks[0]
        return BlockDiagonal([x.q_len for x in p.blocks], [x.k_len for x in p.blocks], causal=first.causal,
                             window=first.window)
    return DenseMask(p.materialize())


def _tiles(p) -> bool:
    """The blocks tile both axes in order, share causal/window, and every causal block is bottom-right."""
    q0 = k0 = 0
    first = p.blocks[0]
    for b in p.blocks:
        if b.q_start != q0 or b.k_start != k0 or b.q_len == 0 or b.k_len == 0:
            return False
        if (b.causal, b.window) != (first.causal, first.window):
            return False
        if b.causal and b.offset != b.k_len - b.q_len:
            return False
        q0, k0 = q0 + b.q_len, k0 + b.k_len
    return (q0, k0) == (p.seqlen_q, p.seqlen_k)


# -- autograd pieces ---------------------------------------------------------------------------------------
class _RingShift(torch.autograd.Function):
    """The block received from the previous rank (already in ``received``: the exchange was posted before
    the step's compute) as a function of the block ``x`` this rank sent on; backward: the gradient of
    ``received`` goes back to the previous rank, and ours comes from the next one."""

    @staticmethod
    def forward(ctx, x, received, group, rank, n):
        ctx.meta = (x.numel(), group, rank, n)
        return received

    @staticmethod
    def backward(ctx, grad):
        numel, group, rank, n = ctx.meta
        reqs, back = _post_exchange(grad.contiguous(), numel, (rank - 1) % n, (rank + 1) % n, group)
        for req in reqs:
            req.wait()
        return back, None, None, None, None


def _post_exchange(x, recv_numel, dst, src, group):
    """Post ``isend(x -> dst)`` and ``irecv(src)``; returns the requests and the receive buffer."""
    out = x.new_empty(recv_numel)
    gdst = dst if group is None else dist.get_global_rank(group, dst)
    gsrc = src if group is None else dist.get_global_rank(group, src)
    ops = [dist.P2POp(dist.isend, x, gdst, group), dist.P2POp(dist.irecv, out, gsrc, group)]
    return dist.batch_isend_irecv(ops), out


class _Tie(torch.autograd.Function):
    """``out`` unchanged; makes ``anchor`` reachable in backward (zero gradient) so the ring's backward
    communication runs on every rank even where the last visiting block was skipped."""

    @staticmethod
    def forward(ctx, out, anchor):
        ctx.anchor_shape = anchor.shape
        ctx.anchor_meta = (anchor.dtype, anchor.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        dtype, device = ctx.anchor_meta
        return grad, torch.zeros(ctx.anchor_shape, dtype=dtype, device=device)


# -- the ring ----------------------------------------------------------------------------------------------
def ring_core(qq, kk, vv, plan, q_ranges_of, k_ranges_of, r, n, group, scale, backend):
    """The ring on BSHD shards: ``qq`` holds the global query ranges ``q_ranges_of(r)`` (concatenated),
    ``kk``/``vv`` the key ranges ``k_ranges_of(r)``; member ``m`` of the ring (group rank ``m``) holds
    ``k_ranges_of(m)``. Returns this member's ``(out [B, s, H, Dv], lse float32 [B, H, s])``."""
    from ..api import attention

    b, _, hkv, d = kk.shape
    dv = vv.shape[-1]
    k_sizes = [sum(z - a for a, z in k_ranges_of(m)) for m in range(n)]
    q_ranges = q_ranges_of(r)
    kv = torch.cat([kk.reshape(-1), vv.reshape(-1)])
    parts = [[] for _ in q_ranges]                    # per local query range: (out, lse) of each step
    for t in range(n):
        src = (r - t) % n
        if t + 1 < n:            # hand our current block on, get the next one: posted before this step's compute
            nxt_src = (r - t - 1) % n
            sent = kv.detach().contiguous()
            reqs, received = _post_exchange(sent, b * k_sizes[nxt_src] * hkv * (d + dv), (r + 1) % n, (r - 1) % n,
                                            group)
        ks = k_sizes[src]
        kb = kv[:b * ks * hkv * d].view(b, ks, hkv, d)
        vb = kv[b * ks * hkv * d:].view(b, ks, hkv, dv)
        local_k = 0
        k_pieces = []
        for k0, k1 in k_ranges_of(src):
            k_pieces.append((k0, k1, local_k))
            local_k += k1 - k0
        local_q = 0
        for i, (q0, q1) in enumerate(q_ranges):
            for k0, k1, lk in k_pieces:
                m = step_mask(plan.restrict((q0, q1), (k0, k1)))
                if m is SKIP:
                    continue
                qs = qq[:, local_q:local_q + q1 - q0]
                ksl, vsl = kb[:, lk:lk + k1 - k0], vb[:, lk:lk + k1 - k0]
                o, lse = attention(qs, ksl, vsl, m, scale=scale, backend=backend, return_lse=True)
                parts[i].append((o, lse))
            local_q += q1 - q0
        if t + 1 < n:
            for req in reqs:
                req.wait()
            kv = _RingShift.apply(kv, received, group, r, n) if kv.requires_grad else received
    outs, lses = [], []
    for (q0, q1), got in zip(q_ranges, parts):
        o, l = _merge(got, b, q1 - q0, qq.shape[2], dv, qq)
        outs.append(o)
        lses.append(l)
    out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    lse = torch.cat(lses, -1) if len(lses) > 1 else lses[0]
    if kv.requires_grad:
        out = _Tie.apply(out, kv)
    return out, lse


def _merge(got, b, s, h, dv, like):
    """``out = sum_i exp(lse_i - lse) * out_i``, ``lse = logsumexp_i lse_i`` in float32; rows that no step
    saw stay 0 / -inf (and get zero, never NaN, gradients)."""
    if not got:
        return (like.new_zeros(b, s, h, dv),
                torch.full((b, h, s), float("-inf"), dtype=torch.float32, device=like.device))
    if len(got) == 1:
        return got[0][0], got[0][1].float()
    lse = torch.stack([l.float() for _, l in got])                   # [n, B, H, s]
    top = lse.detach().amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(lse - top).sum(0)
    seen = total > 0
    lse_fin = top + torch.log(torch.where(seen, total, torch.ones_like(total)))
    out = 0
    for o, l in got:
        w = torch.exp(l.float() - lse_fin).permute(0, 2, 1).unsqueeze(-1)   # [B, s, H, 1]
        out = out + w * o.float()
    return out.to(got[0][0].dtype), torch.where(seen, lse_fin, torch.full_like(lse_fin, float("-inf")))
