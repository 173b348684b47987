"""Time per outer step and peak memory of one BMSSL / MetaSSL meta-gradient, four providers:

    (a) baseline: bench/unroll_baseline.py, a Python loop over tasks, autograd.grad(create_graph)
        per inner step, per-parameter updates, eager losses (learn2learn style)
    (b) engine_torch: bmssl.meta's vmap engine with the pure-PyTorch twins (BMSSL_BACKEND=torch)
    (c) engine_fused: the same engine with the fused kernels (BMSSL_BACKEND=auto)
    (d) engine_fused_graph: (c) captured with torch.compile(mode="reduce-overhead") -- CUDA only

Configurations: omniglot (Conv4, 28x28x1) and mini (Conv4, 84x84x3), 5 ways, M1 = 1, M2 = 5.

    python bench/bench_unroll.py --configs mini --inner-steps 5 --target-steps 5 --tasks 4
    python bench/bench_unroll.py --configs omniglot mini --inner-steps 1 5 10 --target-steps 0 5 10 20 --tasks 1 4 8
"""
import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unroll_baseline  # noqa: E402

from bmssl.bench import common  # noqa: E402
from bmssl.meta import MetaConfig, detached, meta_gradient  # noqa: E402
from bmssl.models import FewShotModel, build_backbone  # noqa: E402
from bmssl.progress import progress  # noqa: E402
from bmssl.tasks import TaskBatch  # noqa: E402

CONFIGS = {"omniglot": (1, 28, 28), "mini": (3, 84, 84)}
WAYS, SUPPORT_VIEWS, QUERY_VIEWS = 5, 1, 5


def setup(config_name, inner_steps, target_steps, tasks, order, method, device, seed=0):
    """(model, θ, batch, MetaConfig) with random images: timing does not depend on content."""
    shape = CONFIGS[config_name]
    config = MetaConfig(method=method, inner_steps=inner_steps, target_steps=target_steps, order=order,
                        seed=seed)
    model = FewShotModel(build_backbone("conv4", shape, seed=seed), config.projection_dim).to(device)
    generator = torch.Generator().manual_seed(seed)
    support = torch.rand(tasks, WAYS * SUPPORT_VIEWS, *shape, generator=generator)
    query = torch.rand(tasks, WAYS * QUERY_VIEWS, *shape, generator=generator)
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
        return torch.compile(engine, mode="reduce-overhead")
    return engine


BACKEND_OF = {"baseline": "torch", "engine_torch": "torch", "engine_fused": "auto", "engine_fused_graph": "auto"}


def run_provider(name, setup_args, repeats, device):
    os.environ["BMSSL_BACKEND"] = BACKEND_OF[name]
    model, theta, batch, config = setup(*setup_args, device=device)
    fn = provider_fn(name, model, theta, batch, config)
    return common.time_ms(fn, device, warmup=1, repeats=repeats, max_seconds=120)


def memory_child(argv):
    name, *args = argv
    os.environ["BMSSL_BACKEND"] = BACKEND_OF[name]
    config_name, inner, target, tasks, order, method = args
    model, theta, batch, config = setup(config_name, int(inner), int(target), int(tasks), int(order), method,
                                        torch.device("cpu"))
    fn = provider_fn(name, model, theta, batch, config)
    fn()
    print(json.dumps({"peak_bytes": common.peak_rss_rise(fn)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["mini"], choices=sorted(CONFIGS))
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[5])
    parser.add_argument("--target-steps", type=int, nargs="+", default=[5])
    parser.add_argument("--tasks", type=int, nargs="+", default=[4])
    parser.add_argument("--orders", type=int, nargs="+", default=[2])
    parser.add_argument("--method", default="bmssl", choices=["bmssl", "metassl"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 keeps provider ratios fair on a shared machine)")
    parser.add_argument("--out", default="bench/results/unroll")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the memory subprocesses too
    device = torch.device(args.device)
    providers = ["baseline", "engine_torch", "engine_fused"] + (["engine_fused_graph"] if device.type == "cuda" else [])
    env = common.environment(device)
    grid = list(itertools.product(args.configs, args.inner_steps, args.target_steps, args.tasks, args.orders, providers))
    rows = []
    for config_name, inner, target, tasks, order, name in progress(grid, desc="unroll"):
        setup_args = (config_name, inner, target, tasks, order, args.method)
        params = {"config": config_name, "L": inner, "delta": target, "K": tasks, "order": order,
                  "method": args.method}
        timing = run_provider(name, setup_args, args.repeats, device)
        timing["steps_per_s"] = 1e3 / timing["median_ms"]
        if not args.no_memory and device.type == "cpu":
            timing["peak_bytes"] = _memory(name, setup_args)
        for metric, value in timing.items():
            rows.append(common.row(env, "unroll", name, "outer_step", metric, params, value))
    table = {}
    for r in rows:
        table.setdefault((r["params"], r["provider"]), {})[r["metric"]] = r["value"]
    print(f"{'configuration':<86} {'provider':<14} {'ms/step':>9} {'steps/s':>8} {'vs (a)':>7} {'peak MB':>8}")
    for (params, name), metrics in sorted(table.items()):
        base = table.get((params, "baseline"), {}).get("median_ms")
        ratio = f"{base / metrics['median_ms']:6.2f}x" if base else ""
        peak = f"{metrics['peak_bytes'] / 2**20:8.1f}" if "peak_bytes" in metrics else ""
        print(f"{params:<86} {name:<14} {metrics['median_ms']:9.1f} {metrics['steps_per_s']:8.3f} {ratio:>7} {peak:>8}")
    for path in common.write(rows, args.out):
        print(f"wrote {path}")


def _memory(name, setup_args):
    """Peak RSS rise of one outer step, in a fresh process (python bench/bench_unroll.py --memory-child)."""
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, *map(str, setup_args)],
                         capture_output=True, text=True, timeout=3600, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2:])
    else:
        main()
