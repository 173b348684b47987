"""The build: the CUDA kernels compile for sm_80 and sm_90 with the project's nvcc flags
(they hold no torch headers, so this takes seconds), and the package layout is right."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAGS = json.loads((ROOT / "csrc" / "build_flags.json").read_text())
NVCC = shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if Path(p).exists()), None)
KERNELS = sorted((ROOT / "kernels").glob("*.cu"))


def test_there_are_cuda_kernels():
    assert KERNELS


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (CUDA toolkit absent)")
@pytest.mark.parametrize("arch", [a.replace(".", "") for a in FLAGS["cuda_archs"]])
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda p: p.name)
def test_nvcc_compiles_kernel(kernel, arch, tmp_path):
    command = [NVCC, *FLAGS["nvcc"], f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c",
               str(kernel), "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "kernel.o").stat().st_size > 0


def test_kernels_dir_is_not_an_installed_package():
    import bmssl

    site = Path(bmssl.__file__).resolve().parents[1]
    assert not (site / "kernels" / "__init__.py").exists()
    assert not (ROOT / "kernels" / "__init__.py").exists()
