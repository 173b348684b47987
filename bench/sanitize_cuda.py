"""Every CUDA C++ kernel of bmssl once, on small shapes off the tiles, for compute-sanitizer on the
GPU machine (bench/gpu_session.sh runs both):

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/sanitize_cuda.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 bench/sanitize_cuda.py --quick

The kernels had been compiled but never run when this was written: the sanitizer names an
out-of-bounds access or a shared-memory race by kernel and source line (-lineinfo), where a test
would only see wrong numbers. The cases: ntxent's forward, backward and double backward (one
Hessian-vector product) in fp16, bf16, fp32 and fp64, both variants, on B and d that are not
multiples of the tiles (B = 37 and 130 against 32/64-row tiles; d = 33 with no 16-byte loads, d = 200
past one 128-deep chunk), two tasks in one launch; kl_bootstrap's forward and backward on ragged
rows and classes; sgd_unroll_step over tensors of odd sizes. Beyond finiteness nothing is checked
here: the tests (pytest -m gpu) check the numbers. --quick: fp32 and bf16, one shape, "in" only.
--device cpu runs the same cases through the C++ CPU kernels (what tests/test_build.py does, to
keep this script working where there is no GPU).
"""
import argparse
import sys

import torch

from bmssl import kl_bootstrap, ntxent
from bmssl.ops.sgd import sgd_unroll_step


def ntxent_case(device, tasks, batch, dim, dtype, variant):
    generator = torch.Generator(device=device).manual_seed(batch * dim)
    z = torch.randn(tasks, batch, dim, device=device, generator=generator).to(dtype).requires_grad_()
    labels = (torch.arange(batch, device=device) % (batch // 2)).expand(tasks, -1)  # each label twice or more
    loss = ntxent(z, labels, temperature=0.2, variant=variant, backend=device)
    (grad,) = torch.autograd.grad(loss, z, create_graph=True)
    (hvp,) = torch.autograd.grad(grad, z, grad_outputs=torch.randn_like(grad))
    return [loss, grad, hvp]


def kl_case(device, rows, classes, dtype):
    generator = torch.Generator(device=device).manual_seed(rows * classes)
    student = (3 * torch.randn(rows, classes, device=device, generator=generator)).to(dtype).requires_grad_()
    target = (3 * torch.randn(rows, classes, device=device, generator=generator)).to(dtype)
    loss = kl_bootstrap(student, target, temperature=2.0, backend=device)
    (grad,) = torch.autograd.grad(loss, student)
    return [loss, grad]


def sgd_case(device, dtype):
    params = [torch.randn(*shape, device=device).to(dtype) for shape in [(7,), (3, 5, 11), (64, 33), (1,)]]
    grads = [torch.randn_like(p) for p in params]
    return sgd_unroll_step(params, grads, 0.1, backend=device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fp32 and bf16, one shape (for racecheck, which is slow)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: the same cases on the C++ CPU kernels (a check of this script)")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/sanitize_cuda.py runs the CUDA kernels and needs a CUDA GPU; none is visible to torch")
    dtypes = [torch.float32, torch.bfloat16] if args.quick else [torch.float16, torch.bfloat16, torch.float32,
                                                                  torch.float64]
    shapes = [(2, 37, 33)] if args.quick else [(2, 37, 33), (1, 130, 200), (1, 2, 1)]
    variants = ["in"] if args.quick else ["in", "out"]
    cases = [(f"ntxent {dtype} T,B,d={shape} {variant}", lambda s=shape, t=dtype, v=variant: ntxent_case(device, *s, t, v))
             for dtype in dtypes for shape in shapes for variant in variants]
    cases += [(f"kl_bootstrap {dtype} {rows}x{classes}", lambda r=rows, c=classes, t=dtype: kl_case(device, r, c, t))
              for dtype in dtypes for rows, classes in ([(37, 5)] if args.quick else [(37, 5), (3, 1000)])]
    cases += [(f"sgd_unroll_step {dtype}", lambda t=dtype: sgd_case(device, t)) for dtype in dtypes]
    bad = []
    for name, run in cases:
        outputs = run()
        if device == "cuda":
            torch.cuda.synchronize()
        finite = all(torch.isfinite(o).all().item() for o in outputs)
        print(f"{name}: {'ok' if finite else 'NOT FINITE'}", flush=True)
        bad += [] if finite else [name]
    print(f"{len(cases)} cases ran, {len(bad)} not finite" + (f": {bad}" if bad else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
