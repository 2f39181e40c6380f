"""Each loss kind's share of the edge-loss kernels (`edge_losses`): an edge's per-sample loss, the sum
of its terms in one pass over the classes (`edge_loss_rows`), and its gradient w.r.t. the target's
logits for a block of classes (`edge_grad`). A term is a branch on its kind's code (`ktfast.graph.loss_kinds`,
through `edge_table`); its sums over a block of classes are `rows`'s *_block functions.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import edge_table as et
from .rows import (
    cos_block,
    dist_block,
    dist_coefficients,
    dkd_block,
    exp,
    kl_block,
    load_rows,
    mse_block,
    offset,
    pick,
    tckd,
)

_CE, _KL, _COS, _MSE, _DKD, _DIST, _STD = (tl.constexpr(b) for b in (et.CE, et.KL, et.COS, et.MSE, et.DKD, et.DIST,
                                                                     et.STD))
_TEMPERED = tl.constexpr(et.TEMPERED)
_SRC, _DST, _KIND, _GATE, _SSLOT, _DSLOT, _TSLOT, _TGT = (tl.constexpr(r) for r in range(8))
_INV_T, _DINV_T, _KL_SCALE, _WEIGHT, _GATE_ARG, _ALPHA, _BETA, _TEMP = (tl.constexpr(r) for r in range(8))
# Rows of the saved per-edge values [AUX, E, B]: gate, cos's 1/(|p_s||p_t|) and cos/|p_t|², the std
# chain's ρ, dist's 1/D, φ and Σ p_t g (see `rows.dist_coefficients`).
_GATE_W, _COS_A, _COS_B, _RHO, _DIST_1, _DIST_PHI, _DIST_3 = (tl.constexpr(r) for r in range(7))
AUX = 7


@triton.jit
def row_scalars(ints, E, e, lse_tiles, lse_o_tiles, slot_ids, means, inv_ss, node_ids, KINDS: tl.constexpr):
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


@triton.jit
def edge_loss_rows(z, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8, ep_off9,
                   ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, src, dst, e, y, rows, rmask, row_off,
                   ints, floats, aux_ptr, lses, lse_os, slot_ids, means, inv_ss, rho_ss, node_ids, B, C, E,
                   STACKED: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, KINDS: tl.constexpr,
                   ONE_BLOCK: tl.constexpr):
    """Edge e's ungated per-sample loss [ROWS]: the sum of its terms (one function each below, chosen by
    the kinds' codes), their sums over the classes taken in one pass; the per-row factors the backward
    needs go to aux. The edge finds its logits (sp, tp) itself, after reading its kind and 1/T: given
    them by the kernel, ptxas spilled on sm_90 (benchmarks/compile_kernels.py)."""
    kind = tl.load(ints + _KIND * E + e) & KINDS  # bits no edge has fold to 0: their code is dropped
    std = kind & _STD
    inv_t = tl.load(floats + _INV_T * E + e)
    inv_tt = tl.load(floats + _DINV_T * E + e)
    temp = tl.load(floats + _TEMP * E + e)
    sp = z + offset(tl.maximum(src, 0), node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7,
                    ep_off8, ep_off9, ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED)
    tp = z + offset(dst, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8, ep_off9,
                    ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED)
    lse_s1 = pick(lses, slot_ids, src)
    lse_t1 = pick(lses, slot_ids, dst)
    lse_st, lse_tt, lse_t2, lse_o_s, lse_o_t, sb, sc, tb, tc = row_scalars(
        ints, E, e, lses, lse_os, slot_ids, means, inv_ss, node_ids, KINDS)
    # ce before the class sums, as its value is at hand: after them, ptxas spilled at one row of 1000
    # classes (benchmarks/compile_kernels.py).
    loss = tl.zeros([ROWS], tl.float32)
    if (kind & _CE) != 0:  # -log p_t[y]
        loss += lse_t1 - tl.load(tp + row_off + y, mask=rmask, other=0.0).to(tl.float32)
    ks = tl.load(floats + _KL_SCALE * E + e)
    tckd_h = tl.zeros([ROWS], tl.float32)
    if (kind & _DKD) != 0:  # the factor of q_t in DKD's h, from b = 1 - p_y = exp(lse_other - lse)
        tckd_h = temp * tl.load(floats + _ALPHA * E + e) * (exp(lse_o_t - lse_t2) - exp(lse_o_s - lse_st))
    kl, hw, nckd, ab, aa, bb, paw, pbw, pw, dot, ss, tt, sq = _class_sums(
        sp, tp, y, rmask, row_off, floats, e, E, C, kind, std, inv_t, inv_tt, temp, lse_s1, lse_t1, lse_st, lse_tt,
        lse_t2, lse_o_s, lse_o_t, sb, sc, tb, tc, ks, tckd_h, ROWS, BLOCK_C, KINDS, ONE_BLOCK)
    loss += kl * ks + sq / C  # KL (its T² or 1 in ks) and MSE
    if (kind & _DKD) != 0:
        loss += _dkd_rows(sp, tp, y, rmask, row_off, floats, e, E, inv_t, temp, nckd, lse_st, lse_t2, lse_o_s, lse_o_t,
                          sb, sc, tb, tc)
    if (kind & _DIST) != 0:
        dist, hw = _dist_rows(ab, aa, bb, paw, pbw, pw, hw, temp, aux_ptr, e, E, B, rows, rmask)
        loss += dist
    if std != 0:
        tl.store(aux_ptr + (_RHO * E + e) * B + rows, hw * pick(rho_ss, node_ids, dst), mask=rmask)
    if (kind & _COS) != 0:
        loss += _cos_rows(dot, ss, tt, aux_ptr, e, E, B, rows, rmask)
    return loss


@triton.jit
def _class_sums(sp, tp, y, rmask, row_off, floats, e, E, C, kind, std, inv_t, inv_tt, temp, lse_s1, lse_t1, lse_st,
                lse_tt, lse_t2, lse_o_s, lse_o_t, sb, sc, tb, tc, ks, tckd_h, ROWS: tl.constexpr,
                BLOCK_C: tl.constexpr, KINDS: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Each of the edge's terms' sums over the classes, in one pass over blocks of them (`rows`'s
    *_block): KL, Σ h·wt of the standardized terms, NCKD, dist's six sums, cos's three, MSE's."""
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
    if (kind & (_TEMPERED | _COS | _MSE)) != 0:
        cols = tl.arange(0, BLOCK_C)
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
                dot, ss, tt = cos_block(zs, zt, valid, lse_s1, lse_t1, dot, ss, tt)
            if (kind & _MSE) != 0:
                sq = mse_block(zs, zt, sq)
    return kl, hw, nckd, ab, aa, bb, paw, pbw, pw, dot, ss, tt, sq


