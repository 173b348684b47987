"""Time per outer step and peak memory of one BMSSL / MetaSSL meta-gradient. Providers:

    (a) baseline: bench/unroll_baseline.py, a Python loop over tasks, autograd.grad(create_graph)
        per inner step, per-parameter updates, eager losses (learn2learn style)
    (b) engine_torch: bmssl.meta's engine with the pure-PyTorch twins (BMSSL_BACKEND=torch)
    (c) engine_fused: the same engine with the fused kernels (BMSSL_BACKEND=auto); its tasks run
        as task_batching="auto" says: a loop on CPU, torch.func.vmap on CUDA
    (c') engine_fused_vmap: (c) with task_batching="vmap" everywhere
    (c'') engine_fused_checkpointed: (c) with checkpoint_inner_steps=True
    (d) engine_fused_graph: (c) captured once as a CUDA graph and replayed (bmssl.cuda_graph) -- CUDA only
    (d') engine_fused_compiled: (c) under torch.compile(mode="reduce-overhead") -- CUDA only, not in the
        default list (it compiles per shape, and autograd.grad inside breaks its graph)

Configurations: omniglot (Conv4, 28x28x1) and mini (Conv4, 84x84x3), 5 ways, M1 = 1, M2 = 5.
Random images and a seeded θ: every provider computes the same meta-gradient. At each point the
baseline runs first and grad_rel_diff is each provider's distance to its meta-gradient (to the
first provider's when the baseline is not run or fails there; the rows name it: grad_reference).
Flags and --out are checked before anything runs; the CSV and JSON are rewritten after every
point; a failing point is reported and makes the exit status 1; a run that measures nothing
leaves earlier files alone; Ctrl-C or SIGTERM kills the running child and keeps the rows.

    python bench/bench_unroll.py --configs mini --inner-steps 5 --target-steps 5 --tasks 4
    python bench/bench_unroll.py --configs omniglot mini --inner-steps 1 5 10 --target-steps 0 5 10 20 --tasks 1 4 8
    python bench/bench_unroll.py --memory-vs-steps 1 2 4 8 --configs mini --tasks 1   # peak memory against L
"""
import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unroll_baseline  # noqa: E402

from bmssl.bench import common  # noqa: E402
from bmssl.cuda_graph import CapturedMetaGradient  # noqa: E402
from bmssl.meta import MetaConfig, detached, meta_gradient  # noqa: E402
from bmssl.models import FewShotModel, build_backbone  # noqa: E402
from bmssl.progress import progress  # noqa: E402
from bmssl.tasks import TaskBatch  # noqa: E402

CONFIGS = {"omniglot": (1, 28, 28), "mini": (3, 84, 84)}
WAYS, SUPPORT_VIEWS, QUERY_VIEWS = 5, 1, 5
DTYPE_VAR = "BMSSL_BENCH_UNROLL_DTYPE"  # set by --dtype, read by setup() here and in the child processes


# provider -> (BMSSL_BACKEND, MetaConfig fields that say how the engine runs)
PROVIDERS = {
    "baseline": ("torch", {}),
    "engine_torch": ("torch", {}),
    "engine_fused": ("auto", {}),
    "engine_fused_vmap": ("auto", {"task_batching": "vmap"}),
    "engine_fused_checkpointed": ("auto", {"checkpoint_inner_steps": True}),
    "engine_fused_graph": ("auto", {}),
    "engine_fused_compiled": ("auto", {}),
}
CUDA_ONLY = ("engine_fused_graph", "engine_fused_compiled")
# on CUDA task_batching="auto" is vmap, so (c') would repeat (c): (d) takes its place
DEFAULT_PROVIDERS = {"cpu": ("baseline", "engine_torch", "engine_fused", "engine_fused_vmap"),
                     "cuda": ("baseline", "engine_torch", "engine_fused", "engine_fused_graph")}
MEMORY_PROVIDERS = ("baseline", "engine_fused", "engine_fused_checkpointed")


