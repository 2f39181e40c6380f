"""The edge-loss matrix: every edge's gated per-sample loss, summed into each target's L_t, in one
launch; the gradient w.r.t. every trained endpoint's logits in one more.

The logits are read in place: the kernels get the first endpoint's pointer and every other
endpoint's element offset from it (up to MAX_LINKED endpoints; more are stacked into one buffer
first), so no copy of the logits is made on the way in or out.

Forward, per block of rows: each endpoint's max, first arg-max and log-sum-exp (online over blocks
of classes), then the log-sum-exp of z/T for every (endpoint, T != 1) pair the KL edges need: each
softmax is computed once per row and shared by all edges. Then each edge reads its two rows again
(from cache) and sums its terms. The log-sum-exps, gates and cosine factors are saved, so the
backward is a single pass: one program per (block of rows, trained endpoint), summing the
gradients of the edges into it in registers and storing them once.

exp and log are libdevice's and sqrt the correctly rounded one (see `rows`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import edge_table as et
from . import plans
from .rows import exp, gate_weight, load_rows, offset, pick, row_stats, tempered_lse

OFFSET_ARGS = 15  # ep_off1 … ep_off15 below: endpoint n's element offset from endpoint 0's logits
# The offsets move whenever the logits' buffers do: at every eager step (a captured graph keeps its
# capture's). Plain ints, Triton would specialise the kernels on their values (i32 or i64, divisible
# by 16 or not) and compile a new variant whenever the pattern changes, inside a CUDA-graph capture
# too. Typed int64 and not specialised, one compiled kernel takes them all. (A device table of them
# would need an upload at every eager step, a host-to-device copy that a capture cannot hold.)
ENDPOINT_OFFSETS = [f"ep_off{n}" for n in range(1, OFFSET_ARGS + 1)]
MAX_LINKED = OFFSET_ARGS + 1  # endpoints read in place, through the offsets
MAX_BLOCK_C = 1024  # classes per block: wider rows are walked in blocks (online max and sum)
GPU_TILE = 1024  # elements per block of rows on a GPU (see plans.edge_plan)

_CE, _KL, _COS, _MSE = (tl.constexpr(b) for b in (et.CE, et.KL, et.COS, et.MSE))
_SRC, _DST, _KIND, _GATE, _SSLOT, _DSLOT, _TGT = (tl.constexpr(r) for r in range(7))
_INV_T, _DINV_T, _KL_SCALE, _WEIGHT, _INV_GAMMA = (tl.constexpr(r) for r in range(5))


@triton.jit(do_not_specialize=ENDPOINT_OFFSETS)
def _edge_loss_fwd(z, node_stride, ep_off1: tl.int64, ep_off2: tl.int64, ep_off3: tl.int64, ep_off4: tl.int64,
                   ep_off5: tl.int64, ep_off6: tl.int64, ep_off7: tl.int64, ep_off8: tl.int64, ep_off9: tl.int64,
                   ep_off10: tl.int64, ep_off11: tl.int64, ep_off12: tl.int64, ep_off13: tl.int64, ep_off14: tl.int64,
                   ep_off15: tl.int64,
                   y_ptr, factor, factor_ptr, ints, floats, slot_node, slot_inv_t, part_ptr, count_ptr, out_ptr,
                   aux_ptr, lse_ptr, B, C, E, M, S, NT, inv_b,
                   STACKED: tl.constexpr, FACTOR_FROM_PTR: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_C: tl.constexpr, M_P2: tl.constexpr, S_P2: tl.constexpr, NT_P2: tl.constexpr,
                   P_BLOCK: tl.constexpr):
    """out[:NT] = every target's L_t, out[NT] = their sum."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    row_off = rows.to(tl.int64) * C
    cols = tl.arange(0, BLOCK_C)
    y = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int32)
    if FACTOR_FROM_PTR:
        factor = tl.load(factor_ptr).to(tl.float32)

    # Every endpoint's statistics, then the tempered log-sum-exps: [endpoint or slot, row] tiles.
    node_ids = tl.arange(0, M_P2)
    slot_ids = tl.arange(0, S_P2)
    maxes = tl.zeros([M_P2, ROWS], tl.float32)
    args = tl.zeros([M_P2, ROWS], tl.int32)
    lses = tl.zeros([S_P2, ROWS], tl.float32)
    for n in range(M):
        ptr = z + offset(n, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8,
                         ep_off9, ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED)
        mx, arg, lse = row_stats(ptr, row_off, rmask, C, ROWS, BLOCK_C)
        maxes = tl.where(node_ids[:, None] == n, mx[None, :], maxes)
        args = tl.where(node_ids[:, None] == n, arg[None, :], args)
        lses = tl.where(slot_ids[:, None] == n, lse[None, :], lses)
    for k in range(M, S):
        n = tl.load(slot_node + k)
        ptr = z + offset(n, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8,
                         ep_off9, ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED)
        lse = tempered_lse(ptr, row_off, rmask, pick(maxes, node_ids, n), tl.load(slot_inv_t + k), C, ROWS, BLOCK_C)
        lses = tl.where(slot_ids[:, None] == k, lse[None, :], lses)
    tl.store(lse_ptr + slot_ids[:, None] * B + rows[None, :], lses, mask=(slot_ids[:, None] < S) & rmask[None, :])

    target_ids = tl.arange(0, NT_P2)
    part = tl.zeros([NT_P2], tl.float32)
    for e in range(E):
        src = tl.load(ints + _SRC * E + e)
        dst = tl.load(ints + _DST * E + e)
        kind = tl.load(ints + _KIND * E + e)
        gate_kind = tl.load(ints + _GATE * E + e)
        inv_t = tl.load(floats + _INV_T * E + e)
        inv_tt = tl.load(floats + _DINV_T * E + e)
        sp = z + offset(tl.maximum(src, 0), node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6,
                        ep_off7, ep_off8, ep_off9, ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED)
        tp = z + offset(dst, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8,
                        ep_off9, ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED)
        lse_s1 = pick(lses, slot_ids, src)
        lse_t1 = pick(lses, slot_ids, dst)
        lse_st = pick(lses, slot_ids, tl.load(ints + _SSLOT * E + e))
        lse_tt = pick(lses, slot_ids, tl.load(ints + _DSLOT * E + e))

        loss = tl.zeros([ROWS], tl.float32)
        if (kind & _CE) != 0:  # -log p_t[y]
            loss += lse_t1 - tl.load(tp + row_off + y, mask=rmask, other=0.0).to(tl.float32)
        kl = tl.zeros([ROWS], tl.float32)
        dot = tl.zeros([ROWS], tl.float32)
        ss = tl.zeros([ROWS], tl.float32)
        tt = tl.zeros([ROWS], tl.float32)
        sq = tl.zeros([ROWS], tl.float32)
        if (kind & (_KL | _COS | _MSE)) != 0:
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + cols
                valid = rmask[:, None] & (cc < C)[None, :]
                zs = load_rows(sp, row_off, rmask, cc, C)
                zt = load_rows(tp, row_off, rmask, cc, C)
                if (kind & _KL) != 0:  # Σ p_s (log p_s - log p_t), p_s at T, p_t at T or 1
                    ps = tl.where(valid, exp(zs * inv_t - lse_st[:, None]), 0.0)
                    kl += tl.sum(ps * (zs * inv_t - zt * inv_tt + (lse_tt - lse_st)[:, None]), axis=1)
                if (kind & _COS) != 0:
                    ps = tl.where(valid, exp(zs - lse_s1[:, None]), 0.0)
                    pt = tl.where(valid, exp(zt - lse_t1[:, None]), 0.0)
                    dot += tl.sum(ps * pt, axis=1)
                    ss += tl.sum(ps * ps, axis=1)
                    tt += tl.sum(pt * pt, axis=1)
                if (kind & _MSE) != 0:
                    d = zt - zs
                    sq += tl.sum(d * d, axis=1)
        loss += kl * tl.load(floats + _KL_SCALE * E + e) + sq / C
        if (kind & _COS) != 0:
            norms = tl.where(rmask, tl.sqrt_rn(ss) * tl.sqrt_rn(tt), 1.0)  # rows past B: no 0 / 0
            tt = tl.where(rmask, tt, 1.0)
            cos = dot / norms
            loss += cos
            # The backward's d cos / d p_t = p_s / (|p_s||p_t|) - cos · p_t / |p_t|²
            tl.store(aux_ptr + (E + e) * B + rows, 1.0 / norms, mask=rmask)
            tl.store(aux_ptr + (2 * E + e) * B + rows, cos / tt, mask=rmask)

        correct = (pick(args, node_ids, src) == y) | (src < 0)  # the label is always right
        gate = gate_weight(gate_kind, factor, tl.load(floats + _INV_GAMMA * E + e), correct)
        tl.store(aux_ptr + e * B + rows, gate, mask=rmask)
        total = tl.sum(tl.where(rmask, gate * loss, 0.0), axis=0) * tl.load(floats + _WEIGHT * E + e) * inv_b
        part += tl.where(target_ids == tl.load(ints + _TGT * E + e), total, 0.0)
    _reduce_programs(part, part_ptr, count_ptr, out_ptr, target_ids, NT, NT_P2, P_BLOCK)


