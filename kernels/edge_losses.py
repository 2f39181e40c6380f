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

exp and log are libdevice's (within 2 ulp) and sqrt the correctly rounded one, not `tl.exp`/`tl.log`'s
ex2/lg2.approx: T² · KL at T = 10 magnifies their error past 1e-5 of the reference's value.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import edge_table as et

OFFSET_ARGS = 15  # o1 … o15 below
MAX_LINKED = OFFSET_ARGS + 1  # endpoints read in place, through the offsets
MAX_BLOCK_C = 1024  # classes per block: wider rows are walked in blocks (online max and sum)
GPU_TILE = 4096  # elements per block of rows on a GPU: enough bytes in flight per program

_CE, _KL, _COS, _MSE = (tl.constexpr(b) for b in (et.CE, et.KL, et.COS, et.MSE))
_SRC, _DST, _KIND, _GATE, _SSLOT, _DSLOT, _TGT = (tl.constexpr(r) for r in range(7))
_INV_T, _DINV_T, _KL_SCALE, _WEIGHT, _INV_GAMMA = (tl.constexpr(r) for r in range(5))


# The interpreter has no libdevice (and its numpy exp and log are exact anyway).
_LIBDEVICE = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _exp(x):
    if _LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _log(x):
    if _LIBDEVICE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _offset(n, node_stride, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15,
            STACKED: tl.constexpr):
    """Element offset of endpoint n's logits from endpoint 0's."""
    if STACKED:
        return tl.cast(n, tl.int64) * node_stride
    off = (tl.where(n == 1, o1, 0) + tl.where(n == 2, o2, 0) + tl.where(n == 3, o3, 0) + tl.where(n == 4, o4, 0)
           + tl.where(n == 5, o5, 0) + tl.where(n == 6, o6, 0) + tl.where(n == 7, o7, 0) + tl.where(n == 8, o8, 0)
           + tl.where(n == 9, o9, 0) + tl.where(n == 10, o10, 0) + tl.where(n == 11, o11, 0)
           + tl.where(n == 12, o12, 0) + tl.where(n == 13, o13, 0) + tl.where(n == 14, o14, 0)
           + tl.where(n == 15, o15, 0))
    return off.to(tl.int64)


