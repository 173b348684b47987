"""Plot a benchmark CSV (long format, bmssl.bench.common): fwd+bwd median time against the
first numeric parameter, one line per provider and remaining parameters.

    python bench/plot.py bench/results/kl_bootstrap.csv [--mode fwd+bwd] [--out plot.png]
    python bench/plot.py unroll_memory.csv --mode outer_step --metric peak_bytes --x L --linear
"""
import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("csv")
    parser.add_argument("--mode", default="fwd+bwd")
    parser.add_argument("--metric", default="median_ms")
    parser.add_argument("--x", default=None, help="the parameter on the x axis (default: the first numeric one)")
    parser.add_argument("--linear", action="store_true", help="linear axes (default: log-log)")
    parser.add_argument("--out", default=None, help="default: the CSV's path with .png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.csv) as handle:
        rows = [r for r in csv.DictReader(handle) if r["mode"] == args.mode and r["metric"] == args.metric]
    if not rows:
        raise SystemExit(f"no rows with mode={args.mode} metric={args.metric} in {args.csv}")
    first = json.loads(rows[0]["params"])
    x_key = args.x or next(k for k, v in first.items() if isinstance(v, (int, float)))
    if x_key not in first:
        raise SystemExit(f"--x {x_key}: the rows have parameters {', '.join(first)}")
    lines = defaultdict(list)
    for r in rows:
        params = json.loads(r["params"])
        rest = ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if k != x_key)
        lines[(r["provider"], rest)].append((params[x_key], float(r["value"])))
    fig, ax = plt.subplots(figsize=(8, 5))
    for (provider, rest), points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{provider} ({rest})")
    if not args.linear:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"{args.mode} {args.metric}")
    ax.set_title(f"{rows[0]['op']} on {rows[0]['device']} (torch {rows[0]['torch']}, {rows[0]['commit']})")
    ax.legend(fontsize=7)
    out = Path(args.out or Path(args.csv).with_suffix(".png"))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
