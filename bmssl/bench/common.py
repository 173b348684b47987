"""Timing and the long-format result rows shared by every benchmark (STYLE.md §9).

A row: op, provider, mode, metric, params (JSON), value, plus device, torch, triton, commit.
Times are medians (with 20th/80th percentiles) of many repeats after warm-up; on the GPU they
are taken with CUDA events.
"""
import argparse
import csv
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bmssl_providers(support, device, dtype, with_compile, shape=None):
    """torch, torch_compile (optional) and bmssl-<backend> for each compiled backend that can
    serve this input (of this shape, when given) of the op described by `support` (never the
    Triton interpreter: it is a correctness tool, not a speed one)."""
    from bmssl import backends

    names = ["torch"] + (["torch_compile"] if with_compile else [])
    for backend in ("cpu", "cuda", "triton"):
        usable = backends.input_reason(backend, support, device, dtype, shape) is None
        if usable and not (backend == "triton" and device.type == "cpu"):
            names.append(f"bmssl-{backend}")
    return names


FIELDS = ("op", "provider", "mode", "metric", "params", "value", "device", "torch", "triton", "commit")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, warmup=3, repeats=20, max_seconds=10.0):
    """Median, 20th and 80th percentile wall time of fn() in milliseconds (stops repeating
    after max_seconds, with at least three samples)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples, spent = [], 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
        spent += samples[-1] / 1e3
        if spent > max_seconds and len(samples) >= 3:
            break
    # "inclusive": percentiles within the samples (the default "exclusive" method extrapolates
    # past them with 2-4 samples: [10, 20] ms gave p20 = 6 and p80 = 24)
    quantiles = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else samples * 4
    return {"median_ms": statistics.median(samples), "p20_ms": quantiles[0], "p80_ms": quantiles[3]}


def time_modes(loss_fn, inputs, device, repeats=20, failures=None):
    """{"fwd", "fwd+bwd", "bwd": timing} for loss_fn(inputs[0], *inputs[1:]), whose gradient is
    taken with respect to inputs[0]. Adds peak_bytes on CUDA. The graph that "bwd" replays is
    built last, so it holds no memory while the other modes run (at B = 65536 the eager twin's
    saved tensors alone were about 42 GiB). With a `failures` list, a mode that raises (out of
    memory) is appended to it as (mode, error) and the other modes are still measured; without
    one, the error propagates."""
    leaf, rest = inputs[0], inputs[1:]
    retained = []

    def forward():
        with torch.no_grad():
            loss_fn(leaf, *rest)

    def forward_backward():
        torch.autograd.grad(loss_fn(leaf, *rest), leaf)

    def backward():
        if not retained:
            retained.append(loss_fn(leaf, *rest))
        torch.autograd.grad(retained[0], leaf, retain_graph=True)

    result = {}
    for mode, call in (("fwd", forward), ("fwd+bwd", forward_backward), ("bwd", backward)):
        try:
            result[mode] = time_ms(call, device, repeats=repeats)
            if device.type == "cuda":
                result[mode]["peak_bytes"] = peak_cuda_bytes(call, device)
        except Exception as error:
            if failures is None:
                raise
            result.pop(mode, None)
            failures.append((mode, error))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def peak_cpu_bytes_in_subprocess(module, args, timeout=900):
    """Peak resident-memory rise of `python -m module --memory-child args...`, which must print
    {"peak_bytes": ...}. A fresh process per measurement, so nothing earlier hides the peak."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(torch.get_num_threads()))
    out = subprocess.run([sys.executable, "-m", module, "--memory-child", *map(str, args)],
                         capture_output=True, text=True, timeout=timeout, env=env)  # killed on Ctrl-C
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def print_peak_of_forward_backward(loss_fn, inputs):
    """A memory child's work: one forward+backward of loss_fn(*inputs) (gradient with respect to
    inputs[0]) as warm-up (compiles, first allocations), then the peak RSS rise of another,
    printed as {"peak_bytes": ...} for peak_cpu_bytes_in_subprocess."""
    def step():
        torch.autograd.grad(loss_fn(*inputs), inputs[0])

    step()
    print(json.dumps({"peak_bytes": peak_rss_rise(step)}))


def entry_point(main, memory_child):
    """`python -m bmssl.bench.<op>`: the benchmark, or with --memory-child its memory child."""
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2:])
    else:
        main()


