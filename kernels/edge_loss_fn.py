"""Launching the edge-loss kernels (`edge_losses`): their plans, the caller-owned scratch memory,
the logits read in place, and the autograd Function that runs the forward and the backward kernel.
The kernels and the module constants are reached through `edge_losses`, where tests and
benchmarks/compile_kernels.py substitute them."""
from __future__ import annotations

import torch
import triton

from . import edge_losses, plans
from . import edge_table as et


def _blocks(B: int, C: int, device: torch.device) -> tuple[int, int, int, int]:
    """(rows per program, classes per block, warps, programs): `plans.edge_plan` on this device."""
    return plans.edge_plan(B, C, plans.multiprocessors(device), edge_losses.MAX_BLOCK_C, edge_losses.GPU_TILE)


def _one_block(rows: int, block_c: int, C: int) -> bool:
    """Whether the kernels walk the classes as one block without a loop (their ONE_BLOCK). Only for
    tiles of up to 256 elements (one or two warps): there the loop's carried values made ptxas spill
    on sm_80, while straight code at larger tiles spilled instead (benchmarks/compile_kernels.py)."""
    return block_c >= C and rows * block_c <= 256


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
    if len(rows) > edge_losses.MAX_LINKED:
        stacked = torch.stack(rows)
        return stacked, [0] * edge_losses.OFFSET_ARGS, stacked.stride(0), True
    base, size = rows[0].data_ptr(), rows[0].element_size()
    offsets = [(r.data_ptr() - base) // size for r in rows[1:]]
    return rows[0], offsets + [0] * (edge_losses.OFFSET_ARGS - len(offsets)), 0, False


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
        # For the backward: per edge, per slot (log-sum-exp, and over the classes other than the label),
        # per endpoint (mean, 1 / (ε + std)).
        saved = torch.empty((edge_losses.AUX * E + 2 * S + 2 * M) * B, device=device, dtype=torch.float32)
        aux = saved[:edge_losses.AUX * E * B].view(edge_losses.AUX, E, B)
        lse = saved[edge_losses.AUX * E * B:(edge_losses.AUX * E + 2 * S) * B].view(2, S, B)
        mom = saved[(edge_losses.AUX * E + 2 * S) * B:].view(2, M, B)
        from_ptr = torch.is_tensor(factor)
        edge_losses._edge_loss_fwd[(programs,)](
            base, node_stride, *offsets, labels, 0.0 if from_ptr else float(factor), factor if from_ptr else out,
            table.ints, table.floats, table.slot_node, table.slot_inv_t, table.slot_std, table.node_std, part, count,
            out, aux, lse, mom, B, C, E, M, S, NT, 1.0 / B, STACKED=stacked, FACTOR_FROM_PTR=from_ptr, ROWS=rows_per,
            BLOCK_C=block_c, M_P2=triton.next_power_of_2(M), S_P2=triton.next_power_of_2(S),
            NT_P2=width, P_BLOCK=min(64, triton.next_power_of_2(programs)), KINDS=table.kinds,
            ONE_BLOCK=_one_block(rows_per, block_c, C), num_warps=warps)
        ctx.save_for_backward(labels, aux, lse, mom, *logits)
        ctx.table = table
        ctx.set_materialize_grads(False)
        gates = aux[0]
        ctx.mark_non_differentiable(gates)
        return out[:NT], out[NT], gates

    @staticmethod
    def backward(ctx, grad_l, grad_total, _grad_gates):
        labels, aux, lse, mom, *logits = ctx.saved_tensors
        table = ctx.table
        B, C = logits[0].shape
        G = len(table.grad_nodes)
        grads = [None] * len(logits)
        if G == 0 or (grad_l is None and grad_total is None):
            return None, None, None, None, *grads
        rows_per, block_c, warps, programs = _blocks(B, C, labels.device)
        if table.kinds & (et.DKD | et.DIST | et.STD):
            # Their gradient keeps more values live per element: with one warp (4 elements a thread)
            # ptxas spilled at B = 64, C = 100 (benchmarks/compile_kernels.py); two warps don't.
            warps = max(warps, 2)
        base, offsets, node_stride, stacked = _link(logits)
        out = torch.empty(G, B, C, device=labels.device, dtype=logits[0].dtype)
        edge_losses._edge_loss_bwd[(programs, G)](
            base, node_stride, *offsets, labels, aux if grad_l is None else grad_l.contiguous(),
            aux if grad_total is None else grad_total, table.ints, table.floats, table.grads,
            aux, lse, mom, out, B, C, table.n_edges, G, len(logits), table.n_slots, 1.0 / B, STACKED=stacked,
            ROWS=rows_per, BLOCK_C=block_c,
            HAS_GRAD_L=grad_l is not None, HAS_GRAD_TOTAL=grad_total is not None, KINDS=table.kinds,
            ONE_BLOCK=_one_block(rows_per, block_c, C), num_warps=warps)
        for g, n in enumerate(table.grad_nodes):
            grads[n] = out[g]
        return None, None, None, None, *grads
