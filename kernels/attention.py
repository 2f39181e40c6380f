"""Attention-crop losses in one launch: for every attention edge and sample, the k×k windows (several
k) around the source map's arg-max, on both maps, L2-normalised, compared by MSE or cosine and
averaged over the crop sizes; the backward gives the gradient w.r.t. each target map.

A window is a mask over the whole map (maps are at most a few thousand pixels), so each map is
read once and no gather is needed. One program per sample; edges sorted by target map, so the
backward sums each target's gradient in registers and stores it once (deterministic, no atomics).
Kinds (bitmask): 1 att_mse, 2 att_cos.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

EPS = 1e-12  # as torch.nn.functional.normalize
ATT_MSE, ATT_COS = 1, 2


@triton.jit
def _att_edge(a_ptr, stride_n, stride_b, b, src, dst, kind, crops_ptr, n_crops, H, W,
              GRAD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < H * W
    s = tl.load(a_ptr + src * stride_n + b * stride_b + offs, mask=mask, other=-float("inf")).to(tl.float32)
    t = tl.load(a_ptr + dst * stride_n + b * stride_b + offs, mask=mask, other=0.0).to(tl.float32)
    arg = tl.min(tl.where(s == tl.max(s, axis=0), offs, BLOCK), axis=0)  # first arg-max, as torch
    i, j = arg // W, arg % W
    rows, cols = offs // W, offs % W
    s = tl.where(mask, s, 0.0)
    grad = tl.zeros([BLOCK], dtype=tl.float32)
    loss = tl.sum(grad, axis=0)
    for q in range(n_crops):
        k = tl.load(crops_ptr + q)
        # Centred on the arg-max, then moved to lie inside the map.
        top = tl.minimum(tl.maximum(i - k // 2, 0), H - k)
        left = tl.minimum(tl.maximum(j - k // 2, 0), W - k)
        win = mask & (rows >= top) & (rows < top + k) & (cols >= left) & (cols < left + k)
        sw, tw = tl.where(win, s, 0.0), tl.where(win, t, 0.0)
        norm_t = tl.sqrt(tl.sum(tw * tw, axis=0))
        sh = sw / tl.maximum(tl.sqrt(tl.sum(sw * sw, axis=0)), EPS)
        th = tw / tl.maximum(norm_t, EPS)
        g = tl.zeros([BLOCK], dtype=tl.float32)
        if (kind & 1) != 0:
            d = sh - th
            loss = loss + tl.sum(d * d, axis=0) / (k * k)
            g = g - 2.0 * d / (k * k)
        if (kind & 2) != 0:
            loss = loss + tl.sum(sh * th, axis=0)
            g = g + sh
        if GRAD:  # through the normalisation; below eps it divides by eps, a constant
            radial = tl.where(norm_t > EPS, tl.sum(th * g, axis=0), 0.0)
            grad = grad + tl.where(win, (g - th * radial) / tl.maximum(norm_t, EPS), 0.0)
    return loss / n_crops, grad / n_crops


@triton.jit
def _att_fwd(a_ptr, src_ptr, dst_ptr, kind_ptr, crops_ptr, ncrops_ptr, gates_ptr, loss_ptr, B, E, H, W,
             stride_n, stride_b, MAX_CROPS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    for e in range(E):
        loss, _ = _att_edge(a_ptr, stride_n, stride_b, b, tl.load(src_ptr + e), tl.load(dst_ptr + e),
                            tl.load(kind_ptr + e), crops_ptr + e * MAX_CROPS, tl.load(ncrops_ptr + e), H, W,
                            False, BLOCK)
        tl.store(loss_ptr + e * B + b, tl.load(gates_ptr + e * B + b) * loss)


@triton.jit
def _att_bwd(a_ptr, src_ptr, kind_ptr, crops_ptr, ncrops_ptr, gates_ptr, scale_ptr, first_ptr, grad_ptr,
             N, B, H, W, stride_n, stride_b, MAX_CROPS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    for n in range(N):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for e in range(tl.load(first_ptr + n), tl.load(first_ptr + n + 1)):
            _, grad = _att_edge(a_ptr, stride_n, stride_b, b, tl.load(src_ptr + e), n, tl.load(kind_ptr + e),
                                crops_ptr + e * MAX_CROPS, tl.load(ncrops_ptr + e), H, W, True, BLOCK)
            acc += (tl.load(scale_ptr + e) * tl.load(gates_ptr + e * B + b)) * grad
        tl.store(grad_ptr + n * stride_n + b * stride_b + offs, acc.to(grad_ptr.dtype.element_ty), mask=offs < H * W)


class AttentionLossFn(torch.autograd.Function):
    """(A [N, B, H, W], gates [E, B], table) -> Σ_b gate·loss per attention edge [E].

    `table`: int32 src/dst/kind/ncrops, crops [E, MAX_CROPS], `first` [N + 1] (edges sorted by dst).
    """

    @staticmethod
    def forward(ctx, maps, gates, table):
        maps, gates = maps.contiguous(), gates.contiguous()
        N, B, H, W = maps.shape
        E = table["src"].numel()
        losses = torch.empty(E, B, device=maps.device, dtype=torch.float32)
        block = triton.next_power_of_2(H * W)
        _att_fwd[(B,)](maps, table["src"], table["dst"], table["kind"], table["crops"], table["ncrops"], gates,
                       losses, B, E, H, W, maps.stride(0), maps.stride(1), MAX_CROPS=table["crops"].shape[1],
                       BLOCK=block)
        ctx.save_for_backward(maps, gates)
        ctx.table = table
        return losses.sum(1)

    @staticmethod
    def backward(ctx, grad_sums):
        maps, gates = ctx.saved_tensors
        t = ctx.table
        N, B, H, W = maps.shape
        grad = torch.empty_like(maps)
        _att_bwd[(B,)](maps, t["src"], t["kind"], t["crops"], t["ncrops"], gates, grad_sums.float().contiguous(),
                       t["first"], grad, N, B, H, W, maps.stride(0), maps.stride(1),
                       MAX_CROPS=t["crops"].shape[1], BLOCK=triton.next_power_of_2(H * W))
        return grad, None, None
