"""Smoke run of bench/omniglot_table.py (a few outer steps, a few episodes): the JSON records and
table.md are written, a rerun skips finished methods, and the cached-feature evaluation equals
bmssl.eval.evaluate episode by episode."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "omniglot_table.py"


def _script():
    spec = importlib.util.spec_from_file_location("omniglot_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experiment_script_smoke(tmp_path, capsys):
    from bmssl.data import find_omniglot_dir
    try:
        find_omniglot_dir()
        dataset = "omniglot"
    except FileNotFoundError:
        dataset = "glyphs"
    script = _script()
    argv = ["--dataset", dataset, "--out", str(tmp_path), "--steps", "2", "--tasks", "2", "--ways", "3",
            "--query-views", "2", "--episodes", "6", "--probe-every", "1", "--verify", "3",
            "--methods", "scratch", "bmssl_task", "--threads", "1", "--max-test-classes", "21"]
    script.main(argv)
    for method in ("scratch", "bmssl_task"):
        record = json.loads((tmp_path / f"{method}.json").read_text())
        assert set(record["results"]) == {f"{p}/{s}" for p in ("proto", "finetune") for s in ("5w1s", "5w5s", "20w1s")}
        assert all(len(r["accuracies"]) == 6 for r in record["results"].values())
        assert max(record["eval"]["verification_max_abs_diff_vs_bmssl_eval"].values()) < 1e-4
    record = json.loads((tmp_path / "bmssl_task.json").read_text())
    assert record["budget"]["outer_steps"] == 2 and len(record["history"]) == 2 and len(record["probes"]) == 3
    assert "kl" in record["history"][-1] and "task_loss" in record["history"][-1]
    assert "| BMSSL + task loss" in (tmp_path / "table.md").read_text()
    capsys.readouterr()
    script.main(argv)
    assert "skip scratch" in capsys.readouterr().err
    # rows of different commits are not one table (the committed ones once mixed three commits)
    record["commit"] = "0000000"
    (tmp_path / "bmssl_task.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="differ in\n  commit: .*bmssl_task.json \"0000000\""):
        script.main(argv + ["--table-only"])
