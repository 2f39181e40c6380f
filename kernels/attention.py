"""Attention-crop losses in one launch: for every attention edge and sample, the k×k windows (several
k) around the source map's arg-max, on both maps, L2-normalised, compared by MSE or cosine and
averaged over the crop sizes, gated and summed into each target's L_t; the backward gives the
gradient w.r.t. each target map in one more launch.

A window is a mask over the whole map (maps are at most a few thousand pixels), so each map is
read once and no gather is needed. Forward: one program per sample. Backward: one per (sample,
target map), summing the gradients of the edges into that map in registers (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import edge_table as et
from . import plans

_EPS = tl.constexpr(1e-12)  # as torch.nn.functional.normalize
_ATT_MSE, _ATT_COS = tl.constexpr(et.ATT_MSE), tl.constexpr(et.ATT_COS)
_SRC, _DST, _KIND, _ROW, _TGT = (tl.constexpr(r) for r in range(5))


@triton.jit
def _att_edge(maps, plane, b, src, dst, kind, crops, n_crops, H, W, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """(loss, d loss / d target map) of one edge on sample b, averaged over its crop sizes."""
    offs = tl.arange(0, BLOCK)
    mask = offs < H * W
    sample = b.to(tl.int64) * H * W
    s = tl.load(maps + src * plane + sample + offs, mask=mask, other=-float("inf")).to(tl.float32)
    t = tl.load(maps + dst * plane + sample + offs, mask=mask, other=0.0).to(tl.float32)
    arg = tl.min(tl.where(s == tl.max(s, axis=0), offs, BLOCK), axis=0)  # first arg-max, as torch
    i, j = arg // W, arg % W
    rows, cols = offs // W, offs % W
    s = tl.where(mask, s, 0.0)
    grad = tl.zeros([BLOCK], tl.float32)
    loss = tl.sum(grad, axis=0)
    for q in range(n_crops):
        k = tl.load(crops + q)
        # Centred on the arg-max, then moved to lie inside the map.
        top = tl.minimum(tl.maximum(i - k // 2, 0), H - k)
        left = tl.minimum(tl.maximum(j - k // 2, 0), W - k)
        win = mask & (rows >= top) & (rows < top + k) & (cols >= left) & (cols < left + k)
        sw, tw = tl.where(win, s, 0.0), tl.where(win, t, 0.0)
        # Correctly rounded sqrt and division: in binary floating point sqrt(x·x) = |x| and x / |x| = ±1
        # exactly, so a 1×1 crop normalises to exactly ±1 and its gradient (truly 0) comes out 0; the
        # approximate ones leave an ulp that the backward's 1 / |crop| magnifies (500× at |t| = 0.002).
        norm_t = tl.sqrt_rn(tl.sum(tw * tw, axis=0))
        sh = tl.div_rn(sw, tl.maximum(tl.sqrt_rn(tl.sum(sw * sw, axis=0)), _EPS))
        th = tl.div_rn(tw, tl.maximum(norm_t, _EPS))
        g = tl.zeros([BLOCK], tl.float32)  # d loss / d th
        if (kind & _ATT_MSE) != 0:
            d = sh - th
            loss += tl.sum(d * d, axis=0) / (k * k)
            g -= 2.0 * d / (k * k)
        if (kind & _ATT_COS) != 0:
            loss += tl.sum(sh * th, axis=0)
            g += sh
        if GRAD:  # through the normalisation; below eps it divides by eps, a constant
            radial = tl.where(norm_t > _EPS, tl.sum(th * g, axis=0), 0.0)
            grad += tl.where(win, tl.div_rn(g - th * radial, tl.maximum(norm_t, _EPS)), 0.0)
    return loss / n_crops, grad / n_crops


@triton.jit
def _att_fwd(maps, ints, crops, n_crops, gates, weights, part_ptr, A, B, H, W, NT, inv_b,
             MAX_CROPS: tl.constexpr, NT_P2: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    plane = B * H * W
    target_ids = tl.arange(0, NT_P2)
    part = tl.zeros([NT_P2], tl.float32)
    for a in range(A):
        loss, _ = _att_edge(maps, plane, b, tl.load(ints + _SRC * A + a), tl.load(ints + _DST * A + a),
                            tl.load(ints + _KIND * A + a), crops + a * MAX_CROPS, tl.load(n_crops + a), H, W,
                            False, BLOCK)
        row = tl.load(ints + _ROW * A + a)
        total = tl.load(gates + row * B + b) * loss * tl.load(weights + row) * inv_b
        part += tl.where(target_ids == tl.load(ints + _TGT * A + a), total, 0.0)
    tl.store(part_ptr + b * NT + target_ids, part, mask=target_ids < NT)


@triton.jit
def _att_bwd(maps, ints, crops, n_crops, gates, weights, grad_l, grads, out_ptr, A, B, H, W, G, inv_b,
             MAX_CROPS: tl.constexpr, BLOCK: tl.constexpr):
    """out[g] = Σ_{edges a into map g} dL/dL_t · weight / B · gate · d loss_a / d map_g."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    plane = B * H * W
    offs = tl.arange(0, BLOCK)
    node = tl.load(grads + g)
    acc = tl.zeros([BLOCK], tl.float32)
    for a in range(tl.load(grads + G + g), tl.load(grads + 2 * G + g)):
        _, grad = _att_edge(maps, plane, b, tl.load(ints + _SRC * A + a), node, tl.load(ints + _KIND * A + a),
                            crops + a * MAX_CROPS, tl.load(n_crops + a), H, W, True, BLOCK)
        row = tl.load(ints + _ROW * A + a)
        scale = tl.load(grad_l + tl.load(ints + _TGT * A + a)) * tl.load(weights + row) * inv_b
        acc += (scale * tl.load(gates + row * B + b)) * grad
    out = out_ptr + g.to(tl.int64) * plane + b.to(tl.int64) * H * W
    tl.store(out + offs, acc.to(out_ptr.dtype.element_ty), mask=offs < H * W)