@triton.jit
def _dkd_rows(sp, tp, y, rmask, row_off, floats, e, E, inv_t, temp, nckd, lse_st, lse_t2, lse_o_s, lse_o_t, sb, sc, tb,
              tc):
    """DKD per row: T² (α TCKD + β NCKD), TCKD from the label's logits, NCKD summed over the classes."""
    xsy = (tl.load(sp + row_off + y, mask=rmask, other=0.0).to(tl.float32) - sb) * sc * inv_t
    xty = (tl.load(tp + row_off + y, mask=rmask, other=0.0).to(tl.float32) - tb) * tc * inv_t
    return (temp * temp) * (tl.load(floats + _ALPHA * E + e) * tckd(xsy, xty, lse_st, lse_o_s, lse_t2, lse_o_t)
                            + tl.load(floats + _BETA * E + e) * nckd)


@triton.jit
def _dist_rows(ab, aa, bb, paw, pbw, pw, hw, temp, aux_ptr, e, E, B, rows, rmask):
    """DIST per row, T² (1 - corr), and hw with its Σ h·wt added; saves its coefficients for the backward."""
    corr, c1, phi, c3 = dist_coefficients(ab, aa, bb)
    hw -= temp * (c1 * paw - phi * pbw - c3 * pw)
    tl.store(aux_ptr + (_DIST_1 * E + e) * B + rows, c1, mask=rmask)
    tl.store(aux_ptr + (_DIST_PHI * E + e) * B + rows, phi, mask=rmask)
    tl.store(aux_ptr + (_DIST_3 * E + e) * B + rows, c3, mask=rmask)
    return (temp * temp) * (1.0 - corr), hw


