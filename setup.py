"""Build of bmssl and its compiled extension bmssl._C.

The C++ CPU kernels are always built. The CUDA kernels (kernels/*.cu and csrc/cuda/*.cpp) are
added when torch is a CUDA build and nvcc is found, or when BMSSL_FORCE_CUDA=1; BMSSL_NO_CUDA=1
leaves them out. Flags come from csrc/build_flags.json, which CMakeLists.txt reads too.

Build against the torch you have: pip install --no-build-isolation .
"""
import glob
import json
import os
import shutil
import site
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
FLAGS = json.loads((ROOT / "csrc" / "build_flags.json").read_text())

try:
    import torch
except ImportError:
    sys.exit("bmssl builds against an installed torch, and none was found. Install torch first, "
             "then run: pip install --no-build-isolation .")


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _nvidia_include_dirs():
    """Headers of the pip CUDA wheels (nvidia/cu13/include and friends), which torch omits."""
    found = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        found += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include")))
        found += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


def _want_cuda():
    """(build CUDA?, why) from torch, nvcc and the BMSSL_FORCE_CUDA / BMSSL_NO_CUDA switches."""
    if _env_flag("BMSSL_NO_CUDA"):
        return False, "BMSSL_NO_CUDA=1"
    nvcc = _find_nvcc()
    if _env_flag("BMSSL_FORCE_CUDA"):
        if torch.version.cuda is None or nvcc is None:
            sys.exit(f"BMSSL_FORCE_CUDA=1, but torch {torch.__version__} has CUDA "
                     f"{torch.version.cuda} and nvcc is {nvcc}: both are needed.")
        return True, "forced by BMSSL_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if nvcc is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda}, nvcc {nvcc}"


WITH_CUDA, CUDA_REASON = _want_cuda()
ARCHS = ";".join(FLAGS["cuda_archs"])
if WITH_CUDA:
    # Fix what torch gets wrong on machines without a GPU or with CUDA from pip wheels:
    # it reads CUDA_HOME when cpp_extension is imported, guesses the arch list from the GPU
    # it sees (none here), and does not know the nvidia/cu13 headers.
    os.environ.setdefault("CUDA_HOME", str(Path(_find_nvcc()).resolve().parent.parent))
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = ARCHS
    extra = _nvidia_include_dirs()
    if extra:
        os.environ["CPATH"] = os.pathsep.join(extra + [p for p in [os.environ.get("CPATH")] if p])

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = list(FLAGS["cxx"])
    # py_limited_api: the module is a bare PyInit (csrc/module.cpp) and the ops go through the
    # dispatcher, so one bmssl/_C.abi3.so serves every CPython >= 3.9 of the same torch, and
    # libtorch_python is not linked
    if not WITH_CUDA:
        return CppExtension("bmssl._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=FLAGS["link"],
                            py_limited_api=True)
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("kernels/*.cu"))
    cxx += ["-DBMSSL_WITH_CUDA"]
    nvcc = list(FLAGS["nvcc"]) + ["-DBMSSL_WITH_CUDA"]
    return CUDAExtension("bmssl._C", sources, include_dirs=_nvidia_include_dirs(),
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=FLAGS["link"],
                         py_limited_api=True)


def _write_build_config():
    """bmssl/_build_config.json: what this build was made with, for `bmssl info`."""
    config = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": WITH_CUDA,
        "cuda_reason": CUDA_REASON,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if WITH_CUDA else None,
        "cxx_flags": FLAGS["cxx"],
        "nvcc_flags": FLAGS["nvcc"] if WITH_CUDA else None,
        "python": sys.version.split()[0],
    }
    (ROOT / "bmssl" / "_build_config.json").write_text(json.dumps(config, indent=2) + "\n")


_write_build_config()
print(f"bmssl: CUDA kernels {'on' if WITH_CUDA else 'off'} ({CUDA_REASON})", file=sys.stderr)

setup(
    packages=find_packages(include=["bmssl", "bmssl.*"]),
    package_data={"bmssl": ["_build_config.json"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
