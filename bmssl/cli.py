"""The bmssl command line: `bmssl info`, `bmssl bench` (also `python -m bmssl`)."""
import argparse
import platform
import sys

import torch

import bmssl
from bmssl import _extension, backends
from bmssl import triton as bmssl_triton


def info(_args):
    print(f"bmssl {bmssl.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}), triton "
          f"{bmssl_triton.triton.__version__ if bmssl_triton.triton else 'not installed'}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name(0)} (CUDA, {torch.cuda.device_count()} visible)")
    else:
        print(f"device: cpu ({platform.machine()}, {torch.get_num_threads()} threads); no CUDA device")
    print(f"backend requested: {backends.requested()} (BMSSL_BACKEND)")
    print("backends:")
    for name, state in backends.status().items():
        print(f"  {name:<7} {state}")
    facts = _extension.compiled_facts()
    config = _extension.build_config()
    print("build:")
    print(f"  bmssl._C: {'loaded' if _extension.loaded() else _extension.LOAD_ERROR}")
    for key, value in {**facts, **config}.items():
        print(f"  {key}: {value}")
    return 0


def bench(args):
    if args.op == "kl_bootstrap":
        from bmssl.bench import kl_bootstrap as module
    if args.quick:
        args.rows, args.classes, args.no_compile, args.repeats = [16384], [5, 64], True, 10
    module.main(args)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="bmssl", description="Bootstrapped Meta Self-Supervised "
                                     "Learning: fused kernels and engine.")
    parser.add_argument("--version", action="version", version=f"bmssl {bmssl.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, backends, device and build flags").set_defaults(run=info)
    bench_parser = commands.add_parser("bench", help="benchmark an op against plain PyTorch")
    bench_parser.add_argument("op", nargs="?", default="kl_bootstrap", choices=["kl_bootstrap"])
    bench_parser.add_argument("--quick", action="store_true",
                              help="one small shape, eager PyTorch only: a few seconds")
    from bmssl.bench import kl_bootstrap

    kl_bootstrap.add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
