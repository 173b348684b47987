"""Benchmark of the multi-view NT-Xent: forward, backward, forward+backward and peak memory.

Providers: "torch" (the eager twin: builds the B x B matrix), "torch_compile" (the twin under
torch.compile), "bmssl-<backend>" for each compiled backend that can serve the input, and the
peer "inf-cl" (Inf-CL's fused contrastive loss, `from inf_cl import cal_inf_loss`) for M = 2 on
CUDA when inf_cl is importable. inf-cl computes the same B x B similarities (every row against
every row, the other view as the one positive) but keeps the anchor itself in the denominator
and runs its dots in fp32/tf32 whatever the input dtype: a speed peer, not the same loss.
A provider that cannot run a case is skipped with the reason printed.
Peak memory: on CUDA the allocator's peak; on CPU the peak resident-memory rise of a fresh
process that runs one forward+backward (python -m bmssl.bench.ntxent --memory-child ...).
"""
import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from bmssl import reference
from bmssl.bench import common
from bmssl.ops.ntxent import SUPPORT, ntxent
from bmssl.progress import progress

DTYPES = common.DTYPES


INF_CL_DIMS = (16, 32, 64, 128, 256)  # cal_inf_loss's head_dim: the whole row is one head


def inf_cl_reason(device, views, dim):
    """Why the inf-cl provider cannot run this case, or None."""
    if device.type != "cuda":
        return f"inf-cl runs on CUDA only, these tensors are on {device.type}"
    if views != 2:
        return f"inf-cl takes one positive per anchor (M = 2), not M = {views}"
    if dim not in INF_CL_DIMS:
        return f"inf-cl takes d in {INF_CL_DIMS}, not {dim}"
    try:
        import inf_cl  # noqa: F401
    except Exception as error:  # not installed, or its triton/torch import failed
        return f"inf_cl is not importable ({type(error).__name__}: {error})"
    return None


def providers(device, dtype, with_compile, views=2, dim=128, say=print, only=None):
    """The providers of one case (of `only`, when given); say(message) reports each one left out
    and why."""
    names = common.bmssl_providers(SUPPORT, device, dtype, with_compile, shape=(dim,))  # limits read d only
    reason = inf_cl_reason(device, views, dim)
    if reason is None:
        names.append("inf-cl")
    elif not only or "inf-cl" in only:
        say(f"provider inf-cl skipped: {reason}")
    if only:
        for name in only:
            if name not in names:
                say(f"provider {name} skipped ({dtype}, d = {dim}, M = {views}, {device}): "
                    f"{provider_reason(name, device, dtype, dim, with_compile) or reason}")
        names = [name for name in names if name in only]
    return names


def provider_reason(name, device, dtype, dim, with_compile):
    """Why a bmssl or torch_compile provider cannot run here (None for inf-cl: inf_cl_reason)."""
    from bmssl import backends

    if name == "torch_compile" and not with_compile:
        return "--no-compile leaves it out"
    if name.startswith("bmssl-"):
        backend = name.removeprefix("bmssl-")
        if backend == "triton" and device.type == "cpu":
            return "Triton on CPU tensors is its interpreter, a correctness tool that is not timed"
        return backends.input_reason(backend, SUPPORT, device, dtype, (dim,))
    return None


def inf_cl_loss(temperature):
    """Inf-CL on the M = 2 layout (rows 2j and 2j + 1 are image j's views): each row against all
    rows, its partner as the label. Normalised first, as the bmssl providers are."""
    from inf_cl import cal_inf_loss

    def loss(z, labels):
        u = F.normalize(z, dim=-1)
        partner = torch.arange(z.shape[0], device=z.device) ^ 1
        return cal_inf_loss(u / temperature, u, labels=partner, head_dim=z.shape[-1])

    return loss


def loss_fn(provider, temperature, variant):
    if provider == "torch":
        return lambda z, labels: reference.ntxent(z, labels, temperature, variant)
    if provider == "torch_compile":
        # the backward-only timing reuses one graph (retain_graph), which donated buffers forbid
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        return torch.compile(lambda z, labels: reference.ntxent(z, labels, temperature, variant))
    if provider == "inf-cl":
        return inf_cl_loss(temperature)
    backend = provider.removeprefix("bmssl-")
    return lambda z, labels: ntxent(z, labels, temperature, variant, backend=backend)