@triton.jit
def _reduce_programs(part, part_ptr, count_ptr, out_ptr, target_ids, NT, NT_P2: tl.constexpr,
                     P_BLOCK: tl.constexpr):
    """Each program's partial sums [NT_P2] into out: the program that finishes last adds up every
    program's row in program order (blocks of P_BLOCK rows, each a fixed tree), so the result does
    not depend on which one that is, then resets the counter for the next launch (or graph replay)."""
    programs = tl.num_programs(0)
    if programs == 1:
        tl.store(out_ptr + target_ids, part, mask=target_ids < NT)
        tl.store(out_ptr + NT, tl.sum(part, axis=0))
    else:
        tl.store(part_ptr + tl.program_id(0) * NT_P2 + target_ids, part)
        tl.debug_barrier()  # every thread's store precedes the release below
        done = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if done == programs - 1:
            acc = tl.zeros([NT_P2], tl.float32)
            ids = tl.arange(0, P_BLOCK)
            for p0 in range(0, programs, P_BLOCK):
                rows = p0 + ids
                tile = tl.load(part_ptr + rows[:, None] * NT_P2 + target_ids[None, :],
                               mask=(rows < programs)[:, None], other=0.0, cache_modifier=".cg")
                acc += tl.sum(tile, axis=0)
            tl.store(out_ptr + target_ids, acc, mask=target_ids < NT)
            tl.store(out_ptr + NT, tl.sum(acc, axis=0))
            tl.atomic_xchg(count_ptr, 0)


