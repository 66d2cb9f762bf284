"""Ring attention: each rank keeps its query shard; the K/V shards travel around the ring.

Step ``t`` on rank ``r`` attends the local queries to the K/V shard of rank ``(r - t) mod n`` under the
slice of the whole call's plan (``Plan.restrict``: the same tiles, offsets, windows, ALiBi positions and
tensors, in the slice's coordinates), run directly on the chosen backend through the dispatch; a slice in
which no query sees a key is skipped (no compute: the causal future blocks, empty sparse blocks). Partial
results merge with the float32 LSE rule (:func:`attnlib.merge.merge_partials`), and sinks join once, after
the merge.

The next K/V transfer is posted before each step's compute (they overlap). Backward is one pass around
the ring again: each step's block gradient comes from the merged output and LSE through the backend's fused
backward (or the reference formula: :func:`attnlib.dispatch.block_backward`), and each K/V block's gradient
accumulator travels with it from its second visitor on and returns to its owner after the last step
(``n - 1`` hand-offs, float32). Only q, k, v, out and lse are kept for backward (not the steps): the K/V
blocks go around the ring once more instead.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..dispatch import block_backward, run
from ..inputs import call_for
from ..merge import apply_sinks, merge_partials
from ..reference import sink_gradient
from ..registry import select_backend


def _sees_something(p) -> bool:
    """Some query of the restricted plan ``p`` may see a key: by structure, and for a host block layout by
    the layout's blocks over the slice (empty sparse blocks are skipped like the causal future)."""
    if not (p.seqlen_q > 0 and p.seqlen_k > 0 and any(a < z for a, z in (t.visible_rows() for t in p.tiles))):
        return False
    sp = p.sparse
    if sp is not None and sp.layout.device.type == "cpu":      # a host tensor: reading it syncs nothing
        q0, k0 = sp.q_origin // sp.bq, sp.k_origin // sp.bk
        q1, k1 = (sp.q_origin + p.seqlen_q - 1) // sp.bq + 1, (sp.k_origin + p.seqlen_k - 1) // sp.bk + 1
        return bool(sp.layout[..., q0:q1, k0:k1].any())
    return True


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
        self.sinks = plan.mods.sinks
        self.step_plan = plan.with_call(plan.mods.without_sinks(), None)
        self.q_ranges = q_ranges_of(r)
        self.k_ranges = [k_ranges_of(m) for m in range(n)]
        self.k_sizes = [sum(z - a for a, z in rs) for rs in self.k_ranges]
        self._steps: dict = {}

    def steps(self, src):
        """``(query range index, local q offset, q range, local k offset, k range, plan slice)`` of every
        slice against member ``src``'s block in which some query sees a key; built once, read by both passes."""
        if src not in self._steps:
            out, local_q = [], 0
            for i, (q0, q1) in enumerate(self.q_ranges):
                local_k = 0
                for k0, k1 in self.k_ranges[src]:
                    p = self.step_plan.restrict((q0, q1), (k0, k1))
                    if _sees_something(p):
                        out.append((i, local_q, (q0, q1), local_k, (k0, k1), p))
                    local_k += k1 - k0
                local_q += q1 - q0
            self._steps[src] = out
        return self._steps[src]


def ring_core(qq, kk, vv, plan, q_ranges_of, k_ranges_of, r, n, group, scale, backend):
    """The ring on BSHD shards: ``qq`` holds the global query ranges ``q_ranges_of(r)`` (concatenated),
    ``kk``/``vv`` the key ranges ``k_ranges_of(r)``; member ``m`` of the ring (group rank ``m``) holds
    ``k_ranges_of(m)``. ``plan`` is the whole call's (with its score modifiers). Returns this member's
    ``(out [B, s, H, Dv], lse float32 [B, H, s])``."""
    spec = _Spec(plan, q_ranges_of, k_ranges_of, r, n, group, scale, backend)
    return _Ring.apply(qq, kk, vv, spec.sinks, spec)


class _Ring(torch.autograd.Function):
    """Forward: the steps, merged by LSE. Backward: one block backward per step from the merged output
    and LSE (``P = exp(s - lse)``, ``dS = P (dP - rowsum(dout * out) + dlse)``), with the K/V blocks
    travelling the ring again and their gradient accumulators travelling with them back to their owner."""

    @staticmethod
    def forward(ctx, qq, kk, vv, sinks, spec):
        out, lse = _ring_forward(qq, kk, vv, spec)
        ctx.save_for_backward(qq, kk, vv, out, lse)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        qq, kk, vv, out, lse = ctx.saved_tensors
        spec = ctx.spec
        dq, dk, dv = _ring_backward(qq, kk, vv, out, lse, dout, dlse, spec)
        dsinks = None
        if ctx.needs_input_grad[3]:      # every rank's rows add to the (replicated) sinks' gradient
            dsinks = sink_gradient(out, lse, dout, dlse, spec.sinks)
            dist.all_reduce(dsinks, group=spec.group)
        return dq, dk, dv, dsinks, None


def _step_call(spec, q, k, v, p, return_lse: bool = True):
    return call_for(q, k, v, p, spec.scale, return_lse)


def _ring_forward(qq, kk, vv, spec):
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
            for i, lq, (q0, q1), lk, (k0, k1), p in spec.steps(src):
                call = _step_call(spec, qq[:, lq:lq + q1 - q0], kb[:, lk:lk + k1 - k0], vb[:, lk:lk + k1 - k0], p)
                parts[i].append(run(call, spec.backend))
            if t + 1 < n:
                _wait(reqs)
                kv = received
        outs, lses = [], []
        for (q0, q1), got in zip(spec.q_ranges, parts):
            o, l = merge_partials(got, like=qq.new_zeros(b, q1 - q0, qq.shape[2], dv))
            outs.append(o)
            lses.append(l)
        out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        lse = torch.cat(lses, -1) if len(lses) > 1 else lses[0]
        if spec.sinks is not None:        # once, after every step
            out, lse = apply_sinks(out, lse, spec.sinks)
    return out, lse


def _ring_backward(qq, kk, vv, out, lse, dout, dlse, spec):
    b, _, hq, d = qq.shape
    hkv, dv = kk.shape[2], vv.shape[-1]
    r, n = spec.r, spec.n
    dq = torch.zeros(qq.shape, dtype=torch.float32, device=qq.device)
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
        for _, lq, (q0, q1), lk, (k0, k1), p in spec.steps(src):
            qs, ke = slice(lq, lq + q1 - q0), slice(lk, lk + k1 - k0)
            call = _step_call(spec, qq[:, qs], kb[:, ke], vb[:, ke], p)
            block_backward(select_backend(call, spec.backend), call, out[:, qs], lse[..., qs],
                           None if dout is None else dout[:, qs], None if dlse is None else dlse[..., qs],
                           dq[:, qs], dkb[:, ke], dvb[:, ke])
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
