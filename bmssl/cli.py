"""The bmssl command line: `bmssl info`, `bmssl bench`, `bmssl train`, `bmssl eval` (also `python -m bmssl`,
and `torchrun --nproc_per_node=W -m bmssl train ...`). Train and eval live in bmssl.training and
bmssl.evaluation_cli; this module only parses."""
import argparse
import os
import platform
import sys
from pathlib import Path

import torch

import bmssl
from bmssl import _extension, backends
from bmssl import triton as bmssl_triton
from bmssl.interrupt import exit_status


def info(_args):
    """Versions, device, backends and build flags. An invalid BMSSL_BACKEND is reported in its
    line, the rest is still printed, and the exit status is 2."""
    print(f"bmssl {bmssl.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}), triton "
          f"{bmssl_triton.triton.__version__ if bmssl_triton.triton else 'not installed'}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name(0)} (CUDA, {torch.cuda.device_count()} visible)")
    else:
        print(f"device: cpu ({platform.machine()}, {torch.get_num_threads()} threads); no CUDA device")
    try:
        requested, problem = f"{backends.requested()} ({backends.ENV_VAR})", None
    except ValueError as error:
        requested, problem = f"none: {backends.ENV_VAR}={os.environ.get(backends.ENV_VAR)!r} is invalid", error
    print(f"backend requested: {requested}")
    print("backends:")
    for name, state in backends.status().items():
        print(f"  {name:<7} {state}")
    facts = _extension.compiled_facts()
    config = _extension.build_config()
    print("build:")
    print(f"  bmssl._C: {'loaded' if _extension.loaded() else _extension.LOAD_ERROR}")
    for key, value in {**facts, **config}.items():
        print(f"  {key}: {value}")
    if problem is not None:
        print(f"bmssl info: error: {problem}", file=sys.stderr)
        return 2
    return 0


QUICK = {  # `bmssl bench <op> --quick`: one small sweep, no torch.compile, a few seconds
    "kl_bootstrap": dict(rows=[16384], classes=[5, 64], no_compile=True, no_memory=True, repeats=10),
    "ntxent": dict(batches=[2048], views=[2], no_compile=True, no_memory=True, repeats=5),
}


QUICK_SHAPES = {"kl_bootstrap": "rows 16384, classes 5 and 64", "ntxent": "B 2048, M 2"}


def bench(args):
    """`bmssl bench <op>`; --quick sets the QUICK sweep for every flag not given on the command
    line (a flag given with the value of its default counts as given)."""
    from bmssl.bench import kl_bootstrap, ntxent

    module = {"kl_bootstrap": kl_bootstrap, "ntxent": ntxent}[args.op]
    if args.quick:
        given = flags_given(module, args.argv[args.argv.index(args.op) + 1:])
        for key, value in QUICK[args.op].items():
            if key not in given:
                setattr(args, key, value)
    module.main(args)
    return 0


def flags_given(module, argv):
    """The dests of the op's flags that appear in argv (its own parser with every default
    suppressed: what is left after parsing was given)."""
    parser = argparse.ArgumentParser(add_help=False)
    module.add_arguments(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))


def build_parser():
    parser = argparse.ArgumentParser(prog="bmssl", description="Bootstrapped Meta Self-Supervised "
                                     "Learning: fused kernels and engine.")
    parser.add_argument("--version", action="version", version=f"bmssl {bmssl.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, backends, device and build flags").set_defaults(
        run=_guarded(info, "info"))
    bench_parser = commands.add_parser("bench", help="benchmark an op against plain PyTorch and torch.compile")
    ops = bench_parser.add_subparsers(dest="op", required=True)
    from bmssl.bench import kl_bootstrap, ntxent

    for name, module in (("kl_bootstrap", kl_bootstrap), ("ntxent", ntxent)):
        op_parser = ops.add_parser(name, help=module.__doc__.splitlines()[0])
        op_parser.add_argument("--quick", action="store_true",
                               help="a small sweep (" + QUICK_SHAPES[name] + "), no torch.compile: a few seconds "
                                    "(flags given with it still apply)")
        module.add_arguments(op_parser)
        op_parser.set_defaults(run=_guarded(bench, "bench"))

    from bmssl import evaluation_cli, training

    train_parser = commands.add_parser(
        "train", help="train θ with bmssl, metassl, simclr (or none: scratch) and checkpoint it",
        description="Train on unlabelled images (paper §4.1 tasks), write RUN_DIR/checkpoint.pt, results.json "
                    "and curves.png; optionally evaluate few-shot at the end. Under torchrun, tasks are sharded "
                    "across ranks and meta-gradients averaged (gloo on CPU).")
    training.add_train_arguments(train_parser)
    train_parser.set_defaults(run=_guarded(training.main, "train"))
    eval_parser = commands.add_parser(
        "eval", help="few-shot accuracy of checkpoints (and a scratch baseline) on held-out classes",
        description="N-way K-shot episodes from the test classes; proto and/or finetune protocols; mean ± 95% CI.")
    evaluation_cli.add_eval_command_arguments(eval_parser)
    eval_parser.set_defaults(run=_guarded(evaluation_cli.main, "eval"))
    return parser


def _guarded(command, name):
    """Run a subcommand; its clear errors (bad values, missing or unwritable files, a non-finite
    loss) end the program with exit status 2 and one line on stderr instead of a traceback."""

    def run(args):
        try:
            return command(args)
        except (ValueError, OSError, FloatingPointError) as error:
            print(f"bmssl {name}: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as interrupt:
            print(f"bmssl {name}: interrupted{_resume_hint(args) if name == 'train' else ''}", file=sys.stderr)
            return exit_status(interrupt)

    return run


def _resume_hint(args) -> str:
    """Where `bmssl train` can continue from, named: the run directory, if it holds a checkpoint."""
    from bmssl import run_files

    given = getattr(args, "out", None) or getattr(args, "resume", None)
    if not given:
        return ""
    run_dir = Path(given).expanduser()
    run_dir = run_dir.parent if run_dir.is_file() else run_dir
    if (run_dir / run_files.CHECKPOINT_NAME).is_file():
        return f"; continue from its last checkpoint with --resume {run_dir}"
    return f"; {run_dir} holds no checkpoint yet, so there is nothing to resume"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
