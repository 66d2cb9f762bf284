"""Ring attention: each rank keeps its query shard; the K/V shards travel around the ring.

Step ``t`` on rank ``r`` attends the local queries to the K/V shard of rank ``(r - t) mod n`` under the
slice of the whole mask's plan (``Plan.restrict``), converted back to an attnlib mask: a structured one
when the slice is expressible (``None``, ``Causal`` bottom-right / top-left, ``KeyPadding``,
``BlockDiagonal``), else an exact ``DenseMask`` of the slice; a slice in which no query sees a key is
skipped (no compute: the causal future blocks). Partial results merge with the float32 LSE rule.

The next K/V transfer is posted before each step's compute (they overlap). Backward is one pass around
the ring again: each step's block gradient comes from the merged output and LSE (the flash-attention
backward rule: ``P = exp(s - lse)``, ``dS = P * (dP - rowsum(dout * out) + dlse)``), computed in float32
in chunks of query rows under the step's slice of the plan, and each K/V block's gradient accumulator
travels with it from its second visitor on and returns to its owner after the last step (``n - 1``
hand-offs, float32). Only q, k, v, out and lse are kept for backward (not the steps): the K/V blocks go
around the ring once more instead.
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


# -- the ring ----------------------------------------------------------------------------------------------
def _post_exchange(x, recv_numel, dst, src, group):
    """Post ``isend(x -> dst)`` and ``irecv(src)``; returns the requests and the receive buffer."""
    out = x.new_empty(recv_numel)
    gdst = dst if group is None else dist.get_global_rank(group, dst)
    gsrc = src if group is None else dist.get_global_rank(group, src)
    ops = [dist.P2POp(dist.isend, x, gdst, group), dist.P2POp(dist.irecv, out, gsrc, group)]
    return dist.batch_isend_irecv(ops), out


def _wait(reqs):
    for req in reqs:
        req.wait()


class _Spec:
    """What both passes of the ring need besides the tensors."""

    def __init__(self, plan, q_ranges_of, k_ranges_of, r, n, group, scale, backend):
        self.plan, self.r, self.n, self.group, self.scale, self.backend = plan, r, n, group, scale, backend
        self.q_ranges = q_ranges_of(r)
        self.k_ranges = [k_ranges_of(m) for m in range(n)]
        self.k_sizes = [sum(z - a for a, z in rs) for rs in self.k_ranges]
        self._steps: dict = {}

    def steps(self, src):
        """``(query range index, local q offset, q range, local k offset, k range, step mask, plan slice)``
        of every non-empty slice against member ``src``'s block; built once, read by forward and backward."""
        if src not in self._steps:
            out, local_q = [], 0
            for i, (q0, q1) in enumerate(self.q_ranges):
                local_k = 0
                for k0, k1 in self.k_ranges[src]:
                    p = self.plan.restrict((q0, q1), (k0, k1))
                    m = step_mask(p)
                    if m is not SKIP:
                        out.append((i, local_q, (q0, q1), local_k, (k0, k1), m, p))
                    local_k += k1 - k0
                local_q += q1 - q0
            self._steps[src] = out
        return self._steps[src]


def ring_core(qq, kk, vv, plan, q_ranges_of, k_ranges_of, r, n, group, scale, backend):
    """The ring on BSHD shards: ``qq`` holds the global query ranges ``q_ranges_of(r)`` (concatenated),
    ``kk``/``vv`` the key ranges ``k_ranges_of(r)``; member ``m`` of the ring (group rank ``m``) holds
    ``k_ranges_of(m)``. Returns this member's ``(out [B, s, H, Dv], lse float32 [B, H, s])``."""
    spec = _Spec(plan, q_ranges_of, k_ranges_of, r, n, group, scale, backend)
    return _Ring.apply(qq, kk, vv, spec)


class _Ring(torch.autograd.Function):
    """Forward: the steps, merged by LSE. Backward: one block backward per step from the merged output
    and LSE (``P = exp(s - lse)``, ``dS = P (dP - rowsum(dout * out) + dlse)``), with the K/V blocks
    travelling the ring again and their gradient accumulators travelling with them back to their owner."""

    @staticmethod
    def forward(ctx, qq, kk, vv, spec):
        out, lse = _ring_forward(qq, kk, vv, spec)
        ctx.save_for_backward(qq, kk, vv, out, lse)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        qq, kk, vv, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(qq, kk, vv, out, lse, dout, dlse, ctx.spec)
        return dq, dk, dv, None


