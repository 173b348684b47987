"""The unroll sweep (bench/bench_unroll.py's CSV) as a markdown table and a speed-up plot.

One row per (config, L, δ, K, method, order, dtype): seconds per outer step of each provider, each
provider's speed-up over (a) the baseline, outer steps/s of the fused engine and the peak memory of
(c) against (a). order and dtype get columns when they vary (the caption names them otherwise), and
a CSV that joins runs at several commits gets a commit column. CSVs concatenated with `cat` are
read as one (their repeated header lines are skipped).
The plot draws (a)'s time over (c)'s against δ, one line per (config, L, K, order, dtype).

    python bench/unroll_table.py bench/results/cpu/unroll_sweep_28px.csv   # writes .md and _speedup.png
"""
import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

BASELINE, FUSED = "baseline", "engine_fused"


def read(path):
    """{(config, L, delta, K, method, order, dtype): {provider: {metric: value}}}, the first row, and
    {key: the commits its rows were measured at}."""
    table, first, commits = defaultdict(lambda: defaultdict(dict)), None, defaultdict(set)
    with open(path) as handle:
        for row in csv.DictReader(handle):
            if row["params"] == "params":  # the header line of a CSV concatenated onto the first
                continue
            first = first or row
            p = json.loads(row["params"])
            key = (p["config"], p["L"], p["delta"], p["K"], p["method"], p["order"], p.get("dtype", "float32"))
            table[key][row["provider"]][row["metric"]] = float(row["value"])
            commits[key].add(row["commit"])
    if first is None:
        raise SystemExit(f"{path} has no rows")
    return table, first, commits


def _all_commits(commits):
    return sorted(set().union(*commits.values()))


OPTIONAL_COLUMNS = (("order", 5), ("dtype", 6))  # (name, index in the key): a column only when it varies


def _varying(table):
    """{name: index in the key} of the OPTIONAL_COLUMNS whose value varies across the table."""
    return {name: index for name, index in OPTIONAL_COLUMNS if len({key[index] for key in table}) > 1}


def markdown(table, first, commits):
    providers = sorted({name for cell in table.values() for name in cell}, key=_provider_order)
    others = [p for p in providers if p != BASELINE]
    every = _all_commits(commits)
    several = len(every) > 1
    varying = _varying(table)
    fixed = ", ".join(f"{name} {next(iter(table))[index]}" for name, index in OPTIONAL_COLUMNS if name not in varying)
    head = (["config", "L", "δ", "K", "method", *varying] + [f"{p} s" for p in providers]
            + [f"{p} vs (a)" for p in others] + [f"{FUSED} steps/s", f"{FUSED} peak vs (a)"]
            + (["commit"] if several else []))
    lines = [f"Unroll sweep on {first['device']} (torch {first['torch']}, commit{'s' if several else ''} "
             f"{', '.join(every)}{'; ' + fixed if fixed else ''}): seconds per outer step (median), speed-up "
             "over (a), and the fused engine's outer steps/s and peak memory.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(table):
        cell = table[key]
        base = cell.get(BASELINE, {}).get("median_ms")
        fused = cell.get(FUSED, {})
        values = [*key[:5], *(key[index] for index in varying.values())]
        values += [_fmt(cell[p]["median_ms"] / 1e3, "{:.2f}") if "median_ms" in cell.get(p, {}) else "–"
                   for p in providers]
        values += [_fmt(base / cell[p]["median_ms"], "{:.2f}×") if base and "median_ms" in cell.get(p, {}) else "–"
                   for p in others]
        values.append(_fmt(1e3 / fused["median_ms"], "{:.2f}") if "median_ms" in fused else "–")
        base_peak = cell.get(BASELINE, {}).get("peak_bytes")
        values.append(_fmt(fused["peak_bytes"] / base_peak, "{:.0%}") if base_peak and "peak_bytes" in fused else "–")
        if several:
            values.append(", ".join(sorted(commits[key])))
        lines.append("| " + " | ".join(map(str, values)) + " |")
    return "\n".join(lines) + "\n"


def speedup_series(table):
    """{line label: sorted [(δ, (a)'s time / (c)'s time)]}, one line per (config, L, K, order, dtype)
    in that order; the label names order and dtype when they vary across the table."""
    varying = _varying(table)
    series = defaultdict(list)
    for key, cell in table.items():
        if "median_ms" in cell.get(BASELINE, {}) and "median_ms" in cell.get(FUSED, {}):
            config, inner, delta, tasks, _method, order, dtype = key
            ratio = cell[BASELINE]["median_ms"] / cell[FUSED]["median_ms"]
            series[(config, inner, tasks, order, dtype)].append((delta, ratio))
    labelled = {}
    for (config, inner, tasks, order, dtype), points in sorted(series.items()):
        optional = {"order": order, "dtype": dtype}
        label = f"{config} L={inner} K={tasks}" + "".join(f" {name} {optional[name]}" for name in varying)
        labelled[label] = sorted(points)
    return labelled


def plot(table, first, commits, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in speedup_series(table).items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("δ (target steps; δ = 0 is MetaSSL)")
    ax.set_ylabel("(a) time / (c) time: fused engine's speed-up")
    ax.set_title(f"unroll on {first['device']} (torch {first['torch']}, {', '.join(_all_commits(commits))})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _provider_order(name):
    order = ["baseline", "engine_torch", "engine_fused", "engine_fused_vmap", "engine_fused_checkpointed",
             "engine_fused_graph", "engine_fused_compiled"]
    return order.index(name) if name in order else len(order)


def _fmt(value, pattern):
    return pattern.format(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    args = parser.parse_args()
    path = Path(args.csv)
    table, first, commits = read(path)
    text = markdown(table, first, commits)
    path.with_suffix(".md").write_text(text)
    print(text)
    plot(table, first, commits, path.with_name(path.stem + "_speedup.png"))
    print(f"wrote {path.with_suffix('.md')} and {path.with_name(path.stem + '_speedup.png')}")


if __name__ == "__main__":
    main()