def setup(config_name, inner_steps, target_steps, tasks, order, method, device, seed=0, **execution):
    """(model, θ, batch, MetaConfig) with random images: timing does not depend on content.
    `execution`: MetaConfig fields that choose how the engine runs (task_batching, ...)."""
    shape = CONFIGS[config_name]
    config = MetaConfig(method=method, inner_steps=inner_steps, target_steps=target_steps, order=order,
                        seed=seed, **execution)
    dtype = getattr(torch, os.environ.get(DTYPE_VAR, "float32"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the projection head too: every provider and process gets the same θ
        model = FewShotModel(build_backbone("conv4", shape, seed=seed), config.projection_dim).to(device, dtype)
    generator = torch.Generator().manual_seed(seed)
    support = torch.rand(tasks, WAYS * SUPPORT_VIEWS, *shape, generator=generator, dtype=dtype)
    query = torch.rand(tasks, WAYS * QUERY_VIEWS, *shape, generator=generator, dtype=dtype)
    labels = lambda views: torch.arange(WAYS).repeat_interleave(views).expand(tasks, -1)  # noqa: E731
    batch = TaskBatch(support.to(device), labels(SUPPORT_VIEWS).to(device), query.to(device),
                      labels(QUERY_VIEWS).to(device), torch.arange(tasks * WAYS).view(tasks, WAYS))
    theta = {n: v.detach().requires_grad_() for n, v in model.meta_parameters().items()}
    return model, theta, batch, config


def provider_fn(name, model, theta, batch, config):
    """A callable returning (grads, loss) for one outer step."""
    if name == "baseline":
        return lambda: unroll_baseline.outer_gradient(model, theta, batch, config)

    def engine():
        grads, loss, _ = meta_gradient(model, detached(theta), batch, config)
        return grads, loss

    if name == "engine_fused_graph":
        captured = CapturedMetaGradient(model, detached(theta), batch, config)
        return lambda: captured(theta, batch)[:2]
    if name == "engine_fused_compiled":
        return torch.compile(engine, mode="reduce-overhead")
    return engine


def provider_setup(name, setup_args, device):
    backend, execution = PROVIDERS[name]
    os.environ["BMSSL_BACKEND"] = backend
    model, theta, batch, config = setup(*setup_args, device=device, **execution)
    return provider_fn(name, model, theta, batch, config)


def run_provider(name, setup_args, repeats, device):
    """(timing, the meta-gradient of the last timed call). On CPU each provider runs in a fresh
    process: in one process the later providers found the heap the earlier ones had grown, so
    they skipped the page faults that the first one paid (up to 40% faster, measured)."""
    if device.type == "cpu":
        return _timing_in_child(name, setup_args, repeats)
    return _timing(name, setup_args, repeats, device)


def _timing(name, setup_args, repeats, device):
    fn, last = provider_setup(name, setup_args, device), {}

    def keep():
        last["grads"] = fn()[0]

    return common.time_ms(keep, device, warmup=1, repeats=repeats, max_seconds=120), last["grads"]


def timing_child(argv):
    """python bench/bench_unroll.py --timing-child NAME REPEATS GRADS_PATH SETUP...: times the
    provider, saves its meta-gradient to GRADS_PATH and prints the timing as JSON."""
    name, repeats, grads_path, config_name, inner, target, tasks, order, method = argv
    setup_args = (config_name, int(inner), int(target), int(tasks), int(order), method)
    timing, grads = _timing(name, setup_args, int(repeats), torch.device("cpu"))
    torch.save(grads, grads_path)
    print(json.dumps(timing))


def _timing_in_child(name, setup_args, repeats):
    with tempfile.TemporaryDirectory() as scratch:  # removed on the way out, interrupted or not
        grads_path = str(Path(scratch) / "grads.pt")
        timing = _child(["--timing-child", name, repeats, grads_path, *setup_args], timeout=7200)
        return timing, torch.load(grads_path)


def relative_difference(grads, reference):
    """||g - g_ref|| / ||g_ref|| over every tensor of θ."""
    num = sum((grads[n].double() - reference[n].double()).square().sum() for n in reference)
    return float((num / sum(r.double().square().sum() for r in reference.values())).sqrt())


def memory_child(argv):
    """One warm-up outer step, then the peak RSS rise and the time of a second one."""
    import time

    name, config_name, inner, target, tasks, order, method = argv
    fn = provider_setup(name, (config_name, int(inner), int(target), int(tasks), int(order), method),
                        torch.device("cpu"))
    fn()
    start = time.perf_counter()
    peak = common.peak_rss_rise(fn)
    print(json.dumps({"peak_bytes": peak, "seconds": time.perf_counter() - start}))


def _checked_arguments(argv=None):
    """(args, device), every flag checked before anything is measured (parser.error otherwise)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["mini"], choices=sorted(CONFIGS))
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[5], help="L (>= 1)")
    parser.add_argument("--target-steps", type=int, nargs="+", default=[5], help="δ (>= 0)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[4], help="K (>= 1)")
    parser.add_argument("--orders", type=int, nargs="+", default=[2], choices=[1, 2])
    parser.add_argument("--method", default="bmssl", choices=["bmssl", "metassl"],
                        help="bmssl points with --target-steps 0 run as metassl (no target at δ = 0); metassl "
                             "has no target steps and runs at δ = 0 only")
    parser.add_argument("--providers", nargs="+", choices=sorted(PROVIDERS), default=None,
                        help=f"default: {DEFAULT_PROVIDERS['cpu']} on CPU, {DEFAULT_PROVIDERS['cuda']} on CUDA "
                             f"({', '.join(CUDA_ONLY)}: CUDA only); the baseline runs first at each point")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="float64 checks that every provider computes the baseline's meta-gradient: in "
                             "float32 this random-image problem is chaotic (the baseline's own gradient moves "
                             "by ~50%% under a 1e-7 change of the images at L = δ = 5)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-vs-steps", type=int, nargs="+", metavar="L", default=None,
                        help="instead of the timing sweep: peak memory (CPU, fresh processes) of "
                             f"{', '.join(MEMORY_PROVIDERS)} for each L, and a plot")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 keeps provider ratios fair on a shared machine)")
    parser.add_argument("--out", default="bench/results/unroll",
                        help="prefix of the .csv and .json, rewritten after every point")
    args = parser.parse_args(argv)
    device = common.bench_device(args.device, parser)
    common.check_arguments(parser, args, ("inner_steps", "tasks", "repeats", "threads", "memory_vs_steps"),
                           sorted(PROVIDERS))
    if min(args.target_steps) < 0:
        parser.error(f"--target-steps must be >= 0, got {' '.join(map(str, args.target_steps))}")
    cuda_only = sorted(set(args.providers or ()) & set(CUDA_ONLY))
    if cuda_only and args.memory_vs_steps:
        parser.error(f"{', '.join(cuda_only)} run on CUDA only, and --memory-vs-steps measures on the CPU")
    if cuda_only and device.type != "cuda":
        parser.error(f"{', '.join(cuda_only)} run on CUDA only (--device {args.device})")
    return args, device


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`), raised in the main thread as Ctrl-C raises KeyboardInterrupt: the
    child being timed is killed (_child) and its temporary folder removed, instead of outliving
    the sweep."""

    exit_status = 128 + signal.SIGTERM


def _terminate(signum, frame):
    raise Terminated


def main(argv=None):
    args, device = _checked_arguments(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the child processes too
    os.environ[DTYPE_VAR] = args.dtype
    rows, failed = [], []
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        (memory_vs_steps if args.memory_vs_steps else timing_sweep)(args, device, rows, failed)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: what was measured is on disk already
        print(f"\ninterrupted: {_kept(rows, args.out, 'kept')}", file=sys.stderr)
        sys.exit(getattr(stop, "exit_status", 128 + signal.SIGINT))
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(_kept(rows, args.out, "wrote"))
    if failed or not rows:
        sys.exit(f"{len(failed)} point(s) failed: {failed}")


def _kept(rows, out, verb):
    csv_path, json_path = common.output_paths(out)
    if not rows:
        return f"nothing was measured: {csv_path} and {json_path.name} are left as they were"
    return f"{verb} {len(rows)} rows in {csv_path} and {json_path.name}"


def _ordered_providers(args, device):
    """The providers to run at each point, the baseline first: every meta-gradient is compared
    with the baseline's, or with the first provider's when the baseline is not among them."""
    providers = list(dict.fromkeys(args.providers or DEFAULT_PROVIDERS["cuda" if device.type == "cuda" else "cpu"]))
    if "baseline" in providers:
        return ["baseline"] + [p for p in providers if p != "baseline"]
    print(f"no baseline among the providers: meta-gradients are compared with {providers[0]}'s", file=sys.stderr)
    return providers


def _points(args, steps):
    """(config, L, δ, K, order) of the sweep. MetaSSL has no target steps: with --method metassl
    every point runs at δ = 0 (rather than one identical point per δ, labelled by δ)."""
    targets = list(dict.fromkeys(args.target_steps))
    if args.method == "metassl":
        if targets != [0]:
            print(f"--method metassl has no target steps: --target-steps {' '.join(map(str, targets))} ignored, "
                  "every point runs at δ = 0", file=sys.stderr)
        targets = [0]
    return list(itertools.product(args.configs, steps, targets, args.tasks, args.orders))


def _failed(failed, name, setup_args, error, what="failed"):
    failed.append((name, _params(setup_args)))
    print(f"\n{name} {_params(setup_args)} {what}:\n{error}", file=sys.stderr)


def timing_sweep(args, device, rows, failed):
    """Time every provider at every point, appending to `rows` and rewriting --out after each
    point (a sweep that stops keeps what it measured); a failing point lands in `failed`."""
    providers = _ordered_providers(args, device)
    env = common.environment(device)
    grid = [(point, name) for point in _points(args, args.inner_steps) for name in providers]
    references = {}  # point -> (provider, meta-gradient) of the first provider measured there
    for (config_name, inner, target, tasks, order), name in progress(grid, desc="unroll"):
        setup_args = (config_name, inner, target, tasks, order, _method(args.method, target))
        try:
            timing, grads = run_provider(name, setup_args, args.repeats, device)
        except Exception as error:  # a failing point (a child's error, a kernel that does not compile): say so, go on
            _failed(failed, name, setup_args, error)
            continue
        timing["steps_per_s"] = 1e3 / timing["median_ms"]
        reference, reference_grads = references.setdefault(setup_args, (name, grads))
        timing["grad_rel_diff"] = relative_difference(grads, reference_grads)
        if not args.no_memory:
            try:
                timing["peak_bytes"] = _peak_bytes(name, setup_args, device)
            except Exception as error:  # the timing is kept
                _failed(failed, name, setup_args, error, "failed in its peak-memory measurement")
        params = {**_params(setup_args), "grad_reference": reference}
        rows += [common.row(env, "unroll", name, "outer_step", metric, params, value)
                 for metric, value in timing.items()]
        common.write(rows, args.out)  # after every point: a long sweep that stops keeps what it measured
    if rows:
        print(summary(rows))


def _peak_bytes(name, setup_args, device):
    if device.type == "cpu":
        return _memory(name, setup_args)["peak_bytes"]
    # CUDA: the allocator's peak over the provider's setup and one outer step. The setup counts:
    # (d) captures its CUDA graph there, warm-ups included, and its replays allocate nothing new
    # from the graph's pool, so a peak over the step alone gave (d) about θ's size
    return common.peak_cuda_bytes(lambda: provider_setup(name, setup_args, device)(), device)


def summary(rows):
    """One line per (point, provider): ms per step, steps/s, speed-up over the baseline, peak
    memory and the meta-gradient's relative distance to the reference provider's."""
    table = {}
    for r in rows:
        params = json.loads(r["params"])
        reference = params.pop("grad_reference", "")
        cell = table.setdefault((json.dumps(params, sort_keys=True), r["provider"]), {"reference": reference})
        cell[r["metric"]] = r["value"]
    lines = [f"{'configuration':<86} {'provider':<26} {'ms/step':>9} {'steps/s':>8} {'vs (a)':>7} {'peak MiB':>8} "
             f"{'grad rel diff':>13} vs"]
    for (params, name), metrics in sorted(table.items()):
        base = table.get((params, "baseline"), {}).get("median_ms")
        ratio = f"{base / metrics['median_ms']:6.2f}x" if base else ""
        peak = f"{metrics['peak_bytes'] / 2**20:8.1f}" if "peak_bytes" in metrics else ""
        lines.append(f"{params:<86} {name:<26} {metrics['median_ms']:9.1f} {metrics['steps_per_s']:8.3f} "
                     f"{ratio:>7} {peak:>8} {metrics['grad_rel_diff']:13.1e} {metrics['reference']}")
    return "\n".join(lines)


def _method(method, target_steps):
    """δ = 0 has no bootstrapped target (w_{L+0} is w_L: the KL is 0): that point of the sweep
    is the MetaSSL objective, the same unroll without the target steps."""
    return "metassl" if method == "bmssl" and target_steps == 0 else method


def _params(setup_args):
    config_name, inner, target, tasks, order, method = setup_args
    return {"config": config_name, "L": inner, "delta": target, "K": tasks, "order": order, "method": method,
            "dtype": os.environ.get(DTYPE_VAR, "float32")}


def memory_vs_steps(args, device, rows, failed):
    """Peak RSS rise of one outer step against L, each in a fresh process, for the baseline, the
    fused engine and the fused engine with checkpointed inner steps; CSV and JSON rewritten after
    every point, and a PNG at the end."""
    env = common.environment(torch.device("cpu"))
    grid = [(point, name) for point in _points(args, args.memory_vs_steps)
            for name in dict.fromkeys(args.providers or MEMORY_PROVIDERS)]
    for (config_name, inner, target, tasks, order), name in progress(grid, desc="memory vs L"):
        setup_args = (config_name, inner, target, tasks, order, _method(args.method, target))
        try:
            measured = _memory(name, setup_args)
        except Exception as error:
            _failed(failed, name, setup_args, error)
            continue
        # the child's time runs with every allocation >= 64 KiB mmapped: a relative figure only
        for metric, value in (("peak_bytes", measured["peak_bytes"]), ("memory_child_s", measured["seconds"])):
            rows.append(common.row(env, "unroll", name, "outer_step", metric, _params(setup_args), value))
        common.write(rows, args.out)
        print(f"{name:<26} L={inner:<3} peak {measured['peak_bytes'] / 2**20:9.1f} MiB  "
              f"({measured['seconds']:.1f} s in the memory child)")
    if rows:
        subprocess.run([sys.executable, str(Path(__file__).with_name("plot.py")), str(common.output_paths(args.out)[0]),
                        "--mode", "outer_step", "--metric", "peak_bytes", "--x", "L", "--linear"], check=True)


def _memory(name, setup_args):
    """{"peak_bytes", "seconds"} of one outer step, in a fresh process (python bench/bench_unroll.py
    --memory-child)."""
    return _child(["--memory-child", name, *setup_args], timeout=3600,
                  env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))


def _child(argv, timeout, env=None):
    """The JSON that `python bench/bench_unroll.py ARGV...` prints last; RuntimeError with the end
    of its stderr when it fails. On a timeout, Ctrl-C, or the SIGTERM that main turns into
    Terminated, the child is killed and reaped before the exception goes on (subprocess.run
    leaves it unreaped after a KeyboardInterrupt)."""
    with subprocess.Popen([sys.executable, __file__, *map(str, argv)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    if child.returncode != 0:
        raise RuntimeError(err[-2000:])
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--timing-child":
        if os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        timing_child(sys.argv[2:])
    else:
        main()