def _ring_forward(qq, kk, vv, spec):
    from ..api import attention

    b, _, hkv, d = kk.shape
    dv = vv.shape[-1]
    r, n = spec.r, spec.n
    kv = torch.cat([kk.reshape(-1), vv.reshape(-1)]).detach()
    parts = [[] for _ in spec.q_ranges]                 # per local query range: (out, lse) of each step
    with torch.no_grad():
        for t in range(n):
            src = (r - t) % n
            if t + 1 < n:        # hand our current block on, get the next one: posted before this step's compute
                reqs, received = _post_exchange(kv, b * spec.k_sizes[(r - t - 1) % n] * hkv * (d + dv),
                                                (r + 1) % n, (r - 1) % n, spec.group)
            ks = spec.k_sizes[src]
            kb = kv[:b * ks * hkv * d].view(b, ks, hkv, d)
            vb = kv[b * ks * hkv * d:].view(b, ks, hkv, dv)
            for i, lq, (q0, q1), lk, (k0, k1), m, _ in spec.steps(src):
                o, l = attention(qq[:, lq:lq + q1 - q0], kb[:, lk:lk + k1 - k0], vb[:, lk:lk + k1 - k0], m,
                                 scale=spec.scale, backend=spec.backend, return_lse=True)
                parts[i].append((o, l))
            if t + 1 < n:
                _wait(reqs)
                kv = received
        outs, lses = [], []
        for (q0, q1), got in zip(spec.q_ranges, parts):
            o, l = _merge(got, b, q1 - q0, qq.shape[2], dv, qq)
            outs.append(o)
            lses.append(l)
    out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    lse = torch.cat(lses, -1) if len(lses) > 1 else lses[0]
    return out, lse


#: the largest [B, H, rows, keys] float32 block the backward materializes at once (bytes)
_BLOCK_BYTES = 1 << 28


def _ring_backward(qq, kk, vv, out, lse, dout, dlse, spec):
    from ..inputs import default_scale

    b, _, hq, d = qq.shape
    hkv, dv = kk.shape[2], vv.shape[-1]
    r, n = spec.r, spec.n
    scale = default_scale(d) if spec.scale is None else float(spec.scale)
    dq = torch.zeros(qq.shape, dtype=torch.float32, device=qq.device)
    if dout is None:
        dout = torch.zeros(out.shape, dtype=out.dtype, device=out.device)
    do = dout.float()
    delta = (do * out.float()).sum(-1).permute(0, 2, 1)                     # [B, H, s]: rowsum(dout * out)
    if dlse is not None:
        delta = delta - dlse.float()
    kv = torch.cat([kk.reshape(-1), vv.reshape(-1)]).detach()

    def numel(m):
        return b * spec.k_sizes[m] * hkv * (d + dv)

    own = torch.zeros(kv.numel(), dtype=torch.float32, device=kv.device)   # our block's gradient, from us
    travelling = None          # the accumulator of the block we work on, from the ranks that saw it before us
    for t in range(n):
        src = (r - t) % n
        if t + 1 < n:
            reqs, received = _post_exchange(kv, numel((r - t - 1) % n), (r + 1) % n, (r - 1) % n, spec.group)
        acc = own if t == 0 else (torch.zeros(numel(src), dtype=torch.float32, device=kv.device) if t == 1
                                  else travelling)
        ks = spec.k_sizes[src]
        kb = kv[:b * ks * hkv * d].view(b, ks, hkv, d)
        vb = kv[b * ks * hkv * d:].view(b, ks, hkv, dv)
        dkb = acc[:b * ks * hkv * d].view(b, ks, hkv, d)
        dvb = acc[b * ks * hkv * d:].view(b, ks, hkv, dv)
        for _, lq, (q0, q1), lk, (k0, k1), _, p in spec.steps(src):
            qs, ke = slice(lq, lq + q1 - q0), slice(lk, lk + k1 - k0)
            exact = None if dlse is not None else (out[:, qs], dout[:, qs])
            _block_backward(qq[:, qs], kb[:, ke], vb[:, ke], do[:, qs], lse[..., qs], delta[..., qs], p, scale,
                            dq[:, qs], dkb[:, ke], dvb[:, ke], exact)
        if t >= 1:    # on to the block's next visitor; after the last step that is its owner
            reqs_g, travelling = _post_exchange(acc, numel((r - t - 1) % n), (r + 1) % n, (r - 1) % n, spec.group)
            _wait(reqs_g)
        if t + 1 < n:
            _wait(reqs)
            kv = received
    dkv = own if travelling is None else own + travelling
    nk = b * spec.k_sizes[r] * hkv * d
    dk = dkv[:nk].view(kk.shape).to(kk.dtype)
    dvv = dkv[nk:].view(vv.shape).to(vv.dtype)
    return dq.to(qq.dtype), dk, dvv


