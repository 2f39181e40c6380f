"""The edge-loss matrix: every edge's gated per-sample loss, summed into each target's L_t, in one
launch; the gradient w.r.t. every trained endpoint's logits in one more.

The logits are read in place: the kernels get the first endpoint's pointer and every other
endpoint's element offset from it (up to MAX_LINKED endpoints; more are stacked into one buffer
first), so no copy of the logits is made on the way in or out.

Forward, per block of rows: each endpoint's first arg-max, log-sum-exp, and the log-sum-exp over the
classes other than the label (DKD's), plus mean and std where a standardized edge reads it (online
over blocks of classes); then both log-sum-exps of every other softmax slot the tempered edges (kl,
dkd, dist) need, a slot being (endpoint, T, standardized): each softmax is computed once per row and
shared by all edges. Then each edge reads its two rows again (from cache) and sums its terms in one
pass over the classes. The log-sum-exps, moments, gates and the terms' per-row factors (cos's norms,
dist's coefficients, the standardize chain's ρ) are saved, so the backward is a single pass: one
program per (block of rows, trained endpoint), summing the gradients of the edges into it in
registers and storing them once.

exp and log are libdevice's and sqrt the correctly rounded one (see `rows`).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import edge_table as et
from .rows import (dist_block, dist_coefficients, dkd_block, exp, gate_weight, kl_block, load_rows, offset, pick,
                   row_stats, slot_lse, tckd)

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

_CE, _KL, _COS, _MSE, _DKD, _DIST, _STD = (tl.constexpr(b) for b in (et.CE, et.KL, et.COS, et.MSE, et.DKD, et.DIST,
                                                                     et.STD))
_TEMPERED = tl.constexpr(et.TEMPERED)
_SRC, _DST, _KIND, _GATE, _SSLOT, _DSLOT, _TSLOT, _TGT = (tl.constexpr(r) for r in range(8))
_INV_T, _DINV_T, _KL_SCALE, _WEIGHT, _GATE_ARG, _ALPHA, _BETA, _TEMP = (tl.constexpr(r) for r in range(8))
# Rows of the saved per-edge values [AUX, E, B]: gate, cos's 1/(|p_s||p_t|) and cos/|p_t|², the std
# chain's ρ, dist's 1/D, φ and Σ p_t g (see `rows.dist_coefficients`).
_GATE_W, _COS_A, _COS_B, _RHO, _DIST_1, _DIST_PHI, _DIST_3 = (tl.constexpr(r) for r in range(7))
AUX = 7
STANDARDIZE_EPS = tl.constexpr(1e-7)  # ktfast.losses.STANDARDIZE_EPS


@triton.jit
def _row_scalars(ints, E, e, lse_tiles, lse_o_tiles, slot_ids, means, inv_ss, node_ids, KINDS: tl.constexpr):
    """An edge's slots' log-sum-exps per row [ROWS], and the (shift, scale) that give the logits its
    tempered terms see, w = (z - shift) · scale: (mean, 1/(ε + std)) where standardized, else (0, 1)."""
    src = tl.maximum(tl.load(ints + _SRC * E + e), 0)
    dst = tl.load(ints + _DST * E + e)
    sslot = tl.load(ints + _SSLOT * E + e)
    tslot = tl.load(ints + _TSLOT * E + e)
    std = (tl.load(ints + _KIND * E + e) & (_STD & KINDS)) != 0
    sb = tl.where(std, pick(means, node_ids, src), 0.0)
    sc = tl.where(std, pick(inv_ss, node_ids, src), 1.0)
    tb = tl.where(std, pick(means, node_ids, dst), 0.0)
    tc = tl.where(std, pick(inv_ss, node_ids, dst), 1.0)
    return (pick(lse_tiles, slot_ids, sslot), pick(lse_tiles, slot_ids, tl.load(ints + _DSLOT * E + e)),
            pick(lse_tiles, slot_ids, tslot), pick(lse_o_tiles, slot_ids, sslot), pick(lse_o_tiles, slot_ids, tslot),
            sb, sc, tb, tc)


@triton.jit(do_not_specialize=ENDPOINT_OFFSETS)
def _edge_loss_fwd(z, node_stride, ep_off1: tl.int64, ep_off2: tl.int64, ep_off3: tl.int64, ep_off4: tl.int64,
                   ep_off5: tl.int64, ep_off6: tl.int64, ep_off7: tl.int64, ep_off8: tl.int64, ep_off9: tl.int64,
                   ep_off10: tl.int64, ep_off11: tl.int64, ep_off12: tl.int64, ep_off13: tl.int64, ep_off14: tl.int64,
                   ep_off15: tl.int64,
                   y_ptr, factor, factor_ptr, ints, floats, slot_node, slot_inv_t, slot_std, node_std, part_ptr,
                   count_ptr, out_ptr, aux_ptr, lse_ptr, mom_ptr, B, C, E, M, S, NT, inv_b,
                   STACKED: tl.constexpr, FACTOR_FROM_PTR: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_C: tl.constexpr, M_P2: tl.constexpr, S_P2: tl.constexpr, NT_P2: tl.constexpr,
                   P_BLOCK: tl.constexpr, KINDS: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """out[:NT] = every target's L_t, out[NT] = their sum. ONE_BLOCK (BLOCK_C >= C, small tiles: see
    edge_loss_fn._one_block) makes the loop over blocks of classes straight code."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    row_off = rows.to(tl.int64) * C
    cols = tl.arange(0, BLOCK_C)
    y = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int32)
    if FACTOR_FROM_PTR:
        factor = tl.load(factor_ptr).to(tl.float32)

    # Every endpoint's statistics, then the slots' log-sum-exps: [endpoint or slot, row] tiles.
    node_ids = tl.arange(0, M_P2)
    slot_ids = tl.arange(0, S_P2)
    args = tl.zeros([M_P2, ROWS], tl.int32)
    mos = tl.zeros([M_P2, ROWS], tl.float32)  # the max over the classes other than the label
    means = tl.zeros([M_P2, ROWS], tl.float32)
    inv_ss = tl.zeros([M_P2, ROWS], tl.float32)  # 1 / (ε + std)
    rho_ss = tl.zeros([M_P2, ROWS], tl.float32)  # (ε + std) / ((C - 1) std), 0 where std = 0
    lses = tl.zeros([S_P2, ROWS], tl.float32)
    lse_os = tl.zeros([S_P2, ROWS], tl.float32)  # over the classes other than the label
    for n in range(M):
        ptr = z + offset(n, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8,
                         ep_off9, ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED)
        moments = tl.load(node_std + n) & ((_STD & KINDS) // _STD)  # a constant 0 where no edge standardizes
        arg, mo, lse, lse_o, mean, m2 = row_stats(ptr, row_off, rmask, y, C, moments, ROWS, BLOCK_C)
        var = m2 / (C - 1)
        sd = tl.where(var > 0.0, tl.sqrt_rn(tl.where(var > 0.0, var, 1.0)), 0.0)
        s = STANDARDIZE_EPS + sd
        here = node_ids[:, None] == n
        args = tl.where(here, arg[None, :], args)
        mos = tl.where(here, mo[None, :], mos)
        means = tl.where(here, mean[None, :], means)
        inv_ss = tl.where(here, (1.0 / s)[None, :], inv_ss)
        rho_ss = tl.where(here, tl.where(sd > 0.0, s / ((C - 1) * tl.where(sd > 0.0, sd, 1.0)), 0.0)[None, :], rho_ss)
        lses = tl.where(slot_ids[:, None] == n, lse[None, :], lses)
        lse_os = tl.where(slot_ids[:, None] == n, lse_o[None, :], lse_os)
    for k in range(M, S):
        n = tl.load(slot_node + k)
        ptr = z + offset(n, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8,
                         ep_off9, ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED)
        standardized = (tl.load(slot_std + k) & ((_STD & KINDS) // _STD)) != 0
        shift = tl.where(standardized, pick(means, node_ids, n), 0.0)
        scale = tl.load(slot_inv_t + k) * tl.where(standardized, pick(inv_ss, node_ids, n), 1.0)
        lse, lse_o = slot_lse(ptr, row_off, rmask, y, pick(mos, node_ids, n), shift, scale, C, ROWS, BLOCK_C)
        lses = tl.where(slot_ids[:, None] == k, lse[None, :], lses)
        lse_os = tl.where(slot_ids[:, None] == k, lse_o[None, :], lse_os)
    smask = (slot_ids[:, None] < S) & rmask[None, :]
    tl.store(lse_ptr + slot_ids[:, None] * B + rows[None, :], lses, mask=smask)
    tl.store(lse_ptr + (S + slot_ids[:, None]) * B + rows[None, :], lse_os, mask=smask)
    nmask = (node_ids[:, None] < M) & rmask[None, :]
    tl.store(mom_ptr + node_ids[:, None] * B + rows[None, :], means, mask=nmask)
    tl.store(mom_ptr + (M + node_ids[:, None]) * B + rows[None, :], inv_ss, mask=nmask)

    target_ids = tl.arange(0, NT_P2)
    part = tl.zeros([NT_P2], tl.float32)
    for e in range(E):
        src = tl.load(ints + _SRC * E + e)
        dst = tl.load(ints + _DST * E + e)
        kind = tl.load(ints + _KIND * E + e) & KINDS  # bits no edge has fold to 0: their code is dropped
        std = kind & _STD
        inv_t = tl.load(floats + _INV_T * E + e)
        inv_tt = tl.load(floats + _DINV_T * E + e)
        temp = tl.load(floats + _TEMP * E + e)
        sp = z + offset(tl.maximum(src, 0), node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6,
                        ep_off7, ep_off8, ep_off9, ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED)
        tp = z + offset(dst, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8,
                        ep_off9, ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED)
        lse_s1 = pick(lses, slot_ids, src)
        lse_t1 = pick(lses, slot_ids, dst)
        lse_st, lse_tt, lse_t2, lse_o_s, lse_o_t, sb, sc, tb, tc = _row_scalars(
            ints, E, e, lses, lse_os, slot_ids, means, inv_ss, node_ids, KINDS)

        loss = tl.zeros([ROWS], tl.float32)
        if (kind & _CE) != 0:  # -log p_t[y]
            loss += lse_t1 - tl.load(tp + row_off + y, mask=rmask, other=0.0).to(tl.float32)
        kl = tl.zeros([ROWS], tl.float32)
        hw = tl.zeros([ROWS], tl.float32)  # Σ_j h_j wt_j of the standardized terms
        nckd = tl.zeros([ROWS], tl.float32)
        ab = tl.zeros([ROWS], tl.float32)
        aa = tl.zeros([ROWS], tl.float32)
        bb = tl.zeros([ROWS], tl.float32)
        paw = tl.zeros([ROWS], tl.float32)
        pbw = tl.zeros([ROWS], tl.float32)
        pw = tl.zeros([ROWS], tl.float32)
        dot = tl.zeros([ROWS], tl.float32)
        ss = tl.zeros([ROWS], tl.float32)
        tt = tl.zeros([ROWS], tl.float32)
        sq = tl.zeros([ROWS], tl.float32)
        ks = tl.load(floats + _KL_SCALE * E + e)
        tckd_h = tl.zeros([ROWS], tl.float32)
        if (kind & _DKD) != 0:  # the factor of q_t in DKD's h, from b = 1 - p_y = exp(lse_other - lse)
            tckd_h = temp * tl.load(floats + _ALPHA * E + e) * (exp(lse_o_t - lse_t2) - exp(lse_o_s - lse_st))
        if (kind & (_TEMPERED | _COS | _MSE)) != 0:
            for c0 in range(0, BLOCK_C if ONE_BLOCK else C, BLOCK_C):
                cc = c0 + cols
                valid = rmask[:, None] & (cc < C)[None, :]
                zs = load_rows(sp, row_off, rmask, cc, C)
                zt = load_rows(tp, row_off, rmask, cc, C)
                ws = (zs - sb[:, None]) * sc[:, None]
                wt = (zt - tb[:, None]) * tc[:, None]
                if (kind & _KL) != 0:
                    kl, hw = kl_block(ws, wt, valid, inv_t, inv_tt, lse_st, lse_tt, ks * inv_tt, kl, hw, std,
                                      (_STD & KINDS) != 0)
                if (kind & _DKD) != 0:
                    is_y = (cc[None, :] == y[:, None]).to(tl.int32)
                    nckd, hw = dkd_block(ws, wt, valid, is_y, inv_t, lse_o_s, lse_o_t, tckd_h,
                                         temp * tl.load(floats + _BETA * E + e), nckd, hw, std)
                if (kind & _DIST) != 0:
                    ab, aa, bb, paw, pbw, pw = dist_block(ws, wt, valid, inv_t, lse_st, lse_t2, 1.0 / C, ab, aa, bb,
                                                          paw, pbw, pw, std)
                if (kind & _COS) != 0:
                    ps = tl.where(valid, exp(zs - lse_s1[:, None]), 0.0)
                    pt = tl.where(valid, exp(zt - lse_t1[:, None]), 0.0)
                    dot += tl.sum(ps * pt, axis=1)
                    ss += tl.sum(ps * ps, axis=1)
                    tt += tl.sum(pt * pt, axis=1)
                if (kind & _MSE) != 0:
                    d = zt - zs
                    sq += tl.sum(d * d, axis=1)
        loss += kl * ks + sq / C
        t2 = temp * temp
        if (kind & _DKD) != 0:
            xsy = (tl.load(sp + row_off + y, mask=rmask, other=0.0).to(tl.float32) - sb) * sc * inv_t
            xty = (tl.load(tp + row_off + y, mask=rmask, other=0.0).to(tl.float32) - tb) * tc * inv_t
            loss += t2 * (tl.load(floats + _ALPHA * E + e) * tckd(xsy, xty, lse_st, lse_o_s, lse_t2, lse_o_t)
                          + tl.load(floats + _BETA * E + e) * nckd)
        if (kind & _DIST) != 0:
            corr, c1, phi, c3 = dist_coefficients(ab, aa, bb)
            loss += t2 * (1.0 - corr)
            hw -= temp * (c1 * paw - phi * pbw - c3 * pw)
            tl.store(aux_ptr + (_DIST_1 * E + e) * B + rows, c1, mask=rmask)
            tl.store(aux_ptr + (_DIST_PHI * E + e) * B + rows, phi, mask=rmask)
            tl.store(aux_ptr + (_DIST_3 * E + e) * B + rows, c3, mask=rmask)
        if std != 0:
            tl.store(aux_ptr + (_RHO * E + e) * B + rows, hw * pick(rho_ss, node_ids, dst), mask=rmask)
        if (kind & _COS) != 0:
            norms = tl.where(rmask, tl.sqrt_rn(ss) * tl.sqrt_rn(tt), 1.0)  # rows past B: no 0 / 0
            tt = tl.where(rmask, tt, 1.0)
            cos = dot / norms
            loss += cos
            # The backward's d cos / d p_t = p_s / (|p_s||p_t|) - cos · p_t / |p_t|²
            tl.store(aux_ptr + (_COS_A * E + e) * B + rows, 1.0 / norms, mask=rmask)
            tl.store(aux_ptr + (_COS_B * E + e) * B + rows, cos / tt, mask=rmask)

        correct = (pick(args, node_ids, src) == y) | (src < 0)  # the label is always right
        gate = gate_weight(tl.load(ints + _GATE * E + e), factor, tl.load(floats + _GATE_ARG * E + e), correct)
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


@triton.jit
def _tempered_grad(zs, wt, cc, y, valid, lse_ptr, aux_ptr, ints, floats, E, e, B, S, C, rows, rmask, kind, sb, sc):
    """h = d (the edge's tempered terms) / d wt for a block of classes, wt the target's logits as those
    terms see them. The target's tempered softmax is recomputed for every edge rather than cached
    across edges: the cache's branch made ptxas spill on sm_80 (benchmarks/compile_kernels.py), and
    the exps are far from the memory-bound kernel's limit."""
    inv_t = tl.load(floats + _INV_T * E + e)
    temp = tl.load(floats + _TEMP * E + e)
    sslot = tl.load(ints + _SSLOT * E + e)
    tslot = tl.load(ints + _TSLOT * E + e)
    lse_st = tl.load(lse_ptr + sslot * B + rows, mask=rmask, other=0.0)
    lse_t2 = tl.load(lse_ptr + tslot * B + rows, mask=rmask, other=0.0)
    xs = (zs - sb[:, None]) * (sc * inv_t)[:, None]
    h = tl.zeros_like(wt)
    if (kind & _KL) != 0:  # scale · KL has gradient scale / T_t · (p_t - p_s), p_t at T_t
        inv_tt = tl.load(floats + _DINV_T * E + e)
        dslot = tl.load(ints + _DSLOT * E + e)
        lse_tt = tl.load(lse_ptr + dslot * B + rows, mask=rmask, other=0.0)
        h += (tl.load(floats + _KL_SCALE * E + e) * inv_tt) * (exp(wt * inv_tt - lse_tt[:, None])
                                                                - exp(xs - lse_st[:, None]))
    if (kind & _DKD) != 0:  # T·α·(b_t - b_s)·q_t + T·β·(q_t - q_s) off y, T·α·(b_s - b_t) at y
        lse_os = tl.load(lse_ptr + (S + sslot) * B + rows, mask=rmask, other=0.0)
        lse_ot = tl.load(lse_ptr + (S + tslot) * B + rows, mask=rmask, other=0.0)
        tc = temp * tl.load(floats + _ALPHA * E + e) * (exp(lse_ot - lse_t2) - exp(lse_os - lse_st))
        is_y = cc[None, :] == y[:, None]
        qs = tl.where(is_y, 0.0, exp(xs - lse_os[:, None]))
        qt = tl.where(is_y, 0.0, exp(wt * inv_t - lse_ot[:, None]))
        h += tc[:, None] * qt + (temp * tl.load(floats + _BETA * E + e)) * (qt - qs) - tl.where(is_y, tc[:, None], 0.0)
    if (kind & _DIST) != 0:  # -T p_t (a / D - φ b - Σ p_t g), a = p_s - 1/C, b = p_t - 1/C
        pt = exp(wt * inv_t - lse_t2[:, None])
        c1 = tl.load(aux_ptr + (_DIST_1 * E + e) * B + rows, mask=rmask, other=0.0)
        phi = tl.load(aux_ptr + (_DIST_PHI * E + e) * B + rows, mask=rmask, other=0.0)
        c3 = tl.load(aux_ptr + (_DIST_3 * E + e) * B + rows, mask=rmask, other=0.0)
        g = c1[:, None] * (exp(xs - lse_st[:, None]) - 1.0 / C) - phi[:, None] * (pt - 1.0 / C) - c3[:, None]
        h -= temp * pt * g
    return tl.where(valid, h, 0.0)


@triton.jit(do_not_specialize=ENDPOINT_OFFSETS)
def _edge_loss_bwd(z, node_stride, ep_off1: tl.int64, ep_off2: tl.int64, ep_off3: tl.int64, ep_off4: tl.int64,
                   ep_off5: tl.int64, ep_off6: tl.int64, ep_off7: tl.int64, ep_off8: tl.int64, ep_off9: tl.int64,
                   ep_off10: tl.int64, ep_off11: tl.int64, ep_off12: tl.int64, ep_off13: tl.int64, ep_off14: tl.int64,
                   ep_off15: tl.int64,
                   y_ptr, grad_l, grad_total, ints, floats, grads, aux_ptr, lse_ptr, mom_ptr, out_ptr, B, C, E, G, M,
                   S, inv_b, STACKED: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                   HAS_GRAD_L: tl.constexpr, HAS_GRAD_TOTAL: tl.constexpr, KINDS: tl.constexpr,
                   ONE_BLOCK: tl.constexpr):
    """out[g] = Σ_{edges e into node g} dL/dL_t · weight / B · gate · d loss_e / d z_g, where
    dL/dL_t = grad_l[t] + grad_total (either may be absent: the step back-propagates the total).

    A standardized edge's tempered terms see w = (z - mean) / s, s = ε + std; with h = d loss / d w,
    d loss / d z = (h - mean(h) - ρ w) / s, ρ = Σ h w · s / ((C - 1) std) (the forward's, 0 where
    std = 0: the std's own gradient is taken as 0 there, as the reference does). mean(h) is 0: the
    terms are functions of softmax(w / T), which a shift of w leaves alone."""
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
    mean_t = tl.load(mom_ptr + n * B + rows, mask=rmask, other=0.0)
    inv_s_t = tl.load(mom_ptr + (M + n) * B + rows, mask=rmask, other=0.0)
    for c0 in range(0, BLOCK_C if ONE_BLOCK else C, BLOCK_C):  # ONE_BLOCK: see _edge_loss_fwd
        cc = c0 + cols
        valid = rmask[:, None] & (cc < C)[None, :]
        zt = load_rows(tp, row_off, rmask, cc, C)
        pt = exp(zt - lse_t1[:, None])
        std_t = (zt - mean_t[:, None]) * inv_s_t[:, None]
        acc = tl.zeros([ROWS, BLOCK_C], tl.float32)
        for e in range(first, last):
            src = tl.load(ints + _SRC * E + e)
            kind = tl.load(ints + _KIND * E + e) & KINDS  # bits no edge has fold to 0: their code is dropped
            d_target = 0.0
            if HAS_GRAD_L:
                d_target += tl.load(grad_l + tl.load(ints + _TGT * E + e)).to(tl.float32)
            if HAS_GRAD_TOTAL:
                d_target += tl.load(grad_total).to(tl.float32)
            scale = (d_target * tl.load(floats + _WEIGHT * E + e) * inv_b
                     * tl.load(aux_ptr + e * B + rows, mask=rmask, other=0.0))
            if (kind & _CE) != 0:
                acc += scale[:, None] * (pt - tl.where(cc[None, :] == y[:, None], 1.0, 0.0))
            if (kind & (_TEMPERED | _COS | _MSE)) != 0:
                sp = z + offset(src, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7,
                                ep_off8, ep_off9, ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED)
                zs = load_rows(sp, row_off, rmask, cc, C)
                if (kind & _TEMPERED) != 0:
                    # One call for raw and standardized edges, the two chosen by selects: two inlined
                    # copies in branches made ptxas spill (benchmarks/compile_kernels.py).
                    is_std = (kind & _STD) != 0
                    sb = tl.where(is_std, tl.load(mom_ptr + src * B + rows, mask=rmask, other=0.0), 0.0)
                    sc = tl.where(is_std, tl.load(mom_ptr + (M + src) * B + rows, mask=rmask, other=0.0), 1.0)
                    h = _tempered_grad(zs, tl.where(is_std, std_t, zt), cc, y, valid, lse_ptr, aux_ptr, ints, floats,
                                       E, e, B, S, C, rows, rmask, kind, sb, sc)
                    # d/dz of a standardized edge's terms: (h - ρ w) / s (see the docstring); of a raw one: h
                    rho = tl.where(is_std, tl.load(aux_ptr + (_RHO * E + e) * B + rows, mask=rmask, other=0.0), 0.0)
                    acc += (scale * tl.where(is_std, inv_s_t, 1.0))[:, None] * (h - rho[:, None] * std_t)
                if (kind & _COS) != 0:
                    ps = exp(zs - tl.load(lse_ptr + src * B + rows, mask=rmask, other=0.0)[:, None])
                    a = tl.load(aux_ptr + (_COS_A * E + e) * B + rows, mask=rmask, other=0.0)
                    b = tl.load(aux_ptr + (_COS_B * E + e) * B + rows, mask=rmask, other=0.0)
                    acc += scale[:, None] * pt * (ps * a[:, None] - pt * b[:, None])
                if (kind & _MSE) != 0:
                    acc += (scale * (2.0 / C))[:, None] * (zt - zs)
        tl.store(out + row_off[:, None] + cc[None, :], acc.to(out_ptr.dtype.element_ty), mask=valid)
