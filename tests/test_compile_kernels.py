"""Every Triton kernel compiles for sm_90 on this machine, GPU or not, and the launch plans the code
chooses don't spill: benchmarks/compile_kernels.py --quick (Triton's compiler and the ptxas bundled
with it, not the interpreter) compiles one case of each kernel for each dtype of the logits and maps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_edge_loss_fwd", "_edge_loss_bwd", "_att_fwd", "_att_bwd"}
DTYPES = {"fp32", "bf16", "fp16"}
# No spill at all. A spill goes to local memory, through L1/L2 at every access, in kernels whose job
# is streaming logits at memory bandwidth; the plans keep 4 elements per thread (8 for the largest
# maps), which compiles to at most ~130 registers, far from the 255 where ptxas spills. Any spill
# means a plan or a kernel crossed that line: a regression to look at, not a cost to tolerate.
MAX_SPILL_BYTES = 0


def ptxas_missing() -> str | None:
    try:
        import triton
    except ImportError:
        return "Triton is not installed"
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    missing = [tool for tool in ("ptxas", "cuobjdump") if not (bin_dir / tool).is_file()]
    return f"this Triton ships no {', '.join(missing)} in {bin_dir}" if missing else None


@pytest.mark.skipif(ptxas_missing() is not None, reason=str(ptxas_missing()))
def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    # The script unsets TRITON_INTERPRET and compiles into a fresh TRITON_CACHE_DIR of its own.
    out = tmp_path / "compile.json"
    command = [sys.executable, "benchmarks/compile_kernels.py", "--quick", "--arch", "90", "--out", str(out)]
    run = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == []
    table = result["table"]  # the most of each figure over the cases that launch a kernel with a plan
    assert {(r["kernel"], r["dtype"]) for r in table} == {(k, d) for k in KERNELS for d in DTYPES}
    for r in table:
        where = f"{r['kernel']} {r['dtype']} B={r['B']} {r['C_or_map']} plan {r['rows']}/{r['block']}/{r['warps']}"
        assert r["arch"] == "sm_90" and 0 < r["registers"] <= 255, where
        assert r["spill_stores"] <= MAX_SPILL_BYTES and r["spill_loads"] <= MAX_SPILL_BYTES, (
            f"{where} spills: {r}"
        )
    assert "_att_bwd" in run.stdout and "regs" in run.stdout  # the table is printed
