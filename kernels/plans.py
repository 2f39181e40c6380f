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


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Elements of a block per thread: registers grow with them (benchmarks/compile_kernels.py measures
# them). 16 took the edge-loss backward to 214-228 registers; 4 keep every plan at 128 or fewer, no spill.
THREAD_ELEMENTS = 4


@functools.cache
def edge_plan(B: int, C: int, sms: int | None, max_block_c: int, tile: int) -> tuple[int, int, int, int]:
    """(rows per program, classes per block, warps, programs) of the edge-loss kernels. On a GPU of
    `sms` SMs: rows of `tile` elements per program at large B, fewer where that leaves fewer than
    two programs per SM; THREAD_ELEMENTS elements per thread. In the interpreter (sms None) every
    program costs host time: many rows per program."""
    block_c = min(triton.next_power_of_2(C), max_block_c)
    if sms is None:
        rows = max(1, 4 * max_block_c // block_c)
    else:
        rows = min(max(1, tile // block_c), max(1, triton.next_power_of_2(triton.cdiv(B, 2 * sms))))
    rows = min(rows, triton.next_power_of_2(B))
    warps = max(1, min(8, rows * block_c // (32 * THREAD_ELEMENTS)))
    return rows, block_c, warps, triton.cdiv(B, rows)


def attention_plan(H: int, W: int) -> tuple[int, int]:
    """(pixels per block, warps) of the attention kernels: one block holds a whole map, THREAD_ELEMENTS
    pixels per thread up to 16 warps (a 45×45 map), 8 up to 64×64. (Fewer warps spill: at 56×56 the
    backward needs 255 registers and 176-280 bytes of stack with 4 warps, 120 and none with 16.)"""
    block = triton.next_power_of_2(H * W)
    return block, max(1, min(16, block // (32 * THREAD_ELEMENTS)))