def inputs(batch, dim, views, dtype, device, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(batch, dim, device=device, generator=generator).to(dtype).requires_grad_()
    labels = torch.arange(batch // views, device=device).repeat_interleave(views)
    return z, labels


def memory_child(argv):
    """One forward+backward in this fresh process; prints its peak RSS rise as JSON."""
    provider, batch, dim, views, dtype_name, variant = argv
    common.print_peak_of_forward_backward(
        loss_fn(provider, 0.1, variant), inputs(int(batch), int(dim), int(views), DTYPES[dtype_name], torch.device("cpu")))


def run(device, batches, dims, views_list, dtypes, variant, with_compile, repeats, memory=True,
        show_progress=True, only=None, out=None):
    """(the sweep's rows, the number of points that failed); with `out`, <out>.csv and .json are
    rewritten after every point, so a sweep stopped part-way keeps what it measured."""
    env = common.environment(device)
    said = set()

    def say(message):
        if message not in said:
            said.add(message)
            print(message, file=sys.stderr)

    grid = [(b, d, m, t, p) for b, d, m, t in itertools.product(batches, dims, views_list, dtypes)
            for p in providers(device, DTYPES[t], with_compile, m, d, say, only)]
    if not grid:
        raise ValueError(f"nothing to run: none of the providers {' '.join(only or [])} can run these cases on "
                         f"{device} (see the reasons above)")
    results, failures = [], 0
    for batch, dim, views, dtype_name, provider in progress(grid, desc="ntxent", disable=not show_progress):
        params = {"B": batch, "d": dim, "M": views, "dtype": dtype_name, "variant": variant}
        z, labels = inputs(batch, dim, views, DTYPES[dtype_name], device)
        try:
            mode_failures = []
            timings = common.time_modes(loss_fn(provider, 0.1, variant), (z, labels), device, repeats,
                                        failures=mode_failures)
            for mode, error in mode_failures:  # the modes measured are kept
                common.point_failed("ntxent", provider, {**params, "mode": mode}, error)
                failures += 1
            if memory and device.type == "cpu" and "fwd+bwd" in timings:
                timings["fwd+bwd"]["peak_bytes"] = common.peak_cpu_bytes_in_subprocess(
                    "bmssl.bench.ntxent", [provider, batch, dim, views, dtype_name, variant])
        except Exception as error:  # out of memory, a peer's own limits: report it, keep the sweep
            common.point_failed("ntxent", provider, params, error)
            failures += 1
            del z, labels
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for mode, stats in timings.items():
            for metric, value in stats.items():
                results.append(common.row(env, "ntxent", provider, mode, metric, params, value))
        if out is not None:
            common.write(results, out)
    return results, failures


def summary(results):
    """fwd+bwd median and peak memory of each provider, with ratios to the eager twin."""
    table = {}
    for r in results:
        if r["mode"] == "fwd+bwd" and r["metric"] in ("median_ms", "peak_bytes"):
            table.setdefault((r["params"], r["provider"]), {})[r["metric"]] = r["value"]
    width = max([len("shape")] + [len(params) for params, _ in table])  # the params are JSON, of any length
    lines = [f"{'shape':<{width}} {'provider':<14} {'fwd+bwd ms':>10} {'speedup':>8} {'peak MiB':>9} {'mem %':>6}"]
    for (params, provider), row in sorted(table.items()):
        base = table.get((params, "torch"), {})
        speed = f"{base['median_ms'] / row['median_ms']:7.2f}x" if base.get("median_ms") else ""
        peak = row.get("peak_bytes")
        mem = f"{100 * peak / base['peak_bytes']:5.1f}%" if peak is not None and base.get("peak_bytes") else ""
        peak_mb = f"{peak / 2**20:9.1f}" if peak is not None else ""
        lines.append(f"{params:<{width}} {provider:<14} {row['median_ms']:10.2f} {speed:>8} {peak_mb:>9} {mem:>6}")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="default: 1024 4096 8192 on CPU, 4096 16384 65536 on GPU")
    parser.add_argument("--dims", type=int, nargs="+", default=[128])
    parser.add_argument("--views", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                        help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--variant", default="in", choices=["in", "out"])
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    parser.add_argument("--providers", nargs="+", default=None,
                        help="run only these providers (e.g. torch_compile); default: all that can run")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench/results/ntxent",
                        help="prefix of the .csv and .json, rewritten after every point")


def main(args=None):
    parser = common.op_parser("ntxent", args, __doc__)
    add_arguments(parser)
    args = parser.parse_args(args) if not isinstance(args, argparse.Namespace) else args
    device = common.bench_device(args.device, parser)
    common.check_arguments(parser, args, ("batches", "dims", "views", "repeats"), common.known_providers(["inf-cl"]))
    batches = args.batches or ([1024, 4096, 8192] if device.type == "cpu" else [4096, 16384, 65536])
    if any(views < 2 for views in args.views):
        parser.error(f"--views must be >= 2 (an image's views are its positives), got {' '.join(map(str, args.views))}")
    uneven = [(b, m) for b in batches for m in args.views if b % m]
    if uneven:
        parser.error("each of --batches must be a multiple of each of --views (B rows = B/M images × M views), "
                     f"not B = {uneven[0][0]} with M = {uneven[0][1]}")
    if args.providers and args.no_compile and "torch_compile" in args.providers:
        parser.error("--providers torch_compile and --no-compile contradict each other")
    dtypes = args.dtypes or (["fp32"] if device.type == "cpu" else ["bf16"])
    common.sigterm_as_interrupt()
    try:
        results, failures = run(device, batches, args.dims, args.views, dtypes, args.variant, not args.no_compile,
                                args.repeats, memory=not args.no_memory, only=args.providers, out=args.out)
    except ValueError as error:  # nothing can run: a usage error, before anything was measured
        parser.error(str(error))
    return common.finish(results, failures, args.out, summary)


if __name__ == "__main__":
    common.entry_point(main, memory_child)
