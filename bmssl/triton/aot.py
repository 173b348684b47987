"""Compile bmssl's Triton kernels for a GPU architecture ahead of time, on a machine without a GPU.

    python -m bmssl.triton.aot                      # sm_80 and sm_90, a table
    python -m bmssl.triton.aot --archs 90 --json report.json

Triton's interpreter, the only way its kernels run without a GPU, checks the maths but not what
the compiler accepts (tl.dot shapes and dtypes, layouts, what lowers to PTX) nor what the kernel
costs (registers, spills to local memory, shared memory). This module

1. runs each op's launcher (bmssl.triton.<op>.forward / backward / ...) on `meta` tensors, with
   JITFunction.run replaced by a recorder: the launcher picks the block sizes a GPU run picks (its
   CPU-only interpreter branches test for device "cpu"), and every launch is kept, not run;
2. compiles each recorded launch with triton.compile for GPUTarget("cuda", arch, 32), through
   every stage (ttir, ttgir, llir, ptx, cubin: Triton's own ptxas);
3. reads registers and spill bytes from `ptxas -v` on that PTX, and shared memory from the
   compiled metadata.

The kernels must be JITFunctions, not interpreted ones, so this runs in a process of its own
with BMSSL_TRITON_AOT=1 (the command above starts one), where bmssl leaves the interpreter off.
Launch options (num_warps, num_stages) are the launcher's, Triton's defaults where it gives none.
No argument is specialised: a GPU run adds divisibility hints, which change the code generated,
not whether it compiles.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("BMSSL_TRITON_AOT") != "1":
    # bmssl (imported before this module) has switched the interpreter on where there is no GPU:
    # start again in a process where it leaves it off
    if __name__ != "__main__":
        raise ImportError("bmssl.triton.aot runs as a command of its own: python -m bmssl.triton.aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["BMSSL_TRITON_AOT"] = "1"
    os.execve(sys.executable, [sys.executable, "-m", "bmssl.triton.aot", *sys.argv[1:]], env)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# shared memory a block may use: A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255
# spill bytes per thread a launch may have: a few registers' worth (ptxas spills 4-68 B in some
# kernels that it caps at 64 or 128 registers); the NT-Xent tiles used before this check existed
# spilled up to 15 KB
SPILL_LIMIT = 128
_POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
            torch.int64: "*i64", torch.int32: "*i32", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}


def _argument_type(value):
    if isinstance(value, torch.Tensor):
        return _POINTER[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a {type(value).__name__} argument")


def _constexpr_value(value):
    return value.value if isinstance(value, tl.constexpr) else value


class Launch:
    """One recorded kernel launch: the kernel, its signature and its constexprs."""

    def __init__(self, kernel, args, kwargs):
        self.kernel = kernel
        self.signature, self.constexprs = {}, {}
        names = {param.name for param in kernel.params}
        self.options = {k: v for k, v in kwargs.items() if k not in names}  # num_warps, num_stages
        values = dict(zip(kernel.arg_names, args), **{k: v for k, v in kwargs.items() if k in names})
        for param in kernel.params:
            if param.name not in values:
                raise TypeError(f"{kernel.__name__}: no value recorded for {param.name}")
            value = values[param.name]
            if param.is_constexpr:
                self.signature[param.name] = "constexpr"
                self.constexprs[param.name] = _constexpr_value(value)
            else:
                self.signature[param.name] = _argument_type(value)

    @property
    def name(self):
        return self.kernel.__name__

    def key(self):
        return (self.kernel.fn.__module__, self.name, tuple(sorted(self.signature.items())), tuple(sorted(map(str, self.constexprs.items()))),
                tuple(sorted(self.options.items())))

    def describe(self):
        shown = {k: (str(v).replace("triton.language.", "") if not isinstance(v, (bool, int, float, str)) else v)
                 for k, v in self.constexprs.items()}
        shown.update(self.options)
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in shown.items())})"


def record_launches(launcher, *args, **kwargs):
    """Every kernel launch that launcher(*args, **kwargs) makes, recorded and not run."""
    launches = []
    original = JITFunction.run

    def record(self, *run_args, grid, warmup, **run_kwargs):
        launches.append(Launch(self, run_args, run_kwargs))

    JITFunction.run = record
    try:
        launcher(*args, **kwargs)
    finally:
        JITFunction.run = original
    return launches


def _ptxas_usage(ptx, arch):
    """(registers, spill store bytes, spill load bytes) from ptxas -v on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        result = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", source, "-o", os.path.join(folder, "k.cubin")],
                                capture_output=True, text=True)
    report = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {report[-2000:]}")
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return (int(registers.group(1)) if registers else None,
            int(spills.group(1)) if spills else 0, int(spills.group(2)) if spills else 0)


