"""The Triton kernels compile for the GPUs they target (sm_80, sm_90), at the block sizes their
launchers pick on a GPU, spilling at most a few registers (SPILL_LIMIT bytes) and within each
architecture's shared memory:
python -m bmssl.triton.aot --quick, which needs no GPU (triton.compile for a GPUTarget, Triton's
own ptxas). The interpreter tests check the maths; this checks what only a compiler sees."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")  # a fresh cache: every kernel really compiles
    done = subprocess.run([sys.executable, "-m", "bmssl.triton.aot", "--quick", "--archs", "80", "90",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=1800)
    if not out.exists():
        pytest.fail(f"bmssl.triton.aot wrote no report (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                    f"{done.stderr[-3000:]}")
    return json.loads(out.read_text()), done


def test_every_kernel_of_every_op_was_compiled(report):
    results, _ = report
    ops = {r["op"] for r in results["results"]}
    assert ops == {"ntxent", "kl_bootstrap", "sgd_unroll_step", "group_norm"}
    kernels = {(r["op"], r["kernel"]) for r in results["results"]}
    assert len(kernels) >= 11, kernels  # ntxent 4, group_norm 3, kl_bootstrap 2, sgd 2
    assert {r["arch"] for r in results["results"]} == {80, 90}


def test_no_compile_error_spill_or_shared_memory_overflow(report):
    results, done = report
    shared_limit = {int(arch): limit for arch, limit in results["shared_limit"].items()}
    bad = []
    for r in results["results"]:
        if not r["ok"]:
            bad.append(f"sm_{r['arch']} {r['op']} {r['case']} {r['launch']}: {r['error'][:400]}")
        elif (max(r["spill_stores"], r["spill_loads"]) > results["spill_limit"]
              or r["shared_bytes"] > shared_limit[r["arch"]]):
            bad.append(f"sm_{r['arch']} {r['op']} {r['case']} {r['launch']}: {r['registers']} regs, spills "
                       f"{r['spill_stores']}/{r['spill_loads']} B, {r['shared_bytes']} B shared")
    assert not bad, "\n".join(bad)
    assert not any(r["problems"] for r in results["results"])
    assert done.returncode == 0, done.stdout[-2000:]


def test_16bit_forward_and_backward_use_hoppers_warpgroup_mma(report):
    """On sm_90 the bf16 NT-Xent forward and backward at d = 128 (the GPU benchmark's shape) compile
    to wgmma, Hopper's fast tensor-core path, not Ampere's mma.sync; on sm_80 every 16-bit
    NT-Xent kernel uses mma.sync, and the fp32 ones (exact IEEE dots) no tensor cores at all."""
    results, _ = report
    found = {(r["arch"], r["kernel"], r["case"]): r.get("matmul") for r in results["results"]
             if r["op"] == "ntxent" and r["ok"]}
    assert found[(90, "_forward_kernel", "forward bfloat16 d=128 in")] == "wgmma"
    assert found[(90, "_backward_kernel", "backward bfloat16 d=128 in")] == "wgmma"
    for (arch, kernel, case), matmul in found.items():
        if "float32" in case:
            assert matmul is None, (arch, kernel, case)
        elif arch == 80:
            assert matmul == "mma", (arch, kernel, case)