@triton.jit
def _load(ptr, row_off, rmask, cc, C):
    """A [ROWS, BLOCK_C] block of logits as fp32; 0 outside the rows and classes."""
    mask = rmask[:, None] & (cc < C)[None, :]
    return tl.load(ptr + row_off[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _stats(ptr, row_off, rmask, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per row: max, first arg-max (as torch.argmax) and log-sum-exp, online over class blocks."""
    cols = tl.arange(0, BLOCK_C)
    mx = tl.full([ROWS], -float("inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    arg = tl.zeros([ROWS], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        z = tl.where((cc < C)[None, :], _load(ptr, row_off, rmask, cc, C), -float("inf"))
        block_max = tl.max(z, axis=1)
        block_arg = tl.min(tl.where(z == block_max[:, None], cc[None, :], C), axis=1)
        new = tl.maximum(mx, block_max)
        total = total * _exp(mx - new) + tl.sum(_exp(z - new[:, None]), axis=1)
        arg = tl.where(block_max > mx, block_arg, arg)  # an earlier block keeps ties
        mx = new
    return mx, arg, mx + _log(total)


@triton.jit
def _tempered_lse(ptr, row_off, rmask, mx, inv_t, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """log Σ exp(z / T) per row, given max(z): max(z / T) = max(z) / T."""
    cols = tl.arange(0, BLOCK_C)
    total = tl.zeros([ROWS], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        z = _load(ptr, row_off, rmask, cc, C)
        total += tl.sum(tl.where((cc < C)[None, :], _exp((z - mx[:, None]) * inv_t), 0.0), axis=1)
    return mx * inv_t + _log(total)


@triton.jit
def _pick(tile, ids, k):
    """Row k of a small [K, ROWS] tile of per-row statistics."""
    return tl.sum(tl.where(ids[:, None] == k, tile, 0), axis=0)


@triton.jit
def _gate(gate_kind, factor, inv_gamma, correct):
    """Per row: the gate's weight (DESIGN §1, Gates), factor = k / k_end. The gamma gates' power
    x^(1/γ) is exp(log(x) / γ), and 0 at x = 0."""
    fading = 1.0 - factor
    base = tl.where(gate_kind == 4, factor, fading)
    power = tl.where(base > 0.0, _exp(_log(tl.maximum(base, 1e-30)) * inv_gamma), 0.0)
    weight = tl.where(gate_kind == 1, factor, tl.where(gate_kind == 3, fading, power))
    return tl.where(gate_kind == 0, 1.0, tl.where(gate_kind == 2, tl.where(correct, 1.0, 0.0), weight))


@triton.jit
def _edge_loss_fwd(z, node_stride, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15,
                   y_ptr, factor, factor_ptr, ints, floats, slot_node, slot_inv_t, part_ptr, aux_ptr, lse_ptr,
                   B, C, E, M, S, NT, inv_b,
                   STACKED: tl.constexpr, FACTOR_FROM_PTR: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_C: tl.constexpr, M_P2: tl.constexpr, S_P2: tl.constexpr, NT_P2: tl.constexpr):
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
        ptr = z + _offset(n, node_stride, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, STACKED)
        mx, arg, lse = _stats(ptr, row_off, rmask, C, ROWS, BLOCK_C)
        maxes = tl.where(node_ids[:, None] == n, mx[None, :], maxes)
        args = tl.where(node_ids[:, None] == n, arg[None, :], args)
        lses = tl.where(slot_ids[:, None] == n, lse[None, :], lses)
    for k in range(M, S):
        n = tl.load(slot_node + k)
        ptr = z + _offset(n, node_stride, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, STACKED)
        lse = _tempered_lse(ptr, row_off, rmask, _pick(maxes, node_ids, n), tl.load(slot_inv_t + k), C, ROWS, BLOCK_C)
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
        sp = z + _offset(tl.maximum(src, 0), node_stride, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13,
                         o14, o15, STACKED)
        tp = z + _offset(dst, node_stride, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, STACKED)
        lse_s1 = _pick(lses, slot_ids, src)
        lse_t1 = _pick(lses, slot_ids, dst)
        lse_st = _pick(lses, slot_ids, tl.load(ints + _SSLOT * E + e))
        lse_tt = _pick(lses, slot_ids, tl.load(ints + _DSLOT * E + e))

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
                zs = _load(sp, row_off, rmask, cc, C)
                zt = _load(tp, row_off, rmask, cc, C)
                if (kind & _KL) != 0:  # Σ p_s (log p_s - log p_t), p_s at T, p_t at T or 1
                    ps = tl.where(valid, _exp(zs * inv_t - lse_st[:, None]), 0.0)
                    kl += tl.sum(ps * (zs * inv_t - zt * inv_tt + (lse_tt - lse_st)[:, None]), axis=1)
                if (kind & _COS) != 0:
                    ps = tl.where(valid, _exp(zs - lse_s1[:, None]), 0.0)
                    pt = tl.where(valid, _exp(zt - lse_t1[:, None]), 0.0)
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

        correct = (_pick(args, node_ids, src) == y) | (src < 0)  # the label is always right
        gate = _gate(gate_kind, factor, tl.load(floats + _INV_GAMMA * E + e), correct)
        tl.store(aux_ptr + e * B + rows, gate, mask=rmask)
        total = tl.sum(tl.where(rmask, gate * loss, 0.0), axis=0) * tl.load(floats + _WEIGHT * E + e) * inv_b
        part += tl.where(target_ids == tl.load(ints + _TGT * E + e), total, 0.0)
    tl.store(part_ptr + pid * NT + target_ids, part, mask=target_ids < NT)


@triton.jit
def _edge_loss_bwd(z, node_stride, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15,
                   y_ptr, grad_l, ints, floats, grads, aux_ptr, lse_ptr, out_ptr, B, C, E, G, inv_b,
                   STACKED: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[g] = Σ_{edges e into node g} dL/dL_t · weight / B · gate · d loss_e / d z_g."""
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
    tp = z + _offset(n, node_stride, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, STACKED)
    out = out_ptr + g.to(tl.int64) * B * C
    lse_t1 = tl.load(lse_ptr + n * B + rows, mask=rmask, other=0.0)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        zt = _load(tp, row_off, rmask, cc, C)
        pt = _exp(zt - lse_t1[:, None])
        acc = tl.zeros([ROWS, BLOCK_C], tl.float32)
        pt_tempered = pt  # p_t at the slot below: the KL edges into a node mostly share one T
        slot = n
        for e in range(first, last):
            src = tl.load(ints + _SRC * E + e)
            kind = tl.load(ints + _KIND * E + e)
            inv_t = tl.load(floats + _INV_T * E + e)
            scale = (tl.load(grad_l + tl.load(ints + _TGT * E + e)) * tl.load(floats + _WEIGHT * E + e) * inv_b
                     * tl.load(aux_ptr + e * B + rows, mask=rmask, other=0.0))
            if (kind & _CE) != 0:
                acc += scale[:, None] * (pt - tl.where(cc[None, :] == y[:, None], 1.0, 0.0))
            if (kind & (_KL | _COS | _MSE)) != 0:
                sp = z + _offset(src, node_stride, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14,
                                 o15, STACKED)
                zs = _load(sp, row_off, rmask, cc, C)
                if (kind & _KL) != 0:  # scale · KL has gradient scale / T_t · (p_t - p_s), p_t at T_t
                    inv_tt = tl.load(floats + _DINV_T * E + e)
                    dslot = tl.load(ints + _DSLOT * E + e)
                    if dslot != slot:
                        lse_tt = tl.load(lse_ptr + dslot * B + rows, mask=rmask, other=0.0)
                        pt_tempered = _exp(zt * inv_tt - lse_tt[:, None])
                        slot = dslot
                    lse_st = tl.load(lse_ptr + tl.load(ints + _SSLOT * E + e) * B + rows, mask=rmask, other=0.0)
                    ps = _exp(zs * inv_t - lse_st[:, None])
                    acc += (scale * (tl.load(floats + _KL_SCALE * E + e) * inv_tt))[:, None] * (pt_tempered - ps)
                if (kind & _COS) != 0:
                    ps = _exp(zs - tl.load(lse_ptr + src * B + rows, mask=rmask, other=0.0)[:, None])
                    a = tl.load(aux_ptr + (E + e) * B + rows, mask=rmask, other=0.0)
                    b = tl.load(aux_ptr + (2 * E + e) * B + rows, mask=rmask, other=0.0)
                    acc += scale[:, None] * pt * (ps * a[:, None] - pt * b[:, None])
                if (kind & _MSE) != 0:
                    acc += (scale * (2.0 / C))[:, None] * (zt - zs)
        mask = rmask[:, None] & (cc < C)[None, :]
        tl.store(out + row_off[:, None] + cc[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(B: int, C: int, cuda: bool) -> tuple[int, int, int]:
    """(rows per program, classes per block, warps). On a GPU: enough programs to fill it at small
    B, enough bytes per program at large B. In the interpreter every program costs host time."""
    block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C)
    rows = max(1, GPU_TILE // block_c) if cuda else max(1, 4 * MAX_BLOCK_C // block_c)
    if cuda:
        rows = min(rows, max(1, triton.next_power_of_2(triton.cdiv(B, 2 * _sm_count()))))
    rows = min(rows, triton.next_power_of_2(B))
    return rows, block_c, max(1, min(8, rows * block_c // 256))


_SMS: dict = {}


def _sm_count() -> int:
    device = torch.cuda.current_device()
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def _link(rows: list[torch.Tensor]) -> tuple[torch.Tensor, list[int], int, bool]:
    """(base tensor, element offsets, node stride, stacked?): how the kernels address the rows."""
    if len(rows) > MAX_LINKED:
        stacked = torch.stack(rows)
        return stacked, [0] * OFFSET_ARGS, stacked.stride(0), True
    base, size = rows[0].data_ptr(), rows[0].element_size()
    offsets = [(r.data_ptr() - base) // size for r in rows[1:]]
    return rows[0], offsets + [0] * (OFFSET_ARGS - len(offsets)), 0, False


class EdgeLossFn(torch.autograd.Function):
    """(table, labels, k / k_end, *logits [B, C] per endpoint) -> (L [targets], gates [E, B]).

    k / k_end is a float or a 0-d device tensor (read by the kernel, so that a captured
    CUDA graph sees it change). Only L carries a gradient; the gates are for the attention kernel.
    """

    @staticmethod
    def forward(ctx, table: et.EdgeTable, labels, factor, *logits):
        B, C = logits[0].shape
        E, S, M, NT = table.n_edges, table.n_slots, len(logits), len(table.targets)
        cuda = labels.is_cuda
        rows_per, block_c, warps = _blocks(B, C, cuda)
        programs = triton.cdiv(B, rows_per)
        base, offsets, node_stride, stacked = _link(list(logits))
        part = torch.empty(programs, NT, device=labels.device, dtype=torch.float32)
        aux = torch.empty(3, E, B, device=labels.device, dtype=torch.float32)
        lse = torch.empty(S, B, device=labels.device, dtype=torch.float32)
        from_ptr = torch.is_tensor(factor)
        _edge_loss_fwd[(programs,)](
            base, node_stride, *offsets, labels, 0.0 if from_ptr else float(factor), factor if from_ptr else part,
            table.ints, table.floats, table.slot_node, table.slot_inv_t, part, aux, lse,
            B, C, E, M, S, NT, 1.0 / B, STACKED=stacked, FACTOR_FROM_PTR=from_ptr, ROWS=rows_per,
            BLOCK_C=block_c, M_P2=triton.next_power_of_2(M), S_P2=triton.next_power_of_2(S),
            NT_P2=triton.next_power_of_2(NT), num_warps=warps)
        ctx.save_for_backward(labels, aux, lse, *logits)
        ctx.table = table
        gates = aux[0]
        ctx.mark_non_differentiable(gates)
        return part.sum(0) if programs > 1 else part[0], gates

    @staticmethod
    def backward(ctx, grad_l, _grad_gates):
        labels, aux, lse, *logits = ctx.saved_tensors
        table = ctx.table
        B, C = logits[0].shape
        G = len(table.grad_nodes)
        grads = [None] * len(logits)
        if G == 0:
            return None, None, None, *grads
        rows_per, block_c, warps = _blocks(B, C, labels.is_cuda)
        base, offsets, node_stride, stacked = _link(logits)
        out = torch.empty(G, B, C, device=labels.device, dtype=logits[0].dtype)
        _edge_loss_bwd[(triton.cdiv(B, rows_per), G)](
            base, node_stride, *offsets, labels, grad_l.float().contiguous(), table.ints, table.floats, table.grads,
            aux, lse, out, B, C, table.n_edges, G, 1.0 / B, STACKED=stacked, ROWS=rows_per, BLOCK_C=block_c,
            num_warps=warps)
        for g, n in enumerate(table.grad_nodes):
            grads[n] = out[g]
        return None, None, None, *grads