@triton.jit(do_not_specialize=ENDPOINT_OFFSETS)
def _edge_loss_bwd(z, node_stride, ep_off1: tl.int64, ep_off2: tl.int64, ep_off3: tl.int64, ep_off4: tl.int64,
                   ep_off5: tl.int64, ep_off6: tl.int64, ep_off7: tl.int64, ep_off8: tl.int64, ep_off9: tl.int64,
                   ep_off10: tl.int64, ep_off11: tl.int64, ep_off12: tl.int64, ep_off13: tl.int64, ep_off14: tl.int64,
                   ep_off15: tl.int64,
                   y_ptr, grad_l, grad_total, ints, floats, grads, aux_ptr, lse_ptr, out_ptr, B, C, E, G, inv_b,
                   STACKED: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                   HAS_GRAD_L: tl.constexpr, HAS_GRAD_TOTAL: tl.constexpr):
    """out[g] = Σ_{edges e into node g} dL/dL_t · weight / B · gate · d loss_e / d z_g, where
    dL/dL_t = grad_l[t] + grad_total (either may be absent: the step back-propagates the total)."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    row_off = rows.to(tl.int64) * C
    cols = tl.arange(0, BLOCK_C)
    y = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int32)
    n = tl.load(grads + g)
    first = tl.load(grads + G + g)
    last = tl.load(grads + 2 * G + g)
    tp = z + offset(n, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8, ep_off9,
                    ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED)
    out = out_ptr + g.to(tl.int64) * B * C
    lse_t1 = tl.load(lse_ptr + n * B + rows, mask=rmask, other=0.0)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        zt = load_rows(tp, row_off, rmask, cc, C)
        pt = exp(zt - lse_t1[:, None])
        acc = tl.zeros([ROWS, BLOCK_C], tl.float32)
        pt_tempered = pt  # p_t at the slot below: the KL edges into a node mostly share one T
        slot = n
        for e in range(first, last):
            src = tl.load(ints + _SRC * E + e)
            kind = tl.load(ints + _KIND * E + e)
            inv_t = tl.load(floats + _INV_T * E + e)
            d_target = 0.0
            if HAS_GRAD_L:
                d_target += tl.load(grad_l + tl.load(ints + _TGT * E + e)).to(tl.float32)
            if HAS_GRAD_TOTAL:
                d_target += tl.load(grad_total).to(tl.float32)
            scale = (d_target * tl.load(floats + _WEIGHT * E + e) * inv_b
                     * tl.load(aux_ptr + e * B + rows, mask=rmask, other=0.0))
            if (kind & _CE) != 0:
                acc += scale[:, None] * (pt - tl.where(cc[None, :] == y[:, None], 1.0, 0.0))
            if (kind & (_KL | _COS | _MSE)) != 0:
                sp = z + offset(src, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7,
                                ep_off8, ep_off9, ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED)
                zs = load_rows(sp, row_off, rmask, cc, C)
                if (kind & _KL) != 0:  # scale · KL has gradient scale / T_t · (p_t - p_s), p_t at T_t
                    inv_tt = tl.load(floats + _DINV_T * E + e)
                    dslot = tl.load(ints + _DSLOT * E + e)
                    if dslot != slot:
                        lse_tt = tl.load(lse_ptr + dslot * B + rows, mask=rmask, other=0.0)
                        pt_tempered = exp(zt * inv_tt - lse_tt[:, None])
                        slot = dslot
                    lse_st = tl.load(lse_ptr + tl.load(ints + _SSLOT * E + e) * B + rows, mask=rmask, other=0.0)
                    ps = exp(zs * inv_t - lse_st[:, None])
                    acc += (scale * (tl.load(floats + _KL_SCALE * E + e) * inv_tt))[:, None] * (pt_tempered - ps)
                if (kind & _COS) != 0:
                    ps = exp(zs - tl.load(lse_ptr + src * B + rows, mask=rmask, other=0.0)[:, None])
                    a = tl.load(aux_ptr + (E + e) * B + rows, mask=rmask, other=0.0)
                    b = tl.load(aux_ptr + (2 * E + e) * B + rows, mask=rmask, other=0.0)
                    acc += scale[:, None] * pt * (ps * a[:, None] - pt * b[:, None])
                if (kind & _MSE) != 0:
                    acc += (scale * (2.0 / C))[:, None] * (zt - zs)
        mask = rmask[:, None] & (cc < C)[None, :]
        tl.store(out + row_off[:, None] + cc[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(B: int, C: int, device: torch.device) -> tuple[int, int, int, int]:
    """(rows per program, classes per block, warps, programs): `plans.edge_plan` on this device."""
    return plans.edge_plan(B, C, plans.multiprocessors(device), MAX_BLOCK_C, GPU_TILE)


def _new_scratch(device: torch.device, programs: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's partial-sum rows [programs, width] and its finish counter, at 0."""
    return (torch.empty(programs, width, device=device, dtype=torch.float32),
            torch.zeros(1, device=device, dtype=torch.int32))


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class Scratch:
    """The edge-loss forward's scratch memory, owned by one caller (a training step) and passed to
    each call: per (device, programs, width), the programs' partial-sum rows and the counter that
    finds the last program, which leaves it at 0 again for the next launch or graph replay.

    Two launches using one Scratch at the same time would add into each other's rows and counter:
    its owner's launches must run one after another (on one stream, or synchronised). So nothing is
    shared behind the caller's back: without a Scratch a call makes its own.

    Made on first use, which must not be inside a CUDA-graph capture: memory allocated there
    belongs to the graph's pool. Run the step once before capturing it (its warm-up does)."""

    def __init__(self):
        self._buffers: dict = {}

    def buffers(self, device: torch.device, programs: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, programs, width)
        if key not in self._buffers:
            if _capturing(device):
                raise RuntimeError(f"edge losses: the Scratch has no {programs}x{width} buffers on {device} yet, "
                                   "and a CUDA graph is being captured: run the step once before capturing it")
            self._buffers[key] = _new_scratch(device, programs, width)
        return self._buffers[key]