def _block_backward(q, k, v, do, lse, delta, p, scale, dq, dk, dv, exact_delta):
    """Accumulate one step's gradients into ``dq [B, sq, H, D]``, ``dk/dv [B, sk, Hkv, .]`` (float32 views)
    from the merged ``lse``/``delta [B, H, sq]``, under the slice ``p`` of the plan.

    On the CPU, PyTorch's flash-attention backward kernel takes the merged output and LSE directly (it
    recomputes ``rowsum(dout * out)`` itself, so only when no LSE gradient joins in: ``exact_delta``);
    otherwise the float32 formula runs on chunks of query rows."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    kx = k.repeat_interleave(g, dim=2) if g > 1 else k                    # [B, sk, H, D]
    vx = v.repeat_interleave(g, dim=2) if g > 1 else v
    keep, bias = _slice_mask(p, q.device)
    if exact_delta is not None and q.device.type == "cpu" and q.dtype in _CPU_FLASH_DTYPES:
        out, dout = exact_delta
        attn_mask = None
        if keep is not None or bias is not None:
            attn_mask = torch.zeros((), dtype=q.dtype, device=q.device) if bias is None else bias.to(q.dtype)
            if keep is not None:
                attn_mask = attn_mask.masked_fill(~keep, float("-inf"))
            attn_mask = attn_mask.expand(b, hq, sq, sk)
        safe = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))   # unseen rows: P = 0
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2), q.transpose(1, 2), kx.transpose(1, 2), vx.transpose(1, 2), out.transpose(1, 2),
            safe.contiguous(), 0.0, False, attn_mask=attn_mask, scale=scale)
        dq += gq.transpose(1, 2).float()
        dkx, dvx = gk.transpose(1, 2).float(), gv.transpose(1, 2).float()
    else:
        dkx, dvx = _formula_backward(q, kx, vx, do, lse, delta, keep, bias, scale, dq)
    if g > 1:
        dkx = dkx.reshape(b, sk, hkv, g, d).sum(3)
        dvx = dvx.reshape(b, sk, hkv, g, -1).sum(3)
    dk += dkx
    dv += dvx


_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _slice_mask(p, device):
    """``(keep, bias)`` of a plan slice, each None or broadcastable to ``[B, H, sq, sk]``: the bool
    visibility (None when everything is visible) and the additive bias of a floating ``DenseMask``."""
    if p.dense is not None and p.dense.mask.dtype != torch.bool:
        bias = p.dense.mask.to(device)
        return None, bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    if p.dense is None and p.key_valid is None and p.structure_full:
        return None, None
    keep = p.materialize(device)
    return keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape)), None


def _formula_backward(q, kx, vx, do, lse, delta, keep, bias, scale, dq):
    """The float32 block backward on materialized chunks of query rows; returns ``(dk, dv)`` per query head."""
    b, sq, hq, d = q.shape
    sk = kx.shape[1]
    kf, vf = kx.float(), vx.float()
    rows = max(1, _BLOCK_BYTES // max(1, b * hq * sk * 4))
    dkx = torch.zeros(b, sk, hq, d, dtype=torch.float32, device=q.device)
    dvx = torch.zeros(b, sk, hq, vx.shape[-1], dtype=torch.float32, device=q.device)
    for a in range(0, sq, rows):
        z = min(sq, a + rows)
        qc, doc = q[:, a:z].float(), do[:, a:z]
        s = torch.einsum("bqhd,bkhd->bhqk", qc, kf) * scale
        if bias is not None:
            s = s + bias[..., a:z, :].float()
        lc = lse[..., a:z, None]
        seen = torch.isfinite(lc) if keep is None else keep[..., a:z, :] & torch.isfinite(lc)
        prob = torch.where(seen, torch.exp(s - torch.where(torch.isfinite(lc), lc, 0.0)), 0.0)
        dvx += torch.einsum("bhqk,bqhd->bkhd", prob, doc)
        ds = prob * (torch.einsum("bqhd,bkhd->bhqk", doc, vf) - delta[..., a:z, None])
        dq[:, a:z] += torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale
        dkx += torch.einsum("bhqk,bqhd->bkhd", ds, qc) * scale
    return dkx, dvx


def _merge(got, b, s, h, dv, like):
    """``out = sum_i exp(lse_i - lse) * out_i``, ``lse = logsumexp_i lse_i`` in float32; rows that no step
    saw stay 0 / -inf. Runs without autograd (the ring's backward is its own)."""
    if not got:
        return (like.new_zeros(b, s, h, dv),
                torch.full((b, h, s), float("-inf"), dtype=torch.float32, device=like.device))
    if len(got) == 1:
        return got[0][0], got[0][1].float()
    lse = torch.stack([l.float() for _, l in got])                   # [n, B, H, s]
    top = lse.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(lse - top).sum(0)
    seen = total > 0
    lse_fin = top + torch.log(torch.where(seen, total, torch.ones_like(total)))
    out = 0
    for o, l in got:
        w = torch.exp(l.float() - lse_fin).permute(0, 2, 1).unsqueeze(-1)   # [B, s, H, 1]
        out = out + w * o.float()
    return out.to(got[0][0].dtype), torch.where(seen, lse_fin, torch.full_like(lse_fin, float("-inf")))
