"""Benchmark of kl_bootstrap: forward, backward, forward+backward and peak memory per provider.

Providers: "torch" (eager twin), "torch_compile" (the twin under torch.compile), and
"bmssl-<backend>" for each compiled backend that can serve the input (the Triton interpreter is
left out: it is a correctness tool, not a speed one).
Peak memory: on CUDA the allocator's peak; on CPU the peak resident-memory rise of a fresh
process that runs one forward+backward (python -m bmssl.bench.kl_bootstrap --memory-child ...).
"""
import argparse
import itertools

import torch
from bmssl.progress import progress

from bmssl import reference
from bmssl.bench import common
from bmssl.ops.kl_bootstrap import SUPPORT, kl_bootstrap

DTYPES = common.DTYPES


def providers(device, dtype, with_compile):
    return common.bmssl_providers(SUPPORT, device, dtype, with_compile)


def loss_fn(provider, temperature):
    if provider == "torch":
        return lambda s, t: reference.kl_bootstrap(s, t, temperature)
    if provider == "torch_compile":
        # the backward-only timing reuses one graph (retain_graph), which donated buffers forbid
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        return torch.compile(lambda s, t: reference.kl_bootstrap(s, t, temperature))
    backend = provider.removeprefix("bmssl-")
    return lambda s, t: kl_bootstrap(s, t, temperature, backend=backend)


def inputs(rows, classes, dtype, device):
    student = torch.randn(rows, classes, device=device, dtype=dtype, requires_grad=True)
    target = torch.randn(rows, classes, device=device, dtype=dtype)
    return student, target


def measure(provider, rows, classes, dtype, device, temperature=1.0, repeats=20):
    """{mode: timing} for one provider and shape."""
    return common.time_modes(loss_fn(provider, temperature), inputs(rows, classes, dtype, device), device, repeats)


def memory_child(argv):
    """One forward+backward in this fresh process; prints its peak RSS rise as JSON."""
    provider, rows, classes, dtype_name = argv
    common.print_peak_of_forward_backward(
        loss_fn(provider, 1.0), inputs(int(rows), int(classes), DTYPES[dtype_name], torch.device("cpu")))


def run(device, rows_list, classes_list, dtypes, with_compile, repeats, show_progress=True, out=None,
        memory=True):
    """(the sweep's rows, the number of points that failed); with `out`, <out>.csv and .json
    are rewritten after every point."""
    env = common.environment(device)
    grid = [(r, c, d, p) for r, c, d in itertools.product(rows_list, classes_list, dtypes)
            for p in providers(device, DTYPES[d], with_compile)]
    results, failures = [], 0
    for rows, classes, dtype_name, provider in progress(grid, desc="kl_bootstrap", disable=not show_progress):
        params = {"rows": rows, "classes": classes, "dtype": dtype_name}
        try:
            timings = measure(provider, rows, classes, DTYPES[dtype_name], device, repeats=repeats)
            if memory and device.type == "cpu":
                timings["fwd+bwd"]["peak_bytes"] = common.peak_cpu_bytes_in_subprocess(
                    "bmssl.bench.kl_bootstrap", [provider, rows, classes, dtype_name])
        except Exception as error:  # out of memory, ...: report it, keep the sweep
            common.point_failed("kl_bootstrap", provider, params, error)
            failures += 1
            continue
        for mode, stats in timings.items():
            for metric, value in stats.items():
                results.append(common.row(env, "kl_bootstrap", provider, mode, metric, params, value))
        if out is not None:
            common.write(results, out)
    return results, failures


def summary(results):
    """Lines comparing each provider's fwd+bwd median with the eager twin's."""
    medians = {}
    for r in results:
        if r["mode"] == "fwd+bwd" and r["metric"] == "median_ms":
            medians[(r["params"], r["provider"])] = r["value"]
    peaks = {(r["params"], r["provider"]): r["value"] for r in results
             if r["mode"] == "fwd+bwd" and r["metric"] == "peak_bytes"}
    width = max([len("shape")] + [len(params) for params, _ in medians])  # the params are JSON, of any length
    lines = [f"{'shape':<{width}} {'provider':<16} {'fwd+bwd ms':>10} {'vs torch':>9} {'peak MiB':>9}"]
    for (params, provider), value in sorted(medians.items()):
        base = medians.get((params, "torch"))
        ratio = f"{base / value:8.2f}x" if base else ""
        peak = peaks.get((params, provider))
        peak_mib = f"{peak / 2**20:9.1f}" if peak is not None else ""
        lines.append(f"{params:<{width}} {provider:<16} {value:10.3f} {ratio:>9} {peak_mib:>9}")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--classes", type=int, nargs="+", default=[5, 20, 128])
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                        help="default: fp32 on CPU, bf16 and fp32 on GPU")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="bench/results/kl_bootstrap",
                        help="prefix of the .csv and .json, rewritten after every point")


def main(args=None):
    parser = common.op_parser("kl_bootstrap", args, __doc__)
    add_arguments(parser)
    args = parser.parse_args(args) if not isinstance(args, argparse.Namespace) else args
    device = common.bench_device(args.device, parser)
    common.check_arguments(parser, args, ("rows", "classes", "repeats"), common.known_providers())
    dtypes = args.dtypes or (["fp32"] if device.type == "cpu" else ["bf16", "fp32"])
    common.sigterm_as_interrupt()
    results, failures = run(device, args.rows, args.classes, dtypes, not args.no_compile, args.repeats, out=args.out,
                            memory=not args.no_memory)
    return common.finish(results, failures, args.out, summary)


if __name__ == "__main__":
    common.entry_point(main, memory_child)
