"""The edge-loss matrix in one launch: every edge's gated per-sample loss over the stacked logits
`[M, B, C]` of all endpoints, and in the backward every target row's gradient in one more launch.

One program handles one batch row. It first reads each endpoint's row once to get its max,
arg-max (for the correct gate) and log-sum-exp (shared by every edge at T = 1); then each edge
reuses those statistics (the rows themselves come back from L1/L2, not DRAM). Edges are sorted by
target, so the backward accumulates each target row's gradient in registers and stores it once.

Loss kinds (bitmask): 1 ce (label source), 2 kl (× T²), 4 cos of the softmaxes, 8 mse of the logits.
Gates: 0 through, 1 linear (a device scalar, so changing it recompiles nothing), 2 correct.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CE, KL, COS, MSE = 1, 2, 4, 8
THROUGH, LINEAR, CORRECT = 0, 1, 2


@triton.jit
def _row_stats(z_ptr, stride_m, stride_b, b, M, C, M_P2: tl.constexpr, BLOCK_C: tl.constexpr):
    """Max, first arg-max and log-sum-exp (T = 1) of every endpoint's row b, as [M_P2] vectors."""
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    nodes = tl.arange(0, M_P2)
    maxes = tl.zeros([M_P2], dtype=tl.float32)
    args = tl.zeros([M_P2], dtype=tl.int32)
    lses = tl.zeros([M_P2], dtype=tl.float32)
    for m in range(M):
        z = tl.load(z_ptr + m * stride_m + b * stride_b + cols, mask=cmask, other=-float("inf")).to(tl.float32)
        mx = tl.max(z, axis=0)
        arg = tl.min(tl.where(z == mx, cols, BLOCK_C), axis=0)  # first index of the max, as torch.argmax
        lse = mx + tl.log(tl.sum(tl.where(cmask, tl.exp(z - mx), 0.0), axis=0))
        maxes = tl.where(nodes == m, mx, maxes)
        args = tl.where(nodes == m, arg, args)
        lses = tl.where(nodes == m, lse, lses)
    return maxes, args, lses


@triton.jit
def _pick(vec, nodes, m):
    return tl.sum(tl.where(nodes == m, vec, 0), axis=0)


@triton.jit
def _edge(z_ptr, stride_m, stride_b, b, y, factor, src, dst, kind, gate_kind, temp,
          maxes, args, lses, nodes, C, GRAD: tl.constexpr, BLOCK_C: tl.constexpr):
    """(gate, ungated loss, d loss / d z_t) of one edge on row b."""
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    zt = tl.load(z_ptr + dst * stride_m + b * stride_b + cols, mask=cmask, other=0.0).to(tl.float32)
    zs = tl.load(z_ptr + src * stride_m + b * stride_b + cols, mask=cmask & (src >= 0), other=0.0).to(tl.float32)
    mt, lse_t = _pick(maxes, nodes, dst), _pick(lses, nodes, dst)
    ms = _pick(maxes, nodes, src)

    is_correct = (_pick(args, nodes, src) == y) | (src < 0)  # a label source is always right
    gate = tl.where(gate_kind == 1, factor, tl.where((gate_kind == 2) & (~is_correct), 0.0, 1.0))

    grad = tl.zeros([BLOCK_C], dtype=tl.float32)
    loss = tl.sum(grad, axis=0)
    log_pt = zt - lse_t
    pt = tl.where(cmask, tl.exp(log_pt), 0.0)
    if (kind & 1) != 0:  # ce: -log p_t[y]
        loss = loss - tl.sum(tl.where(cols == y, log_pt, 0.0), axis=0)
        if GRAD:
            grad = grad + pt - tl.where(cols == y, 1.0, 0.0)
    if (kind & 2) != 0:  # kl(p_s^T || p_t^T) T²; max(z/T) = max(z)/T, so the maxima are shared
        inv_t = 1.0 / temp
        es = tl.where(cmask, tl.exp((zs - ms) * inv_t), 0.0)
        et = tl.where(cmask, tl.exp((zt - mt) * inv_t), 0.0)
        ss, st = tl.sum(es, axis=0), tl.sum(et, axis=0)
        ps_t, pt_t = es / ss, et / st
        log_ps_t = (zs - ms) * inv_t - tl.log(ss)
        log_pt_t = (zt - mt) * inv_t - tl.log(st)
        kl = tl.sum(tl.where(ps_t > 0, ps_t * (log_ps_t - log_pt_t), 0.0), axis=0)
        loss = loss + kl * temp * temp
        if GRAD:
            grad = grad + temp * (pt_t - ps_t)
    if (kind & 4) != 0:  # cosine similarity of the softmaxes (T = 1)
        ps = tl.where(cmask, tl.exp(zs - _pick(lses, nodes, src)), 0.0)
        ns = tl.sqrt(tl.sum(ps * ps, axis=0))
        nt = tl.sqrt(tl.sum(pt * pt, axis=0))
        cos = tl.sum(ps * pt, axis=0) / (ns * nt)
        loss = loss + cos
        if GRAD:
            g = ps / (ns * nt) - cos * pt / (nt * nt)  # d cos / d p_t
            grad = grad + pt * (g - tl.sum(g * pt, axis=0))  # through the softmax
    if (kind & 8) != 0:  # mean squared error of the logits
        d = tl.where(cmask, zt - zs, 0.0)
        loss = loss + tl.sum(d * d, axis=0) / C
        if GRAD:
            grad = grad + 2.0 * d / C
    return gate, loss, grad


