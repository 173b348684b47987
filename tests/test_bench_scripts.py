"""bench/bench_unroll.py, bench/unroll_table.py and bench/omniglot_table.py as a user runs them:
flags refused before anything is measured, rows kept when a point fails or the sweep is
interrupted, earlier results never replaced by nothing, the meta-gradient compared with the
baseline's, and tables that neither merge distinct runs nor present mixed budgets as one.

Most tests run the scripts' main() with the measurement (the child processes) replaced by a fake,
so that a failure, an interrupt or a gradient can be chosen; two run the real children."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bmssl.bench import common

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import bench_unroll  # noqa: E402
import omniglot_table  # noqa: E402
import unroll_table  # noqa: E402

SMALL = ["--configs", "omniglot", "--inner-steps", "1", "--target-steps", "0", "--tasks", "1", "--repeats", "1"]
TIMING = {"median_ms": 10.0, "p20_ms": 9.0, "p80_ms": 11.0}


@pytest.fixture(autouse=True)
def restored_environment():
    """main() sets these for its child processes: give them back."""
    names = ("BMSSL_BACKEND", "OMP_NUM_THREADS", bench_unroll.DTYPE_VAR)
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def fake_providers(monkeypatch, grads=None, fail=lambda name, setup_args: None):
    """run_provider replaced: provider -> its meta-gradient {"w": grads[provider]}; fail(name,
    setup_args) may raise. Returns the list of (provider, setup_args) it was called with."""
    calls = []

    def run_provider(name, setup_args, repeats, device):
        calls.append((name, setup_args))
        fail(name, setup_args)
        return dict(TIMING), {"w": torch.tensor((grads or {}).get(name, [1.0, 0.0]))}

    monkeypatch.setattr(bench_unroll, "run_provider", run_provider)
    return calls


def fake_memory(monkeypatch, fail=lambda name, setup_args: None):
    calls = []

    def memory(name, setup_args):
        calls.append((name, setup_args))
        fail(name, setup_args)
        return {"peak_bytes": 3 * 2**20, "seconds": 0.5}

    monkeypatch.setattr(bench_unroll, "_memory", memory)
    return calls


def run_unroll(monkeypatch, argv):
    """bench_unroll.main() as `python bench/bench_unroll.py ARGV...` runs it."""
    monkeypatch.setattr(sys, "argv", [str(BENCH / "bench_unroll.py"), *argv])
    bench_unroll.main()


def read_rows(out):
    with open(common.output_paths(out)[0]) as handle:
        return list(csv.DictReader(handle))


def params_of(rows, metric):
    return [(r["provider"], json.loads(r["params"]), float(r["value"])) for r in rows if r["metric"] == metric]


# --- bench_unroll.py: flags ---------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--tasks", "0"], "--tasks must be >= 1"),
    (["--inner-steps", "0"], "--inner-steps must be >= 1"),
    (["--target-steps", "-1"], "--target-steps must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--memory-vs-steps", "0"], "--memory-vs-steps must be >= 1"),
    (["--out", "{file}/unroll"], "is a file, not a directory"),
    (["--providers", "engine_fused_graph"], "run on CUDA only"),
    (["--memory-vs-steps", "1", "--providers", "baseline", "engine_fused_graph"], "run on CUDA only"),
])
def test_unroll_flags_are_refused_before_anything_is_measured(flags, message, tmp_path, monkeypatch, capsys):
    calls = fake_providers(monkeypatch) + fake_memory(monkeypatch)
    (tmp_path / "a_file").write_text("")
    flags = [f.format(file=tmp_path / "a_file") for f in flags]
    with pytest.raises(SystemExit) as stop:
        run_unroll(monkeypatch, [*SMALL, "--device", "cpu", "--out", str(tmp_path / "res"), *flags])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert calls == [] and not list(tmp_path.glob("res*"))


# --- bench_unroll.py: the memory sweep ---------------------------------------------------------


def test_memory_sweep_keeps_the_rows_measured_before_and_after_a_failing_point(tmp_path, monkeypatch, capsys):
    def fail(name, setup_args):
        if setup_args[1] == 2:
            raise RuntimeError("fake: out of memory at L = 2")

    calls = fake_memory(monkeypatch, fail)
    out = tmp_path / "memory"
    with pytest.raises(SystemExit) as stop:
        run_unroll(monkeypatch, [*SMALL, "--memory-vs-steps", "1", "2", "4", "--providers", "baseline",
                                 "--out", str(out)])
    assert stop.value.code not in (0, None) and "1 point(s) failed" in str(stop.value.code)
    assert [c[1][1] for c in calls] == [1, 2, 4]
    captured = capsys.readouterr()
    assert "fake: out of memory at L = 2" in captured.err
    peaks = params_of(read_rows(out), "peak_bytes")
    assert [(p["L"], value) for _, p, value in peaks] == [(1, 3 * 2**20), (4, 3 * 2**20)]
    assert "peak       3.0 MiB" in captured.out and " MB " not in captured.out
    assert out.with_suffix(".png").exists()  # the plot of what was measured


def test_memory_sweep_interrupted_keeps_the_rows_measured(tmp_path, monkeypatch, capsys):
    def interrupt(name, setup_args):
        if setup_args[1] == 2:
            raise KeyboardInterrupt

    fake_memory(monkeypatch, interrupt)
    out = tmp_path / "memory"
    with pytest.raises(SystemExit) as stop:
        try:
            run_unroll(monkeypatch, [*SMALL, "--memory-vs-steps", "1", "2", "--providers", "baseline",
                                     "--out", str(out)])
        except KeyboardInterrupt:
            pytest.fail("the interrupt escaped main() without a word about the rows kept")
    assert stop.value.code == 130
    assert "interrupted: kept 2 rows" in capsys.readouterr().err
    assert [p["L"] for _, p, _ in params_of(read_rows(out), "peak_bytes")] == [1]


# --- bench_unroll.py: the timing sweep ---------------------------------------------------------


def test_grad_rel_diff_is_measured_against_the_baseline_run_first(tmp_path, monkeypatch, capsys):
    calls = fake_providers(monkeypatch, {"engine_fused": [1.0, 1.0], "baseline": [1.0, 0.0]})
    out = tmp_path / "unroll"
    run_unroll(monkeypatch, [*SMALL, "--no-memory", "--providers", "engine_fused", "baseline", "--out", str(out)])
    assert [name for name, _ in calls] == ["baseline", "engine_fused"]
    diffs = {name: (p["grad_reference"], value) for name, p, value in params_of(read_rows(out), "grad_rel_diff")}
    assert diffs == {"baseline": ("baseline", 0.0), "engine_fused": ("baseline", 1.0)}  # ||(0, 1)|| / ||(1, 0)||
    assert "grad rel diff vs" in capsys.readouterr().out


def test_without_the_baseline_the_reference_is_the_first_provider_and_is_said(tmp_path, monkeypatch, capsys):
    fake_providers(monkeypatch, {"engine_torch": [2.0, 0.0], "engine_fused": [1.0, 0.0]})
    out = tmp_path / "unroll"
    run_unroll(monkeypatch, [*SMALL, "--no-memory", "--providers", "engine_torch", "engine_fused", "--out", str(out)])
    diffs = {name: (p["grad_reference"], value) for name, p, value in params_of(read_rows(out), "grad_rel_diff")}
    assert diffs == {"engine_torch": ("engine_torch", 0.0), "engine_fused": ("engine_torch", 0.5)}
    assert "compared with engine_torch's" in capsys.readouterr().err


def test_a_failed_baseline_hands_the_reference_to_the_next_provider(tmp_path, monkeypatch):
    def fail(name, setup_args):
        if name == "baseline":
            raise RuntimeError("fake: the baseline ran out of memory")

    fake_providers(monkeypatch, {"engine_torch": [2.0, 0.0], "engine_fused": [1.0, 0.0]}, fail)
    out = tmp_path / "unroll"
    with pytest.raises(SystemExit, match="1 point"):
        run_unroll(monkeypatch, [*SMALL, "--no-memory", "--providers", "baseline", "engine_torch", "engine_fused",
                           "--out", str(out)])
    diffs = {name: (p["grad_reference"], value) for name, p, value in params_of(read_rows(out), "grad_rel_diff")}
    assert diffs == {"engine_torch": ("engine_torch", 0.0), "engine_fused": ("engine_torch", 0.5)}


def test_timing_sweep_reports_peak_memory_in_mib(tmp_path, monkeypatch, capsys):
    fake_providers(monkeypatch)
    fake_memory(monkeypatch)  # 3 MiB
    run_unroll(monkeypatch, [*SMALL, "--device", "cpu", "--providers", "baseline", "--out", str(tmp_path / "unroll")])
    out = capsys.readouterr().out
    assert "peak MiB" in out and "MB" not in out
    assert "     3.0 " in next(line for line in out.splitlines() if " baseline " in line)


def test_timing_sweep_keeps_the_timings_when_the_memory_measurement_fails(tmp_path, monkeypatch, capsys):
    fake_providers(monkeypatch)

    def fail(name, setup_args):
        if name == "engine_fused":
            raise RuntimeError("fake: the memory child died")

    fake_memory(monkeypatch, fail)
    out = tmp_path / "unroll"
    with pytest.raises(SystemExit, match="1 point"):
        run_unroll(monkeypatch, [*SMALL, "--device", "cpu", "--providers", "baseline", "engine_fused",
                                 "--out", str(out)])
    assert "fake: the memory child died" in capsys.readouterr().err
    rows = read_rows(out)
    assert {name for name, _, _ in params_of(rows, "median_ms")} == {"baseline", "engine_fused"}
    assert [name for name, _, _ in params_of(rows, "peak_bytes")] == ["baseline"]


@pytest.mark.parametrize("memory", [False, True])
def test_a_sweep_that_measures_nothing_leaves_earlier_results_alone(memory, tmp_path, monkeypatch, capsys):
    def fail(name, setup_args):
        raise RuntimeError("fake: every point fails")

    fake_providers(monkeypatch, fail=fail)
    fake_memory(monkeypatch, fail)
    out = tmp_path / "unroll"
    for path in common.output_paths(out):
        path.write_text("earlier results\n")
    flags = ["--memory-vs-steps", "1", "--providers", "baseline"] if memory else ["--no-memory", "--providers",
                                                                                  "baseline"]
    with pytest.raises(SystemExit) as stop:
        run_unroll(monkeypatch, [*SMALL, *flags, "--out", str(out)])
    assert stop.value.code not in (0, None)
    assert "nothing was measured" in capsys.readouterr().out
    assert [path.read_text() for path in common.output_paths(out)] == ["earlier results\n"] * 2


def test_metassl_runs_delta_0_only_and_says_so_once(tmp_path, monkeypatch, capsys):
    calls = fake_providers(monkeypatch)
    out = tmp_path / "unroll"
    run_unroll(monkeypatch, [*SMALL, "--target-steps", "0", "5", "20", "--method", "metassl", "--no-memory",
                       "--providers", "baseline", "--out", str(out)])
    assert [setup_args[2] for _, setup_args in calls] == [0]
    assert {(p["delta"], p["method"]) for _, p, _ in params_of(read_rows(out), "median_ms")} == {(0, "metassl")}
    assert capsys.readouterr().err.count("--target-steps 0 5 20 ignored") == 1


def test_real_sweep_compares_with_the_baseline(tmp_path):
    """The real child processes, smallest point: the baseline is its own reference (exactly 0)."""
    out = tmp_path / "unroll"
    result = subprocess.run([sys.executable, str(BENCH / "bench_unroll.py"), *SMALL, "--device", "cpu",
                             "--threads", "1", "--no-memory", "--providers", "engine_fused", "baseline",
                             "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    diffs = {name: (p["grad_reference"], value) for name, p, value in params_of(read_rows(out), "grad_rel_diff")}
    assert diffs["baseline"] == ("baseline", 0.0)
    assert diffs["engine_fused"][0] == "baseline" and 0 <= diffs["engine_fused"][1] < 1e-3


def _children(pid):
    """[(pid, argv)] of the live processes whose parent is pid (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append((int(stat.parent.name), (stat.parent / "cmdline").read_bytes().split(b"\0")))
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from Linux /proc")
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_sweep_kills_its_timing_child_and_removes_its_folder(signum, status, tmp_path):
    sweep = subprocess.Popen([sys.executable, str(BENCH / "bench_unroll.py"), "--configs", "mini", "--inner-steps",
                              "1", "--target-steps", "0", "--tasks", "1", "--repeats", "3", "--threads", "1",
                              "--no-memory", "--providers", "baseline", "engine_fused", "--out",
                              str(tmp_path / "unroll")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child = None
    try:
        deadline = time.time() + 120
        while child is None and time.time() < deadline and sweep.poll() is None:
            child = next((c for c in _children(sweep.pid) if b"--timing-child" in c[1]), None)
            time.sleep(0.1)
        assert child is not None, "no timing child appeared"
        scratch = Path(child[1][child[1].index(b"--timing-child") + 3].decode()).parent
        assert scratch.is_dir()
        sweep.send_signal(signum)
        _, err = sweep.communicate(timeout=60)
        assert sweep.returncode == status, err.decode()[-2000:]
        assert b"interrupted: nothing was measured" in err
        time.sleep(0.2)
        assert not Path(f"/proc/{child[0]}/stat").exists()
        assert not scratch.exists()
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
        if child is not None and Path(f"/proc/{child[0]}").exists():
            os.kill(child[0], signal.SIGKILL)  # the orphan that the unfixed script left


# --- unroll_table.py ----------------------------------------------------------------------------


def _unroll_csv(path, orders=(2,), commit="abc1234", fused_ms=50.0):
    env = {"device": "cpu (test)", "torch": torch.__version__, "triton": "none", "commit": commit}
    rows = []
    for order in orders:
        params = {"config": "omniglot", "L": 1, "delta": 0, "K": 1, "order": order, "method": "metassl",
                  "dtype": "float32"}
        for provider, ms in (("baseline", 100.0 * order), ("engine_fused", fused_ms)):
            rows.append(common.row(env, "unroll", provider, "outer_step", "median_ms", params, ms))
    return common.write(rows, path)[0]


def test_unroll_table_keeps_orders_apart(tmp_path):
    table, first, commits = unroll_table.read(_unroll_csv(tmp_path / "orders", orders=(1, 2)))
    text = unroll_table.markdown(table, first, commits)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| config | L | δ | K | method | order | baseline s")
    assert [line.split(" | ")[5] for line in lines[1:]] == ["1", "2"]
    assert "dtype float32" in text  # the same for every row: in the caption, not a column
    assert unroll_table.speedup_series(table) == {"omniglot L=1 K=1 order 1": [(0, 2.0)],
                                                  "omniglot L=1 K=1 order 2": [(0, 4.0)]}
    table, first, commits = unroll_table.read(_unroll_csv(tmp_path / "one", orders=(2,)))
    assert "| order |" not in unroll_table.markdown(table, first, commits)


def test_unroll_table_reads_csvs_concatenated_with_cat(tmp_path):
    first_csv = _unroll_csv(tmp_path / "a", commit="aaaaaaa", fused_ms=50.0)
    second_csv = _unroll_csv(tmp_path / "b", orders=(1,), commit="bbbbbbb")
    joined = tmp_path / "joined.csv"
    joined.write_text(first_csv.read_text() + second_csv.read_text())
    table, first, commits = unroll_table.read(joined)
    assert sorted(key[5] for key in table) == [1, 2]
    assert unroll_table._all_commits(commits) == ["aaaaaaa", "bbbbbbb"]
    assert "| commit |" in unroll_table.markdown(table, first, commits)


# --- omniglot_table.py --------------------------------------------------------------------------

COMMITTED = BENCH / "results" / "omniglot"


def _committed_records(folder):
    folder.mkdir()
    for path in COMMITTED.glob("*.json"):
        shutil.copy(path, folder)
    return folder


def test_omniglot_committed_records_build_the_committed_table(tmp_path):
    folder = _committed_records(tmp_path / "omniglot")
    omniglot_table.main(["--table-only", "--out", str(folder)])
    assert (folder / "table.md").read_text() == (COMMITTED / "table.md").read_text()


def test_omniglot_table_refuses_records_of_different_budgets(tmp_path):
    folder = _committed_records(tmp_path / "omniglot")
    record = json.loads((folder / "bmssl.json").read_text())
    record["budget"]["outer_steps"] = 3
    record["config"]["inner_steps"] = 2
    (folder / "bmssl.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit) as stop:
        omniglot_table.main(["--table-only", "--out", str(folder)])
    message = str(stop.value.code)
    assert "budget.outer_steps: " in message and "config.inner_steps: " in message
    assert "bmssl.json 3" in message and "metassl.json 100" in message and "bmssl.json 2" in message
    assert "config.target_data" not in message and "config.method" not in message  # they define a method
    assert not (folder / "table.md").exists()


def test_omniglot_table_only_without_records_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        omniglot_table.main(["--table-only", "--out", str(tmp_path / "typo")])
    assert "no table to build" in str(stop.value.code) and "typo" in str(stop.value.code)
    assert not (tmp_path / "typo" / "table.md").exists()