@triton.jit
def _cos_rows(dot, ss, tt, aux_ptr, e, E, B, rows, rmask):
    """cos per row, Σ p_s p_t / (|p_s||p_t|); saves the backward's factors of
    d cos / d p_t = p_s / (|p_s||p_t|) - cos · p_t / |p_t|²."""
    norms = tl.where(rmask, tl.sqrt_rn(ss) * tl.sqrt_rn(tt), 1.0)  # rows past B: no 0 / 0
    tt = tl.where(rmask, tt, 1.0)
    cos = dot / norms
    tl.store(aux_ptr + (_COS_A * E + e) * B + rows, 1.0 / norms, mask=rmask)
    tl.store(aux_ptr + (_COS_B * E + e) * B + rows, cos / tt, mask=rmask)
    return cos


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


@triton.jit
def edge_grad(acc, z, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8, ep_off9,
              ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, e, zt, pt, std_t, inv_s_t, cc, y, valid, rows,
              rmask, row_off, grad_l, grad_total, ints, floats, aux_ptr, lse_ptr, mom_ptr, B, C, E, M, S, inv_b,
              STACKED: tl.constexpr, HAS_GRAD_L: tl.constexpr, HAS_GRAD_TOTAL: tl.constexpr, KINDS: tl.constexpr):
    """acc plus edge e's dL/dL_t · weight / B · gate · d loss_e / d z_t for a block of classes: each
    term's gradient (one branch each, chosen by the kinds' codes). zt: the target's logits, pt their
    softmax, std_t them standardized; the source's are read (through `rows.offset`) only where a term
    needs them: computed for every edge, their address took 13 more registers at 10 classes."""
    src = tl.load(ints + _SRC * E + e)
    kind = tl.load(ints + _KIND * E + e) & KINDS  # bits no edge has fold to 0: their code is dropped
    d_target = 0.0
    if HAS_GRAD_L:
        d_target += tl.load(grad_l + tl.load(ints + _TGT * E + e)).to(tl.float32)
    if HAS_GRAD_TOTAL:
        d_target += tl.load(grad_total).to(tl.float32)
    scale = (d_target * tl.load(floats + _WEIGHT * E + e) * inv_b
             * tl.load(aux_ptr + e * B + rows, mask=rmask, other=0.0))
    if (kind & _CE) != 0:  # p_t - onehot(y)
        acc += scale[:, None] * (pt - tl.where(cc[None, :] == y[:, None], 1.0, 0.0))
    if (kind & (_TEMPERED | _COS | _MSE)) != 0:
        sp = z + offset(src, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8,
                        ep_off9, ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED)
        zs = load_rows(sp, row_off, rmask, cc, C)
        if (kind & _TEMPERED) != 0:
            # One call for raw and standardized edges, the two chosen by selects: two inlined
            # copies in branches made ptxas spill (benchmarks/compile_kernels.py).
            is_std = (kind & _STD) != 0
            sb = tl.where(is_std, tl.load(mom_ptr + src * B + rows, mask=rmask, other=0.0), 0.0)
            sc = tl.where(is_std, tl.load(mom_ptr + (M + src) * B + rows, mask=rmask, other=0.0), 1.0)
            h = _tempered_grad(zs, tl.where(is_std, std_t, zt), cc, y, valid, lse_ptr, aux_ptr, ints, floats,
                               E, e, B, S, C, rows, rmask, kind, sb, sc)
            # d/dz of a standardized edge's terms: (h - ρ w) / s (see _edge_loss_bwd); of a raw one: h
            rho = tl.where(is_std, tl.load(aux_ptr + (_RHO * E + e) * B + rows, mask=rmask, other=0.0), 0.0)
            acc += (scale * tl.where(is_std, inv_s_t, 1.0))[:, None] * (h - rho[:, None] * std_t)
        if (kind & _COS) != 0:  # p_t (p_s a - p_t b), a and b the forward's (`_cos_rows`)
            ps = exp(zs - tl.load(lse_ptr + src * B + rows, mask=rmask, other=0.0)[:, None])
            a = tl.load(aux_ptr + (_COS_A * E + e) * B + rows, mask=rmask, other=0.0)
            b = tl.load(aux_ptr + (_COS_B * E + e) * B + rows, mask=rmask, other=0.0)
            acc += scale[:, None] * pt * (ps * a[:, None] - pt * b[:, None])
        if (kind & _MSE) != 0:  # 2 (z_t - z_s) / C
            acc += (scale * (2.0 / C))[:, None] * (zt - zs)
    return acc
