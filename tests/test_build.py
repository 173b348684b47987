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
    """Compiles, and ptxas -v reports no spill and no stack frame in any kernel: register arrays
    stay in registers. (Before kernels/ntxent.cu gave ptxas its occupancy through
    __launch_bounds__, four of its kernels spilled, the fp32 forward 104 B per thread.)"""
    import re

    command = [NVCC, *FLAGS["nvcc"], f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-c",
               str(kernel), "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "kernel.o").stat().st_size > 0
    spills = [int(b) for b in re.findall(r"(\d+) bytes spill stores", result.stderr)]
    frames = [int(b) for b in re.findall(r"(\d+) bytes stack frame", result.stderr)]
    assert spills and len(frames) == len(spills), result.stderr[-2000:]  # one line per kernel: the report was read
    assert max(spills) == 0 and max(frames) == 0, result.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (CUDA toolkit absent)")
def test_the_ntxent_shared_memory_table_is_the_kernels(tmp_path):
    """bmssl.ops.ntxent.CUDA_SHARED_BYTES (what auto checks against the GPU's per-block limit)
    is the largest pass's Shared<...>::kBytes of kernels/ntxent.cu, per dtype."""
    import torch

    from bmssl.ops.ntxent import CUDA_SHARED_BYTES

    probe = tmp_path / "probe"
    command = [NVCC, *FLAGS["nvcc"], "-arch=sm_90", f"-I{ROOT / 'kernels'}", str(ROOT / "tests" / "cpp" /
                                                                               "ntxent_shared_bytes.cu"), "-o", str(probe)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = subprocess.run([str(probe)], capture_output=True, text=True, check=True).stdout.split("\n")
    largest = {getattr(torch, line.split()[0]): max(int(b) for b in line.split()[1:]) for line in printed if line}
    assert largest == CUDA_SHARED_BYTES


def test_the_cuda_ntxent_is_refused_where_its_shared_memory_does_not_fit():
    """sm_86 / sm_89 allow 99 KB per block: fp32 fits there, fp16 / bf16 / fp64 do not; an H100
    or H200 (227 KB) takes every dtype."""
    import torch

    from bmssl.ops.ntxent import cuda_shared_memory_reason

    assert "132608 B of shared memory" in cuda_shared_memory_reason(torch.bfloat16, 101376)
    assert cuda_shared_memory_reason(torch.float64, 101376) is not None
    assert cuda_shared_memory_reason(torch.float32, 101376) is None
    assert all(cuda_shared_memory_reason(dtype, 232448) is None
               for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64))


def test_kernels_dir_is_not_an_installed_package():
    import bmssl

    site = Path(bmssl.__file__).resolve().parents[1]
    assert not (site / "kernels" / "__init__.py").exists()
    assert not (ROOT / "kernels" / "__init__.py").exists()


def _cmake():
    """A cmake new enough for CUDA 13 (>= 3.31), or None."""
    cmake = shutil.which("cmake")
    if cmake is None:
        return None
    version = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout.split()[2]
    return cmake if tuple(int(x) for x in version.split(".")[:2]) >= (3, 31) else None


@pytest.mark.slow
@pytest.mark.skipif(_cmake() is None, reason="needs cmake >= 3.31 (pip install 'cmake>=3.31')")
def test_cmake_builds_the_same_sources_and_ctest_passes(tmp_path):
    """CMakeLists.txt configures, builds the module, the C++ tests and the nvcc check (when nvcc
    is there) from csrc/build_flags.json, and ctest passes."""
    import sys

    build = tmp_path / "cmake"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = subprocess.run([_cmake(), "-S", str(ROOT), "-B", str(build), *generator,
                                f"-DPython3_EXECUTABLE={sys.executable}"],
                               capture_output=True, text=True, timeout=600)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    assert ("nvcc check of kernels/*.cu" in configure.stdout) == (NVCC is not None)
    built = subprocess.run([_cmake(), "--build", str(build), "-j2"], capture_output=True, text=True,
                           timeout=900)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    ninja_file = (build / "build.ninja").read_text() if generator else ""
    for flag in FLAGS["cxx"]:
        assert not generator or flag in ninja_file, f"{flag} missing from the CMake build"
    tested = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"],
                            capture_output=True, text=True, timeout=300)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "100% tests passed" in tested.stdout


CUDA_INCLUDE = next((p for p in ["/usr/local/cuda/include"] if Path(p, "cuda_runtime_api.h").exists()), None)