def _link(rows: list[torch.Tensor]) -> tuple[torch.Tensor, list[int], int, bool]:
    """(base tensor, element offsets, node stride, stacked?): how the kernels address the rows."""
    if len(rows) > MAX_LINKED:
        stacked = torch.stack(rows)
        return stacked, [0] * OFFSET_ARGS, stacked.stride(0), True
    base, size = rows[0].data_ptr(), rows[0].element_size()
    offsets = [(r.data_ptr() - base) // size for r in rows[1:]]
    return rows[0], offsets + [0] * (OFFSET_ARGS - len(offsets)), 0, False


class EdgeLossFn(torch.autograd.Function):
    """(table, labels, k / k_end, scratch, *logits [B, C] per endpoint) -> (L [targets], their sum [],
    gates [E, B]).

    k / k_end is a float or a 0-d device tensor (read by the kernel, so that a captured CUDA graph
    sees it change); scratch is the caller's `Scratch`, or None for memory of the call's own. L and
    the sum carry gradients: a step back-propagates the sum, and the backward reads its gradient
    directly. The gates are for the attention kernel.
    """

    @staticmethod
    def forward(ctx, table: et.EdgeTable, labels, factor, scratch: Scratch | None, *logits):
        B, C = logits[0].shape
        E, S, M, NT = table.n_edges, table.n_slots, len(logits), len(table.targets)
        device = labels.device
        rows_per, block_c, warps, programs = _blocks(B, C, device)
        width = triton.next_power_of_2(NT)
        part, count = (scratch.buffers if scratch is not None else _new_scratch)(device, programs, width)
        base, offsets, node_stride, stacked = _link(list(logits))
        out = torch.empty(NT + 1, device=device, dtype=torch.float32)
        saved = torch.empty((3 * E + S) * B, device=device, dtype=torch.float32)  # for the backward
        aux, lse = saved[:3 * E * B].view(3, E, B), saved[3 * E * B:].view(S, B)
        from_ptr = torch.is_tensor(factor)
        _edge_loss_fwd[(programs,)](
            base, node_stride, *offsets, labels, 0.0 if from_ptr else float(factor), factor if from_ptr else out,
            table.ints, table.floats, table.slot_node, table.slot_inv_t, part, count, out, aux, lse,
            B, C, E, M, S, NT, 1.0 / B, STACKED=stacked, FACTOR_FROM_PTR=from_ptr, ROWS=rows_per,
            BLOCK_C=block_c, M_P2=triton.next_power_of_2(M), S_P2=triton.next_power_of_2(S),
            NT_P2=width, P_BLOCK=min(64, triton.next_power_of_2(programs)), num_warps=warps)
        ctx.save_for_backward(labels, aux, lse, *logits)
        ctx.table = table
        ctx.set_materialize_grads(False)
        gates = aux[0]
        ctx.mark_non_differentiable(gates)
        return out[:NT], out[NT], gates

    @staticmethod
    def backward(ctx, grad_l, grad_total, _grad_gates):
        labels, aux, lse, *logits = ctx.saved_tensors
        table = ctx.table
        B, C = logits[0].shape
        G = len(table.grad_nodes)
        grads = [None] * len(logits)
        if G == 0 or (grad_l is None and grad_total is None):
            return None, None, None, None, *grads
        rows_per, block_c, warps, programs = _blocks(B, C, labels.device)
        base, offsets, node_stride, stacked = _link(logits)
        out = torch.empty(G, B, C, device=labels.device, dtype=logits[0].dtype)
        _edge_loss_bwd[(programs, G)](
            base, node_stride, *offsets, labels, aux if grad_l is None else grad_l.contiguous(),
            aux if grad_total is None else grad_total, table.ints, table.floats, table.grads,
            aux, lse, out, B, C, table.n_edges, G, 1.0 / B, STACKED=stacked, ROWS=rows_per, BLOCK_C=block_c,
            HAS_GRAD_L=grad_l is not None, HAS_GRAD_TOTAL=grad_total is not None, num_warps=warps)
        for g, n in enumerate(table.grad_nodes):
            grads[n] = out[g]
        return None, None, None, None, *grads
