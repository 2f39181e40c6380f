"""Per-row building blocks of the edge-loss kernels (`edge_losses`), as Triton device functions:
exp and log, the address of an endpoint's logits, a block of logits, each row's arg-max, log-sum-exps
and moments (online over blocks of classes), a slot's log-sum-exps, a gate's weight, and each
tempered loss term's share of a block of classes.

exp and log are libdevice's (within 2 ulp), not `tl.exp`/`tl.log`'s ex2/lg2.approx: T² · KL at
T = 10 magnifies their error past 1e-5 of the reference's value.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

from ktfast.graph.gates import GATES

# The interpreter has no libdevice (and its numpy exp and log are exact anyway).
_LIBDEVICE = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")
DIST_EPS = tl.constexpr(1e-8)  # ktfast.losses.DIST_EPS
# The gates' codes (`ktfast.graph.gates`): `gate_weight` has a branch for each.
_THROUGH, _LINEAR, _CORRECT, _NEGATIVE_LINEAR, _GAMMA, _NEGATIVE_GAMMA, _WARMUP = (
    tl.constexpr(GATES[g].code) for g in ("through", "linear", "correct", "negative_linear", "gamma", "negative_gamma",
                                          "warmup"))


@triton.jit
def exp(x):
    if _LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def log(x):
    if _LIBDEVICE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def offset(n, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8, ep_off9, ep_off10,
           ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, STACKED: tl.constexpr):
    """Element offset of endpoint n's logits from endpoint 0's."""
    if STACKED:
        return tl.cast(n, tl.int64) * node_stride
    return (tl.where(n == 1, ep_off1, 0) + tl.where(n == 2, ep_off2, 0) + tl.where(n == 3, ep_off3, 0)
            + tl.where(n == 4, ep_off4, 0) + tl.where(n == 5, ep_off5, 0) + tl.where(n == 6, ep_off6, 0)
            + tl.where(n == 7, ep_off7, 0) + tl.where(n == 8, ep_off8, 0) + tl.where(n == 9, ep_off9, 0)
            + tl.where(n == 10, ep_off10, 0) + tl.where(n == 11, ep_off11, 0) + tl.where(n == 12, ep_off12, 0)
            + tl.where(n == 13, ep_off13, 0) + tl.where(n == 14, ep_off14, 0) + tl.where(n == 15, ep_off15, 0))


@triton.jit
def load_rows(ptr, row_off, rmask, cc, C):
    """A [ROWS, BLOCK_C] block of logits as fp32; 0 outside the rows and classes."""
    mask = rmask[:, None] & (cc < C)[None, :]
    return tl.load(ptr + row_off[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def logaddexp(a, b):
    """log(exp(a) + exp(b)) per row; a may be -inf (no class other than the label)."""
    hi = tl.maximum(a, b)
    return hi + log(1.0 + exp(tl.minimum(a, b) - hi))


@triton.jit
def row_stats(ptr, row_off, rmask, y, C, moments, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per row, online over class blocks: first arg-max (as torch.argmax); the max over the classes
    other than the label and their log-sum-exp; the log-sum-exp of all, that one's log-sum-exp with
    the label's logit; where `moments` (a runtime flag), the mean and the sum of squared deviations
    (blocks merged as Chan et al. do, which keeps the deviations' precision). Splitting off the label
    costs no exp and gives DKD's 1 - p_y = exp(lse_other - lse) to full precision where p_y is 1."""
    cols = tl.arange(0, BLOCK_C)
    mx = tl.full([ROWS], -float("inf"), tl.float32)
    arg = tl.zeros([ROWS], tl.int32)
    mo = tl.full([ROWS], -float("inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    mean = tl.zeros([ROWS], tl.float32)
    m2 = tl.zeros([ROWS], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        inside = (cc < C)[None, :]
        z = load_rows(ptr, row_off, rmask, cc, C)
        zm = tl.where(inside, z, -float("inf"))
        block_max = tl.max(zm, axis=1)
        block_arg = tl.min(tl.where(zm == block_max[:, None], cc[None, :], C), axis=1)
        arg = tl.where(block_max > mx, block_arg, arg)  # an earlier block keeps ties
        mx = tl.maximum(mx, block_max)
        other = inside & (cc[None, :] != y[:, None])
        new = tl.maximum(mo, tl.max(tl.where(other, z, -float("inf")), axis=1))
        total = total * tl.where(new == mo, 1.0, exp(mo - new)) + tl.sum(
            tl.where(other, exp(z - new[:, None]), 0.0), axis=1)
        mo = new
        if moments != 0:
            n_b = tl.minimum(C - c0, BLOCK_C).to(tl.float32)
            block_mean = tl.sum(tl.where(inside, z, 0.0), axis=1) / n_b
            d = tl.where(inside, z - block_mean[:, None], 0.0)
            delta = block_mean - mean
            share = n_b / (c0 + n_b)
            mean += delta * share
            m2 += tl.sum(d * d, axis=1) + delta * delta * (c0 * share)
    lse_o = mo + log(total)
    zy = tl.load(ptr + row_off + y, mask=rmask, other=0.0).to(tl.float32)
    return arg, mo, logaddexp(lse_o, zy), lse_o, mean, m2


@triton.jit
def slot_lse(ptr, row_off, rmask, y, mo, shift, scale, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """(log-sum-exp, the same over the classes other than the label) of x = (z - shift) * scale per
    row (scale > 0), given mo, the max of z over those classes: max x there is (mo - shift) * scale."""
    cols = tl.arange(0, BLOCK_C)
    total = tl.zeros([ROWS], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        z = load_rows(ptr, row_off, rmask, cc, C)
        other = (cc < C)[None, :] & (cc[None, :] != y[:, None])
        total += tl.sum(tl.where(other, exp((z - mo[:, None]) * scale[:, None]), 0.0), axis=1)
    lse_o = (mo - shift) * scale + log(total)
    zy = tl.load(ptr + row_off + y, mask=rmask, other=0.0).to(tl.float32)
    return logaddexp(lse_o, (zy - shift) * scale), lse_o


@triton.jit
def pick(tile, ids, k):
    """Row k of a small [K, ROWS] tile of per-row statistics."""
    return tl.sum(tl.where(ids[:, None] == k, tile, 0), axis=0)


@triton.jit
def _power(base, exponent):
    """base^exponent as exp(log(base) · exponent), and 0 at base = 0."""
    return tl.where(base > 0.0, exp(log(tl.maximum(base, 1e-30)) * exponent), 0.0)


@triton.jit
def gate_weight(gate_kind, factor, gate_arg, correct):
    """Per row: the weight of the gate whose code is gate_kind (`ktfast.graph.gates`, docs/ARCHITECTURE.md §1,
    Gates), one select per gate; factor = k / k_end, gate_arg = 1/γ of the gamma gates and 1/w of the
    warmup gate, correct = whether the source's top-1 is the label."""
    # The gamma gates share one power: a power each made ptxas spill (benchmarks/compile_kernels.py).
    power = _power(tl.where(gate_kind == _GAMMA, factor, 1.0 - factor), gate_arg)
    w = tl.where(gate_kind == _CORRECT, tl.where(correct, 1.0, 0.0), 0.0)  # [ROWS]; an unknown code weighs 0
    w = tl.where(gate_kind == _THROUGH, 1.0, w)
    w = tl.where(gate_kind == _LINEAR, factor, w)
    w = tl.where(gate_kind == _NEGATIVE_LINEAR, 1.0 - factor, w)
    w = tl.where((gate_kind == _GAMMA) | (gate_kind == _NEGATIVE_GAMMA), power, w)
    w = tl.where(gate_kind == _WARMUP, tl.minimum(1.0, factor * gate_arg), w)
    return w


# ---- each loss term's share of a block of classes (the forward's single pass over an edge's rows) ----
# ws, wt: the source's and the target's logits as the edge's tempered terms see them (standardized or
# raw); x = w / T. h = d loss / d wt, accumulated as Σ h · wt where the edge standardizes: the
# backward's chain through the std needs it (see `edge_losses`).
@triton.jit
def kl_block(ws, wt, valid, inv_t, inv_tt, lse_st, lse_tt, h_scale, kl, hw, std, ANY_STD: tl.constexpr):
    """Σ p_s (log p_s - log p_t), p_s at T, p_t at T or 1; h = h_scale · (p_t - p_s), and where the
    edge is standardized (`std`), hw += Σ h·w. ANY_STD: some edge of the graph is; without it the
    exp that hw needs is not compiled. With it, hw is added under a select, not a branch: a branch
    here made ptxas spill (benchmarks/compile_kernels.py)."""
    xs = ws * inv_t
    ps = tl.where(valid, exp(xs - lse_st[:, None]), 0.0)
    kl += tl.sum(ps * (xs - wt * inv_tt + (lse_tt - lse_st)[:, None]), axis=1)
    if ANY_STD:
        pt = tl.where(valid, exp(wt * inv_tt - lse_tt[:, None]), 0.0)
        hw += tl.sum((pt - ps) * wt, axis=1) * tl.where(std != 0, h_scale, 0.0)
    return kl, hw


@triton.jit
def dkd_block(ws, wt, valid, is_y, inv_t, lse_os, lse_ot, tc, beta_t, nckd, hw, std):
    """NCKD: Σ_{j≠y} q_s (log q_s - log q_t), q the softmax over the classes other than y, from their
    own log-sum-exp (no product with p_y's complement). With tc = T·α·(b_t - b_s), b = 1 - p_y, and
    beta_t = T·β: h = tc·q_t + beta_t·(q_t - q_s) off y, -tc at y."""
    other = valid & (is_y == 0)
    xs = ws * inv_t
    xt = wt * inv_t
    qs = tl.where(other, exp(xs - lse_os[:, None]), 0.0)
    nckd += tl.sum(qs * (xs - xt + (lse_ot - lse_os)[:, None]), axis=1)
    if std != 0:
        qt = tl.where(other, exp(xt - lse_ot[:, None]), 0.0)
        h = tc[:, None] * qt + beta_t * (qt - qs) - tl.where(is_y != 0, tc[:, None], 0.0)
        hw += tl.sum(h * wt, axis=1)
    return nckd, hw


@triton.jit
def dist_block(ws, wt, valid, inv_t, lse_s, lse_t, inv_c, ab, aa, bb, paw, pbw, pw, std):
    """The sums of the Pearson correlation of p_s and p_t (at T): a = p_s - 1/C, b = p_t - 1/C,
    Σ ab, Σ a², Σ b²; where standardized also Σ p_t a wt, Σ p_t b wt, Σ p_t wt (the Σ h · wt of
    h = -T p_t (c1 a - c2 b - c3), whose coefficients need the row's totals)."""
    ps = tl.where(valid, exp(ws * inv_t - lse_s[:, None]), 0.0)
    pt = tl.where(valid, exp(wt * inv_t - lse_t[:, None]), 0.0)
    a = tl.where(valid, ps - inv_c, 0.0)
    b = tl.where(valid, pt - inv_c, 0.0)
    ab += tl.sum(a * b, axis=1)
    aa += tl.sum(a * a, axis=1)
    bb += tl.sum(b * b, axis=1)
    if std != 0:
        ptw = pt * wt
        paw += tl.sum(ptw * a, axis=1)
        pbw += tl.sum(ptw * b, axis=1)
        pw += tl.sum(ptw, axis=1)
    return ab, aa, bb, paw, pbw, pw


@triton.jit
def cos_block(zs, zt, valid, lse_s, lse_t, dot, ss, tt):
    """The sums of cos over a block of classes: Σ p_s p_t, Σ p_s², Σ p_t², p the softmax at T = 1."""
    ps = tl.where(valid, exp(zs - lse_s[:, None]), 0.0)
    pt = tl.where(valid, exp(zt - lse_t[:, None]), 0.0)
    dot += tl.sum(ps * pt, axis=1)
    ss += tl.sum(ps * ps, axis=1)
    tt += tl.sum(pt * pt, axis=1)
    return dot, ss, tt


@triton.jit
def mse_block(zs, zt, sq):
    """MSE's Σ (z_t - z_s)² over a block of classes (0 outside the rows and classes, as load_rows)."""
    d = zt - zs
    return sq + tl.sum(d * d, axis=1)


@triton.jit
def tckd(xsy, xty, lse_s, lse_os, lse_t, lse_ot):
    """KL of the binary distributions (p_y, 1 - p_y) of source and target; log(1 - p_y) is
    lse_other - lse, exact where p_y rounds to 1."""
    ls1 = xsy - lse_s
    ls2 = lse_os - lse_s
    return exp(ls1) * (ls1 - (xty - lse_t)) + exp(ls2) * (ls2 - (lse_ot - lse_t))


@triton.jit
def dist_coefficients(ab, aa, bb):
    """(1/D, φ, Σ p_t g) of corr = Σab / D, D = |a||b| + ε: d corr / d b = a / D - φ b with
    φ = Σab |a| / (|b| D²) (0 where |b| = 0, as torch's norm gradient there), and Σ p_t g =
    Σab / D - φ |b|² since Σ a = Σ b = 0. Returned with corr."""
    na = tl.sqrt_rn(aa)
    nb = tl.sqrt_rn(bb)
    d = na * nb + DIST_EPS
    corr = ab / d
    phi = tl.where(nb > 0.0, corr * na / (tl.where(nb > 0.0, nb, 1.0) * d), 0.0)
    return corr, 1.0 / d, phi, corr - phi * bb
