"""Per-row building blocks of the edge-loss kernels (`edge_losses`), as Triton device functions:
exp and log, the address of an endpoint's logits, a block of logits, each row's max, arg-max and
log-sum-exp (online over blocks of classes), the tempered log-sum-exp, and a gate's weight.

exp and log are libdevice's (within 2 ulp), not `tl.exp`/`tl.log`'s ex2/lg2.approx: T² · KL at
T = 10 magnifies their error past 1e-5 of the reference's value.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# The interpreter has no libdevice (and its numpy exp and log are exact anyway).
_LIBDEVICE = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


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
def row_stats(ptr, row_off, rmask, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per row: max, first arg-max (as torch.argmax) and log-sum-exp, online over class blocks."""
    cols = tl.arange(0, BLOCK_C)
    mx = tl.full([ROWS], -float("inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    arg = tl.zeros([ROWS], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        z = tl.where((cc < C)[None, :], load_rows(ptr, row_off, rmask, cc, C), -float("inf"))
        block_max = tl.max(z, axis=1)
        block_arg = tl.min(tl.where(z == block_max[:, None], cc[None, :], C), axis=1)
        new = tl.maximum(mx, block_max)
        total = total * exp(mx - new) + tl.sum(exp(z - new[:, None]), axis=1)
        arg = tl.where(block_max > mx, block_arg, arg)  # an earlier block keeps ties
        mx = new
    return mx, arg, mx + log(total)


@triton.jit
def tempered_lse(ptr, row_off, rmask, mx, inv_t, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """log Σ exp(z / T) per row, given max(z): max(z / T) = max(z) / T."""
    cols = tl.arange(0, BLOCK_C)
    total = tl.zeros([ROWS], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        z = load_rows(ptr, row_off, rmask, cc, C)
        total += tl.sum(tl.where((cc < C)[None, :], exp((z - mx[:, None]) * inv_t), 0.0), axis=1)
    return mx * inv_t + log(total)


@triton.jit
def pick(tile, ids, k):
    """Row k of a small [K, ROWS] tile of per-row statistics."""
    return tl.sum(tl.where(ids[:, None] == k, tile, 0), axis=0)


@triton.jit
def gate_weight(gate_kind, factor, inv_gamma, correct):
    """Per row: the gate's weight (DESIGN §1, Gates), factor = k / k_end. The gamma gates' power
    x^(1/γ) is exp(log(x) / γ), and 0 at x = 0."""
    fading = 1.0 - factor
    base = tl.where(gate_kind == 4, factor, fading)
    power = tl.where(base > 0.0, exp(log(tl.maximum(base, 1e-30)) * inv_gamma), 0.0)
    weight = tl.where(gate_kind == 1, factor, tl.where(gate_kind == 3, fading, power))
    return tl.where(gate_kind == 0, 1.0, tl.where(gate_kind == 2, tl.where(correct, 1.0, 0.0), weight))