@triton.jit
def _edge_loss_fwd(z_ptr, y_ptr, factor_ptr, src_ptr, dst_ptr, kind_ptr, gate_ptr, temp_ptr,
                   loss_ptr, gates_ptr, M, B, C, E, stride_m, stride_b,
                   M_P2: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    y = tl.load(y_ptr + b).to(tl.int32)
    factor = tl.load(factor_ptr).to(tl.float32)
    nodes = tl.arange(0, M_P2)
    maxes, args, lses = _row_stats(z_ptr, stride_m, stride_b, b, M, C, M_P2, BLOCK_C)
    for e in range(E):
        gate, loss, _ = _edge(z_ptr, stride_m, stride_b, b, y, factor, tl.load(src_ptr + e), tl.load(dst_ptr + e),
                              tl.load(kind_ptr + e), tl.load(gate_ptr + e), tl.load(temp_ptr + e),
                              maxes, args, lses, nodes, C, False, BLOCK_C)
        tl.store(loss_ptr + e * B + b, gate * loss)
        tl.store(gates_ptr + e * B + b, gate)


@triton.jit
def _edge_loss_bwd(z_ptr, y_ptr, factor_ptr, src_ptr, dst_ptr, kind_ptr, gate_ptr, temp_ptr, scale_ptr,
                   first_ptr, grad_ptr, M, B, C, stride_m, stride_b, M_P2: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad[m, b] = Σ_{edges e into m} scale[e] · gate · d loss_e / d z_m (scale: upstream × weight / B)."""
    b = tl.program_id(0)
    y = tl.load(y_ptr + b).to(tl.int32)
    factor = tl.load(factor_ptr).to(tl.float32)
    nodes = tl.arange(0, M_P2)
    cols = tl.arange(0, BLOCK_C)
    maxes, args, lses = _row_stats(z_ptr, stride_m, stride_b, b, M, C, M_P2, BLOCK_C)
    for m in range(M):
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for e in range(tl.load(first_ptr + m), tl.load(first_ptr + m + 1)):  # the edges into m
            gate, _, grad = _edge(z_ptr, stride_m, stride_b, b, y, factor, tl.load(src_ptr + e), m,
                                  tl.load(kind_ptr + e), tl.load(gate_ptr + e), tl.load(temp_ptr + e),
                                  maxes, args, lses, nodes, C, True, BLOCK_C)
            acc += (tl.load(scale_ptr + e) * gate) * grad
        tl.store(grad_ptr + m * stride_m + b * stride_b + cols, acc.to(grad_ptr.dtype.element_ty), mask=cols < C)


def _launch_config(M: int, C: int):
    block_c = triton.next_power_of_2(C)
    return dict(M_P2=triton.next_power_of_2(M), BLOCK_C=block_c, num_warps=4 if block_c <= 1024 else 8)


class EdgeLossFn(torch.autograd.Function):
    """(Z [M, B, C], labels, factor, table) -> (Σ_b gate·loss per edge [E], gates [E, B]).

    `table` holds int32 src/dst/kind/gate and float32 temp of the edges sorted by target, and
    `first` [M + 1]: the edges into node m are first[m]:first[m+1]. Only the sums carry a gradient.
    """

    @staticmethod
    def forward(ctx, z, labels, factor, table):
        z = z.contiguous()
        M, B, C = z.shape
        E = table["src"].numel()
        losses = torch.empty(E, B, device=z.device, dtype=torch.float32)
        gates = torch.empty(E, B, device=z.device, dtype=torch.float32)
        if E and B:
            _edge_loss_fwd[(B,)](z, labels, factor, table["src"], table["dst"], table["kind"], table["gate"],
                                 table["temp"], losses, gates, M, B, C, E, z.stride(0), z.stride(1),
                                 **_launch_config(M, C))
        ctx.save_for_backward(z, labels, factor)
        ctx.table = table
        ctx.mark_non_differentiable(gates)
        return losses.sum(1), gates

    @staticmethod
    def backward(ctx, grad_sums, _grad_gates):
        z, labels, factor = ctx.saved_tensors
        t = ctx.table
        M, B, C = z.shape
        grad = torch.empty_like(z)
        _edge_loss_bwd[(B,)](z, labels, factor, t["src"], t["dst"], t["kind"], t["gate"], t["temp"],
                             grad_sums.float().contiguous(), t["first"], grad, M, B, C, z.stride(0), z.stride(1),
                             **_launch_config(M, C))
        return grad, None, None, None