def matmul_instruction(ptx):
    """The tensor-core instruction the PTX multiplies with: "wgmma" (Hopper's warpgroup MMA, the
    fast path on sm_90), "mma" (mma.sync, Ampere's), or None (no tl.dot, or CUDA cores)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return None


def compile_launch(launch, arch):
    """A dict: the launch compiled for sm_<arch>, or the error the compiler raised."""
    result = {"kernel": launch.name, "launch": launch.describe(), "arch": arch}
    start = time.perf_counter()
    try:
        source = ASTSource(fn=launch.kernel, signature=launch.signature, constexprs=launch.constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
        ptx = compiled.asm["ptx"]
        registers, spill_stores, spill_loads = _ptxas_usage(ptx, arch)
        result.update(ok=True, registers=registers, spill_stores=spill_stores, spill_loads=spill_loads,
                      shared_bytes=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                      matmul=matmul_instruction(ptx))
    except Exception as error:  # the compiler's own error is the finding
        result.update(ok=False, error=f"{type(error).__name__}: {str(error)[-1500:]}")
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def problems(result):
    """What is wrong with one compiled launch: a compile error, spills, too many registers or
    too much shared memory for the architecture."""
    if not result["ok"]:
        return [result["error"]]
    found = []
    if max(result["spill_stores"], result["spill_loads"]) > SPILL_LIMIT:
        found.append(f"spills {result['spill_stores']} B stores / {result['spill_loads']} B loads "
                     f"(> {SPILL_LIMIT} B)")
    if result["registers"] is not None and result["registers"] > MAX_REGISTERS:
        found.append(f"{result['registers']} registers")
    if result["shared_bytes"] > SHARED_LIMIT[result["arch"]]:
        found.append(f"{result['shared_bytes']} B of shared memory > {SHARED_LIMIT[result['arch']]}")
    return found


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def cases(quick=False):
    """(op, description, launcher, args) for the shapes and dtypes the GPU benchmarks and the
    engine use. quick: fewer dtypes and sizes (the test suite's subset)."""
    from bmssl.triton import group_norm, kl_bootstrap, ntxent, sgd_unroll_step

    dtypes = (torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16, torch.float32)
    found = []
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        for dim in ((128, ntxent.MAX_DIM) if quick else (16, 64, 128, 200, ntxent.MAX_DIM)):
            for variant in (("in",) if quick else ("in", "out")):
                u, labels = _meta(1, 4096, dim, dtype=dtype), _meta(1, 4096, dtype=torch.int64)
                stats, scale = _meta(1, 2, 4096), _meta(1)
                what = f"{name} d={dim} {variant}"
                found += [("ntxent", f"forward {what}", ntxent.forward, (u, labels, 10.0, variant)),
                          ("ntxent", f"backward {what}", ntxent.backward, (scale, u, labels, stats, 10.0, variant)),
                          ("ntxent", f"double backward {what}", ntxent.double_backward,
                           (u, scale, u, labels, stats, 10.0, variant))]
        for classes in ((5, 1000) if quick else (5, 64, 1000, 5000)):
            s = _meta(400, classes, dtype=dtype)
            found += [("kl_bootstrap", f"forward {name} C={classes}", kl_bootstrap.forward, (s, s, 2.0)),
                      ("kl_bootstrap", f"backward {name} C={classes}", kl_bootstrap.backward,
                       (_meta(400), s, s, _meta(400, 2), 2.0))]
        params = [_meta(64, 3, 3, 3, dtype=dtype), _meta(64, dtype=dtype), _meta(5, 1600, dtype=dtype)]
        found.append(("sgd_unroll_step", f"{name}, 3 tensors", sgd_unroll_step.sgd_unroll_step, (params, params, 0.1)))
        found.append(("sgd_unroll_step", f"{name}, one tensor (CUDA graph capture)",
                      lambda p: sgd_unroll_step._sgd_one_kernel[(1,)](p, p, p, p.numel(), 0.1, BLOCK=1024),
                      (params[0],)))
        for side in ((84, 5) if quick else (84, 42, 21, 10, 28, 14, 7, 3)):
            x = _meta(4, 25, 64, side, side, dtype=dtype)
            w, b = _meta(4, 64, dtype=dtype), _meta(4, 64, dtype=dtype)
            stats = _meta(4, 25, 4, 2, dtype=torch.float32)
            # every (relu, pool) at the first size, relu + pool (the backbone's) at the others
            for relu, pool in ((True, True), (False, False), (True, False), (False, True))[:4 if side == 84 else 1]:
                y = _meta(4, 25, 64, *((side // 2, side // 2) if pool else (side, side)), dtype=dtype)
                what = f"{name} {side}x{side} relu={relu} pool={pool}"
                flags = (relu, pool)
                found += [("group_norm", f"forward {what}", group_norm.forward, (x, w, b, 4, 1e-5, *flags)),
                          ("group_norm", f"backward {what}", group_norm.backward, (y, x, w, b, stats, 4, *flags)),
                          ("group_norm", f"double backward {what}", group_norm.double_backward,
                           (x, w, b, y, x, w, b, stats, 4, *flags))]
    if not quick:  # fp64 rows keep fp64 accumulators in the KL kernels
        s = _meta(400, 64, dtype=torch.float64)
        found.append(("kl_bootstrap", "forward float64 C=64", kl_bootstrap.forward, (s, s, 2.0)))
    return found


def run(archs=(80, 90), quick=False, say=print):
    """Every distinct launch of cases(quick), compiled for each arch: a list of result dicts."""
    launches, results = {}, []
    for op, what, launcher, args in cases(quick):
        try:
            recorded = record_launches(launcher, *args)
        except Exception as error:  # the launcher itself refused these inputs: a finding too
            results.append(dict(op=op, case=what, kernel="(launcher)", launch=what, arch=None, ok=False,
                                error=f"{type(error).__name__}: {error}", seconds=0.0,
                                problems=[f"the launcher raised {type(error).__name__}: {error}"]))
            say(f"{op} {what}: the launcher raised {type(error).__name__}: {error}")
            continue
        for launch in recorded:
            launches.setdefault(launch.key(), (op, what, launch))
    for op, what, launch in launches.values():
        for arch in archs:
            result = dict(op=op, case=what, **compile_launch(launch, arch))
            found = result["problems"] = problems(result)
            results.append(result)
            usage = (f"{result['registers']:>3} regs {result['spill_stores']:>5} B spilled "
                     f"{result['shared_bytes']:>6} B smem" if result["ok"] else "did not compile")
            say(f"sm_{arch} {launch.describe():<78} {usage}  {'; '.join(found) if found else 'ok'}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--quick", action="store_true", help="the test suite's subset of shapes and dtypes")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    results = run(args.archs, args.quick)
    bad = [r for r in results if r["problems"] or not r["ok"]]
    if args.json:
        with open(args.json, "w") as handle:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
            json.dump({"triton": triton.__version__, "torch": torch.__version__, "commit": commit,
                       "archs": args.archs, "quick": args.quick, "shared_limit": SHARED_LIMIT,
                       "spill_limit": SPILL_LIMIT, "results": results}, handle, indent=1)
    print(f"{len(results)} compiles, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
