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


@pytest.mark.parametrize("flags, message", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--batches", "0"], "--batches must be >= 1"),
    (["--providers", "bogus"], "--providers: unknown bogus"),
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
