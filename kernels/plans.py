"""Launch plans of the kernels (rows per program, classes per block, warps), in plain Python with
the GPU's SM count as a parameter: a machine without the GPU (the tests, the compile report of
benchmarks/compile_kernels.py) computes the plans that GPU gets."""
from __future__ import annotations

import functools

import torch
import triton


def multiprocessors(device: torch.device) -> int | None:
    """The device's SM count; None off a GPU, where the kernels run in Triton's interpreter."""
    if device.type != "cuda":
        return None
    return _sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def edge_plan(B: int, C: int, sms: int | None, max_block_c: int, tile: int) -> tuple[int, int, int, int]:
    """(rows per program, classes per block, warps, programs) of the edge-loss kernels. On a GPU of
    `sms` SMs: enough programs to fill it at small B, enough bytes per program at large B. In the
    interpreter (sms None) every program costs host time."""
    block_c = min(triton.next_power_of_2(C), max_block_c)
    if sms is None:
        rows = max(1, 4 * max_block_c // block_c)
    else:
        rows = min(max(1, tile // block_c), max(1, triton.next_power_of_2(triton.cdiv(B, 2 * sms))))
    rows = min(rows, triton.next_power_of_2(B))
    return rows, block_c, max(1, min(8, rows * block_c // 256)), triton.cdiv(B, rows)


def attention_plan(H: int, W: int) -> tuple[int, int]:
    """(pixels per block, warps) of the attention kernels: one block holds a whole map."""
    return triton.next_power_of_2(H * W), 4
