"""The bmssl console script and python -m bmssl."""
import json
import os
import shutil
import subprocess
import sys

import pytest


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "bmssl", *args], capture_output=True, text=True,
                          timeout=300, env=None if env is None else {**os.environ, **env})


def test_help():
    out = run("--help")
    assert out.returncode == 0
    assert "info" in out.stdout and "bench" in out.stdout


def test_console_script_is_installed():
    assert shutil.which("bmssl") or pytest.fail("the bmssl console script is not on PATH")
    out = subprocess.run(["bmssl", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("bmssl ")


def test_info_reports_versions_backends_and_build():
    out = run("info")
    assert out.returncode == 0, out.stderr
    for needle in ("torch", "triton", "device:", "backends:", "cpu     ok", "bmssl._C: loaded",
                   "cxx_flags"):
        assert needle in out.stdout, (needle, out.stdout)


def test_info_with_an_invalid_backend_reports_it_in_one_line_not_a_traceback():
    out = run("info", env={"BMSSL_BACKEND": "bogus"})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == ("bmssl info: error: BMSSL_BACKEND='bogus' is not a backend; choose one of "
                                  "cuda, triton, cpu, torch, auto")
    assert "backend requested: none: BMSSL_BACKEND='bogus' is invalid" in out.stdout
    assert "backends:" in out.stdout and "bmssl._C:" in out.stdout  # the rest of the report is still there


def test_bench_quick_writes_results(tmp_path):
    out = run("bench", "kl_bootstrap", "--quick", "--out", str(tmp_path / "kl"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "kl.json").read_text())
    providers = {r["provider"] for r in rows}
    assert {"torch", "bmssl-cpu"} <= providers
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert all(r["value"] > 0 for r in rows if r["metric"] == "median_ms")
    assert (tmp_path / "kl.csv").read_text().startswith("op,provider,mode,metric")


def test_bench_ntxent_quick(tmp_path):
    out = run("bench", "ntxent", "--quick", "--out", str(tmp_path / "nt"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "nt.json").read_text())
    assert {"torch", "bmssl-cpu"} <= {r["provider"] for r in rows}
    assert "speedup" in out.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error where no GPU is visible")
def test_bench_on_an_absent_gpu_is_a_usage_error():
    """--device cuda with no GPU: exit 2 and one line saying so, not torch's RuntimeError from the
    first allocation (which the GPU session's logs showed before)."""
    out = run("bench", "kl_bootstrap", "--quick", "--device", "cuda")
    assert out.returncode == 2, out.stderr
    assert "--device cuda: no CUDA device is visible to torch" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_command_fails_clearly():
    out = run("fly")
    assert out.returncode != 0 and "invalid choice" in out.stderr


def test_bench_quick_keeps_the_flags_given_with_it(tmp_path):
    out = run("bench", "ntxent", "--quick", "--batches", "64", "--views", "4", "--repeats", "2",
              "--providers", "torch", "--out", str(tmp_path / "nt.v1"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "nt.v1.json").read_text())  # the dot in the prefix is kept
    assert {json.loads(r["params"])["B"] for r in rows} == {64}
    assert {json.loads(r["params"])["M"] for r in rows} == {4} and {r["provider"] for r in rows} == {"torch"}
    assert (tmp_path / "nt.v1.csv").exists() and not (tmp_path / "nt.csv").exists()


def test_bench_quick_keeps_a_flag_given_at_its_default_value(tmp_path):
    """--views 2 4 is the flag's default, but given: --quick must not replace it by its own [2]."""
    out = run("bench", "ntxent", "--quick", "--batches", "32", "--views", "2", "4", "--providers", "torch",
              "--out", str(tmp_path / "nt"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "nt.json").read_text())
    assert {json.loads(r["params"])["M"] for r in rows} == {2, 4}


@pytest.mark.parametrize("flags, message", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--batches", "0"], "--batches must be >= 1"),
    (["--providers", "bogus"], "--providers: unknown bogus"),
    (["--views", "1"], "--views must be >= 2"),
    (["--batches", "65", "--views", "2"], "not B = 65 with M = 2"),
    (["--providers", "torch_compile", "--no-compile"], "contradict each other"),
    (["--providers", "inf-cl"], "nothing to run"),
])
def test_bench_refuses_bad_flags_before_the_sweep(tmp_path, flags, message):
    out = run("bench", "ntxent", "--quick", *flags, "--out", str(tmp_path / "nt"))
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "nt.csv").exists()


def test_bench_refuses_an_unwritable_out_before_the_sweep(tmp_path):
    (tmp_path / "file").write_text("x")
    out = run("bench", "kl_bootstrap", "--quick", "--out", str(tmp_path / "file" / "kl"))
    assert out.returncode == 2 and "the folder of --out" in out.stderr and "Traceback" not in out.stderr
    assert "kl_bootstrap" not in out.stdout  # no summary table: nothing was measured


def test_bench_rewrites_its_results_after_every_point(tmp_path, monkeypatch):
    """A sweep stopped part-way keeps the points it measured: the files exist, complete, after
    the first point."""
    from bmssl.bench import common, ntxent

    seen = []
    original = common.write

    def spy(rows, prefix):
        paths = original(rows, prefix)
        seen.append(len(json.loads(paths[1].read_text())))
        return paths

    monkeypatch.setattr(common, "write", spy)
    ntxent.run(__import__("torch").device("cpu"), [32, 64], [8], [2], ["fp32"], "in", False, 2, memory=False,
               show_progress=False, only=["torch"], out=tmp_path / "nt")
    assert len(seen) == 2 and 0 < seen[0] < seen[1]