class AttentionLossFn(torch.autograd.Function):
    """(attention table, edge weights [E], gates [E, B], number of targets, *maps [B, H, W])
    -> the attention terms of every target's L_t [targets]."""

    @staticmethod
    def forward(ctx, table: et.AttentionTable, weights, gates, n_targets: int, *maps):
        stacked = torch.stack(maps)  # small: one map per node and sample
        N, B, H, W = stacked.shape
        A = table.n_crops.numel()
        part = torch.empty(B, n_targets, device=stacked.device, dtype=torch.float32)
        block, warps = plans.attention_plan(H, W)
        _att_fwd[(B,)](stacked, table.ints, table.crops, table.n_crops, gates, weights, part, A, B, H, W, n_targets,
                       1.0 / B, MAX_CROPS=table.crops.shape[1], NT_P2=triton.next_power_of_2(n_targets), BLOCK=block,
                       num_warps=warps)
        ctx.save_for_backward(stacked, weights, gates)
        ctx.table = table
        return part.sum(0)

    @staticmethod
    def backward(ctx, grad_l):
        stacked, weights, gates = ctx.saved_tensors
        table = ctx.table
        N, B, H, W = stacked.shape
        G = table.grads.shape[1]
        out = torch.empty(G, B, H, W, device=stacked.device, dtype=stacked.dtype)
        block, warps = plans.attention_plan(H, W)
        _att_bwd[(B, G)](stacked, table.ints, table.crops, table.n_crops, gates, weights, grad_l.float().contiguous(),
                         table.grads, out, table.n_crops.numel(), B, H, W, G, 1.0 / B,
                         MAX_CROPS=table.crops.shape[1], BLOCK=block, num_warps=warps)
        grads = [None] * N
        for g, node in enumerate(table.grad_nodes):
            grads[node] = out[g]
        return None, None, None, None, *grads
