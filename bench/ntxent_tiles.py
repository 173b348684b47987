"""Time the Triton NT-Xent kernels over candidate GPU tiles (GPU only).

bmssl/triton/ntxent.py's GPU_TILES were chosen from ptxas's register and shared-memory figures
(python -m bmssl.triton.aot), not from timings. This times each kernel with each candidate tile
at one shape (default bf16, B = 16384, d = 128, M = 2, variant "in") and prints, per kernel, the
candidates fastest first, so the table can be set from measurements:

    python bench/ntxent_tiles.py --out bench/results/gpu/ntxent_tiles
    python bench/ntxent_tiles.py --dtype fp32 --dim 256

A candidate is (BLOCK_M = BLOCK_N, num_warps, num_stages). The forward, backward and the two
double-backward passes are timed separately: "double_pass1" and "double_pass2" each vary with the
other pass kept at GPU_TILES' choice, and report the whole double backward's time. Every candidate's
output is checked against GPU_TILES' own before it is timed; one that differs is reported and
left out.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

from bmssl.bench import common

CANDIDATES = [(16, 4, 3), (16, 8, 3), (32, 4, 3), (32, 8, 3), (32, 8, 2), (64, 4, 3), (64, 8, 3), (64, 8, 2),
              (128, 8, 3)]
KERNELS = ("forward", "backward", "double_pass1", "double_pass2")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--variant", default="in", choices=["in", "out"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="prefix of a .csv and .json of the timings")
    args = parser.parse_args(argv)
    if args.out:
        common.check_arguments(parser, args, ("batch", "dim", "views", "repeats"), ())
    if not torch.cuda.is_available():
        sys.exit("bench/ntxent_tiles.py times GPU tiles and needs a CUDA GPU; none is visible to torch")
    from bmssl.triton import ntxent as kernels

    device, dtype = torch.device("cuda"), common.DTYPES[args.dtype]
    group = "fp32" if dtype == torch.float32 else "16bit"
    generator = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(1, args.batch, args.dim, generator=generator), dim=-1).to(device, dtype)
    labels = (torch.arange(args.batch) // args.views)[None].to(device)
    v = torch.randn(1, args.batch, args.dim, generator=generator).to(device, dtype)
    grad_task = torch.ones(1, device=device)
    inv_tau = 10.0
    _, stats = kernels.forward(u, labels, inv_tau, args.variant)
    calls = {
        "forward": lambda: kernels.forward(u, labels, inv_tau, args.variant),
        "backward": lambda: kernels.backward(grad_task, u, labels, stats, inv_tau, args.variant),
        "double_pass1": lambda: kernels.double_backward(v, grad_task, u, labels, stats, inv_tau, args.variant),
        "double_pass2": lambda: kernels.double_backward(v, grad_task, u, labels, stats, inv_tau, args.variant),
    }
    env = common.environment(device)
    rows, chosen = [], dict(kernels.GPU_TILES)
    for kernel in KERNELS:
        key = (kernel, group)
        reference = calls[kernel]()
        results = []
        for block, warps, stages in CANDIDATES:
            kernels.GPU_TILES[key] = ((kernels.MAX_DIM, block, warps, stages),)
            try:
                out = calls[kernel]()
                torch.cuda.synchronize()
                close = all(torch.allclose(o.float(), r.float(), rtol=2e-2, atol=1e-3)
                            for o, r in zip(_tensors(out), _tensors(reference)))
                if not close:
                    print(f"{kernel} {block}/{warps}/{stages}: output differs from GPU_TILES' tile, left out")
                    continue
                timing = common.time_ms(calls[kernel], device, repeats=args.repeats)
            except Exception as error:  # out of resources, a compile error: say so, go on
                print(f"{kernel} {block}/{warps}/{stages}: {type(error).__name__}: {str(error)[:200]}")
                continue
            finally:
                kernels.GPU_TILES[key] = chosen[key]
            results.append(((block, warps, stages), timing["median_ms"]))
            params = {"kernel": kernel, "dtype": args.dtype, "B": args.batch, "d": args.dim, "M": args.views,
                      "variant": args.variant, "block": block, "num_warps": warps, "num_stages": stages}
            for metric, value in timing.items():
                rows.append(common.row(env, "ntxent_tile", "bmssl-triton", kernel, metric, params, value))
            if args.out:  # after every tile: a session cut short keeps what it timed
                common.write(rows, args.out)
        meta = kernels._config(u, kernel)[1]  # the tile GPU_TILES gives this d
        current = (meta["BLOCK_M"], meta["num_warps"], meta["num_stages"])
        print(f"\n{kernel} ({args.dtype}, B = {args.batch}, d = {args.dim}); GPU_TILES has {current}")
        for tile, ms in sorted(results, key=lambda r: r[1]):
            print(f"  block {tile[0]:>3}  warps {tile[1]}  stages {tile[2]}  {ms:9.3f} ms"
                  f"{'  <- GPU_TILES' if tile == current else ''}")
    if args.out and rows:
        for path in common.output_paths(args.out):
            print(f"wrote {path}")


def _tensors(out):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


if __name__ == "__main__":
    main()