def test_a_failing_point_is_reported_kept_apart_and_fails_the_run(tmp_path, monkeypatch, capsys):
    """One point fails: the others are written and the run exits 1 naming it; when every point
    fails, earlier results under --out are left as they were (not replaced by empty files)."""
    from bmssl.bench import common, ntxent

    original = common.time_modes

    def fail_at_64(loss_fn, inputs, device, repeats=20, **kwargs):
        if inputs[0].shape[0] == 64:
            raise RuntimeError("out of memory (simulated)")
        return original(loss_fn, inputs, device, repeats, **kwargs)

    monkeypatch.setattr(common, "time_modes", fail_at_64)
    flags = ["--views", "2", "--providers", "torch", "--repeats", "2", "--no-memory", "--out", str(tmp_path / "nt")]
    with pytest.raises(SystemExit, match="1 point"):
        ntxent.main(["--batches", "32", "64", *flags])
    assert "provider torch failed on" in capsys.readouterr().err
    kept = (tmp_path / "nt.json").read_text()
    assert {json.loads(r["params"])["B"] for r in json.loads(kept)} == {32}
    with pytest.raises(SystemExit, match="measured nothing"):
        ntxent.main(["--batches", "64", *flags])
    assert (tmp_path / "nt.json").read_text() == kept


def test_a_mode_that_fails_keeps_the_modes_measured(tmp_path, monkeypatch, capsys):
    """Out of memory in the backward (eager at B = 65536 on the GPU, say) loses only that point's
    fwd+bwd and bwd: its fwd timing is written, and the run exits 1 naming the failed modes."""
    import torch

    from bmssl.bench import common, ntxent

    original = ntxent.loss_fn

    def forward_only(provider, temperature, variant):
        fn = original(provider, temperature, variant)

        def loss(*args):
            if torch.is_grad_enabled():
                raise RuntimeError("out of memory (simulated)")
            return fn(*args)
        return loss

    monkeypatch.setattr(ntxent, "loss_fn", forward_only)
    with pytest.raises(SystemExit, match="2 point"):
        ntxent.main(["--batches", "32", "--views", "2", "--providers", "torch", "--repeats", "2", "--no-memory",
                     "--out", str(tmp_path / "nt")])
    assert "'mode': 'fwd+bwd'" in capsys.readouterr().err
    assert {r["mode"] for r in json.loads((tmp_path / "nt.json").read_text())} == {"fwd"}
    failures = []
    assert set(common.time_modes(forward_only("torch", 0.1, "in"), ntxent.inputs(8, 4, 2, torch.float32,
                                                                                   torch.device("cpu")),
                                 torch.device("cpu"), repeats=1, failures=failures)) == {"fwd"}
    assert [mode for mode, _ in failures] == ["fwd+bwd", "bwd"]


def test_the_commit_comes_from_bmssl_commit_where_there_is_no_git(monkeypatch):
    from bmssl.bench import common

    monkeypatch.setenv("BMSSL_COMMIT", "abc1234-dirty")
    assert common.commit() == "abc1234-dirty"


def test_timing_percentiles_lie_within_the_samples(monkeypatch):
    from bmssl.bench import common

    samples = iter([0.010, 0.020, 0.001, 0.020, 0.021])  # seconds, as perf_counter differences
    clock = iter([0.0, next(samples), 1.0, 1.0 + next(samples), 2.0, 2.0 + next(samples),
                  3.0, 3.0 + next(samples), 4.0, 4.0 + next(samples)])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    stats = common.time_ms(lambda: None, __import__("torch").device("cpu"), warmup=0, repeats=2)
    assert stats["median_ms"] == pytest.approx(15.0)
    assert 10.0 <= stats["p20_ms"] <= stats["p80_ms"] <= 20.0  # the exclusive method gave 6 and 24


def test_bench_kl_bootstrap_measures_cpu_peak_memory(tmp_path):
    from bmssl.bench import kl_bootstrap

    rows = kl_bootstrap.main(["--rows", "256", "--classes", "8", "--no-compile", "--repeats", "2",
                              "--out", str(tmp_path / "kl")])
    peaks = {r["provider"]: r["value"] for r in rows if r["metric"] == "peak_bytes"}
    assert {"torch", "bmssl-cpu"} <= set(peaks) and all(v >= 0 for v in peaks.values())


def test_the_commit_is_dirty_for_code_changes_but_not_for_rewritten_results(tmp_path, monkeypatch):
    """A benchmark rewriting its committed results under bench/results/ is no code change: the
    omniglot table's second method was recorded as '-dirty' by the first one's record."""
    import shutil
    import subprocess
    import sys

    from bmssl.bench import common

    monkeypatch.delenv("BMSSL_COMMIT", raising=False)
    (tmp_path / "bmssl" / "bench").mkdir(parents=True)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    shutil.copy(common.__file__, tmp_path / "bmssl" / "bench" / "common.py")
    (tmp_path / "bench" / "results" / "r.json").write_text("{}")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    probe = [sys.executable, "-c", "import importlib.util as u; s = u.spec_from_file_location('c', "
             f"{str(tmp_path / 'bmssl' / 'bench' / 'common.py')!r}); m = u.module_from_spec(s); "
             "s.loader.exec_module(m); print(m.commit())"]
    clean = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    assert len(clean) >= 7 and not clean.endswith("-dirty"), clean
    (tmp_path / "bench" / "results" / "r.json").write_text('{"new": 1}')
    assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == clean
    (tmp_path / "bmssl" / "bench" / "common.py").write_text((tmp_path / "bmssl" / "bench" / "common.py").read_text()
                                                            + "\n# a change\n")
    assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == clean + "-dirty"
