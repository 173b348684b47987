"""The README's Python API example runs as written (with fewer steps and episodes)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("BMSSL_CACHE_DIR", str(tmp_path))
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "MetaLearner" in b)
    shortened = example.replace("range(100)", "range(2)").replace("episodes=600", "episodes=4")
    assert shortened != example, "the README example changed shape; update this test"
    namespace = {}
    exec(compile(shortened, "README.md", "exec"), namespace)
    assert namespace["metrics"]["step"] == 2 and "outer_loss" in namespace["metrics"]
