"""The bmssl console script and python -m bmssl."""
import json
import shutil
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "bmssl", *args], capture_output=True, text=True,
                          timeout=300)


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