@pytest.mark.skipif(CUDA_INCLUDE is None, reason="CUDA toolkit headers not installed")
@pytest.mark.parametrize("binding", sorted((ROOT / "csrc" / "cuda").glob("*.cpp")), ids=lambda p: p.name)
def test_cuda_bindings_compile_against_torch_headers(binding, tmp_path):
    """The CUDA bindings (csrc/cuda/*.cpp) are compiled only where torch has CUDA; here they are
    syntax-checked against torch's c10/cuda headers. The CPU wheel lacks one generated header,
    c10/cuda/impl/cuda_cmake_macros.h, whose content is a single #define: a stub stands in."""
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    command = ["g++", *[f for f in FLAGS["cxx"] if f.startswith("-std=")], "-fsyntax-only", *[f"-I{p}" for p in include_paths()],
               f"-I{tmp_path}", f"-I{CUDA_INCLUDE}", "-DBMSSL_WITH_CUDA", str(binding)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def _cpu_flags():
    """The flags of the first CPU in /proc/cpuinfo (Linux), or None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((l for l in text.splitlines() if l.startswith("flags")), None)
    return set(line.split(":", 1)[1].split()) if line else None


@pytest.mark.skipif(_cpu_flags() is None, reason="needs /proc/cpuinfo (Linux) to know what the CPU supports")
def test_cpu_runs_the_widest_vector_clone_it_supports():
    """The CPU kernels' vector clones (csrc/cpu/vector_clones.h) are keyed on ISA level: a CPU
    with AVX-512 runs the AVX-512 clone, whatever its vendor. (They were keyed on Intel CPU models
    once, and an AVX-512 AMD EPYC ran the baseline clone at 2.4x the time.) build_info reports the
    version a probe with the clones' own target strings resolves to."""
    import platform

    from bmssl import _extension

    if not _extension.loaded():
        pytest.skip(_extension.LOAD_ERROR)
    facts = _extension.compiled_facts()
    if platform.machine() != "x86_64" or not facts.get("compiler", "").startswith("gcc"):
        assert facts.get("cpu_vector_clone", "").startswith("none")
        return
    flags = _cpu_flags()
    if int(facts["compiler"].split()[1].split(".")[0]) >= 12:  # ISA levels x86-64-v4 / v3
        levels = (("arch=x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
                  ("arch=x86-64-v3", {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}))
    else:  # single features
        levels = (("avx512f", {"avx512f"}), ("avx2", {"avx2"}))
    expected = next((name for name, needs in levels if needs <= flags), "default")
    assert facts["cpu_vector_clone"] == expected, (facts, sorted(flags))


def test_a_module_built_against_another_torch_release_is_refused():
    """bmssl._C is not imported under a torch release other than the one it was built against
    (C++ extensions have no ABI across releases); the local part (+cu130, +cpu) is not a release."""
    from bmssl._extension import torch_mismatch

    assert torch_mismatch("2.11.0+cu130", "2.11.0+cu130") is None
    assert torch_mismatch("2.11.0", "2.11.0+cu130") is None
    assert torch_mismatch(None, "2.13.0+cpu") is None  # no record (a CMake build): let through
    why = torch_mismatch("2.11.0+cu130", "2.13.0+cpu")
    assert why is not None and "2.11.0+cu130" in why and "2.13.0+cpu" in why and "rebuild" in why


def test_the_module_is_built_for_the_stable_python_abi():
    """setup.py builds bmssl._C with py_limited_api: one _C.abi3.so for every CPython >= 3.10 of
    its torch (what lets bench/prebuild_for_device.sh build here, on 3.11, for the GPU machine's
    3.12), and it needs no symbol of libtorch_python."""
    from bmssl import _extension

    if not _extension.loaded():
        pytest.skip(_extension.LOAD_ERROR)
    from bmssl import _C

    assert Path(_C.__file__).name == "_C.abi3.so", _C.__file__
    if shutil.which("ldd"):
        linked = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True).stdout
        assert "libtorch_python" not in linked, linked


def test_sanitizer_script_runs_every_case_on_the_cpu_kernels():
    """bench/sanitize_cuda.py (compute-sanitizer's driver in the GPU session) runs all its cases;
    --device cpu sends them through the C++ CPU kernels, so the script is known to work before a
    GPU minute is spent on it."""
    import sys

    from bmssl import _extension

    if not _extension.loaded():
        pytest.skip(_extension.LOAD_ERROR)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "sanitize_cuda.py"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "36 cases ran, 0 not finite" in out.stdout, out.stdout[-2000:]


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs sha256sum (coreutils)")
def test_source_hash_follows_the_sources_of_the_module(tmp_path):
    """bench/source_hash.sh, which decides whether the GPU session may use a module prebuilt
    elsewhere, is the same for the same sources and changes when one byte of csrc/ changes."""
    for part in ("setup.py", "csrc", "kernels", "bench/source_hash.sh"):
        (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, tmp_path / part)
    script = tmp_path / "bench" / "source_hash.sh"
    digest = lambda: subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True).stdout  # noqa: E731
    first = digest()
    assert len(first.strip()) == 64 and digest() == first
    with open(tmp_path / "csrc" / "ntxent.cpp", "a") as source:
        source.write(" ")
    assert digest() != first
