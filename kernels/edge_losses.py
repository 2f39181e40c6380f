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

from .edge_terms import (
    _DST,
    _GATE,
    _GATE_ARG,
    _SRC,
    _STD,
    _TGT,
    _WEIGHT,
    AUX,  # noqa: F401 (the launcher reads it here)
    edge_grad,
    edge_loss_rows,
)
from .rows import exp, gate_weight, load_rows, offset, pick, row_stats, slot_lse

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

STANDARDIZE_EPS = tl.constexpr(1e-7)  # ktfast.losses.STANDARDIZE_EPS


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
    y = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int32)
    if FACTOR_FROM_PTR:
        factor = tl.load(factor_ptr).to(tl.float32)
    node_ids = tl.arange(0, M_P2)
    slot_ids = tl.arange(0, S_P2)
    args, means, inv_ss, rho_ss, lses, lse_os = _endpoint_stats(
        z, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8, ep_off9, ep_off10,
        ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, y, rows, rmask, row_off, slot_node, slot_inv_t, slot_std,
        node_std, lse_ptr, mom_ptr, B, C, M, S, node_ids, slot_ids, STACKED, ROWS, BLOCK_C, M_P2, S_P2, KINDS)

    target_ids = tl.arange(0, NT_P2)
    part = tl.zeros([NT_P2], tl.float32)
    for e in range(E):
        src = tl.load(ints + _SRC * E + e)
        dst = tl.load(ints + _DST * E + e)
        loss = edge_loss_rows(z, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8,
                              ep_off9, ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, src, dst, e, y, rows,
                              rmask, row_off, ints, floats, aux_ptr, lses, lse_os, slot_ids, means, inv_ss, rho_ss,
                              node_ids, B, C, E, STACKED, ROWS, BLOCK_C, KINDS, ONE_BLOCK)
        correct = (pick(args, node_ids, src) == y) | (src < 0)  # the label is always right
        gate = gate_weight(tl.load(ints + _GATE * E + e), factor, tl.load(floats + _GATE_ARG * E + e), correct)
        tl.store(aux_ptr + e * B + rows, gate, mask=rmask)
        total = tl.sum(tl.where(rmask, gate * loss, 0.0), axis=0) * tl.load(floats + _WEIGHT * E + e) * inv_b
        part += tl.where(target_ids == tl.load(ints + _TGT * E + e), total, 0.0)
    _reduce_programs(part, part_ptr, count_ptr, out_ptr, target_ids, NT, NT_P2, P_BLOCK)


@triton.jit
def _endpoint_stats(z, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7, ep_off8, ep_off9,
                    ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, y, rows, rmask, row_off, slot_node,
                    slot_inv_t, slot_std, node_std, lse_ptr, mom_ptr, B, C, M, S, node_ids, slot_ids,
                    STACKED: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, M_P2: tl.constexpr,
                    S_P2: tl.constexpr, KINDS: tl.constexpr):
    """Every endpoint's statistics, then the slots' log-sum-exps, as [endpoint or slot, row] tiles:
    (arg-max, mean, 1 / (ε + std), (ε + std) / ((C - 1) std) or 0 where std = 0, log-sum-exp, the
    same over the classes other than the label); the log-sum-exps and moments are saved for the
    backward."""
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
    return args, means, inv_ss, rho_ss, lses, lse_os


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
            acc = edge_grad(acc, z, node_stride, ep_off1, ep_off2, ep_off3, ep_off4, ep_off5, ep_off6, ep_off7,
                            ep_off8, ep_off9, ep_off10, ep_off11, ep_off12, ep_off13, ep_off14, ep_off15, e, zt, pt,
                            std_t, inv_s_t, cc, y, valid, rows, rmask, row_off, grad_l, grad_total, ints, floats,
                            aux_ptr, lse_ptr, mom_ptr, B, C, E, M, S, inv_b, STACKED, HAS_GRAD_L, HAS_GRAD_TOTAL,
                            KINDS)
        tl.store(out + row_off[:, None] + cc[None, :], acc.to(out_ptr.dtype.element_ty), mask=valid)