def _status_bytes(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_rise(fn):
    """Peak resident memory during fn() above the resident memory before it (Linux): the
    high-water mark VmHWM is reset through /proc/self/clear_refs first, so earlier peaks (imports,
    warm-up) do not count."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - before)


def peak_cuda_bytes(fn, device):
    """Peak CUDA memory allocated during fn(), above what was allocated before it."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def op_parser(op, args, description):
    """The argument parser of bench <op>'s main(args): from `bmssl bench <op>` (args already a
    Namespace), its usage errors name that command, not `bmssl`."""
    return argparse.ArgumentParser(prog=f"bmssl bench {op}" if isinstance(args, argparse.Namespace) else None,
                                   description=description)


def bench_device(name, parser):
    """torch.device(name) for a benchmark's --device, or the parser's usage error when it names a
    CUDA device that torch cannot see (rather than torch's first-allocation RuntimeError)."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        parser.error(f"--device {name}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: no CUDA device is visible to torch {torch.__version__} "
                     f"(CUDA build: {torch.version.cuda})")
    return device


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def commit():
    """The short commit of the checkout, with "-dirty" when tracked files differ from it (the
    numbers then come from code that no commit holds); bench/results/ does not count, since a
    benchmark rewriting its own committed results is not a code change (the omniglot table's
    second method was marked dirty by the first one's record). BMSSL_COMMIT, when set, is taken as it
    is: a copy without .git (the GPU machine's) gets it from the command that sent it there."""
    if os.environ.get("BMSSL_COMMIT"):
        return os.environ["BMSSL_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        head = out.stdout.strip()
        if not head:
            return "unknown"
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no",
                                 "--", ".", ":(exclude)bench/results"], capture_output=True, text=True, timeout=10)
        return head + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "commit": commit()}


def row(env, op, provider, mode, metric, params, value):
    return {"op": op, "provider": provider, "mode": mode, "metric": metric,
            "params": json.dumps(params, sort_keys=True), "value": value, **env}


def output_paths(out_prefix):
    """<out_prefix>.csv and <out_prefix>.json: the suffixes are appended (a prefix "res.v2" gives
    "res.v2.csv", not "res.csv"); a prefix given as "res.csv" or "res.json" means "res"."""
    out_prefix = Path(out_prefix).expanduser()
    if out_prefix.suffix in (".csv", ".json"):
        out_prefix = out_prefix.with_suffix("")
    return out_prefix.with_name(out_prefix.name + ".csv"), out_prefix.with_name(out_prefix.name + ".json")


def check_arguments(parser, args, counts, known_providers):
    """A benchmark's flags, checked before the sweep: each flag in `counts` (names of int or
    list-of-int arguments) must be >= 1, --providers must name known providers, and --out's folder
    must be writable. Errors are the parser's usage errors."""
    from bmssl import run_files

    for name in counts:
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and any(v < 1 for v in values):
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {' '.join(map(str, values))}")
    unknown = [p for p in (getattr(args, "providers", None) or []) if p not in known_providers]
    if unknown:
        parser.error(f"--providers: unknown {' '.join(unknown)}; known: {' '.join(known_providers)}")
    if args.out is not None and (Path(args.out).expanduser().is_dir() or str(args.out).endswith(("/", os.sep))):
        # "--out results/" wrote results.csv and results.json beside the folder, not in it
        parser.error(f"--out {args.out} is a folder; --out is a prefix of the .csv and .json files, "
                     f"e.g. {Path(args.out) / 'run'}")
    try:
        run_files.writable_directory(output_paths(args.out)[0].parent, "the folder of --out")
    except ValueError as error:
        parser.error(str(error))


def known_providers(extra=()):
    """Every provider name a benchmark knows (whether or not it can run here)."""
    from bmssl import backends

    return ["torch", "torch_compile", *(f"bmssl-{name}" for name in backends.BACKENDS if name != "torch"),
            *extra]


def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does: a sweep's measured
    rows are already written, and a running child process is killed (subprocess.run does so on
    any exception) instead of outliving it."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def point_failed(op, provider, params, error):
    """Report one point that could not be measured (out of memory, a peer's own limits); the
    sweep goes on, and finish() makes the run exit non-zero."""
    print(f"{op}: provider {provider} failed on {params}: {type(error).__name__}: {str(error)[:300]}",
          file=sys.stderr)


def finish(results, failures, out_prefix, summary):
    """End of a sweep: the summary and <out_prefix>.csv / .json when anything was measured (an
    empty sweep leaves earlier files as they were); exit status 1 when a point failed or nothing
    was measured."""
    if results:
        print(summary(results))
        for path in write(results, out_prefix):
            print(f"wrote {path}")
    else:
        print(f"nothing was measured: {output_paths(out_prefix)[0]} and .json are left as they were",
              file=sys.stderr)
    if failures or not results:
        raise SystemExit(f"{failures} point(s) of the sweep failed (reasons above); the others were written"
                         if results else "the benchmark measured nothing")
    return results


def write(rows, out_prefix):
    """Write rows to <out_prefix>.csv and <out_prefix>.json, each atomically (a temporary file
    renamed over the old one): a sweep that rewrites them after every point never leaves a
    half-written file. Returns the two paths."""
    csv_path, json_path = output_paths(out_prefix)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_text = io.StringIO()
    writer = csv.DictWriter(csv_text, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    for path, text in ((csv_path, csv_text.getvalue()), (json_path, json.dumps(rows, indent=1) + "\n")):
        scratch = path.with_name(path.name + ".partial")
        scratch.write_text(text)
        os.replace(scratch, path)
    return csv_path, json_path
