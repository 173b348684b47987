// The `bmssl` op namespace and what was built. Schemas of the ops are in csrc/<op>.cpp,
// kernels in csrc/cpu and csrc/cuda; the Python module entry point is csrc/module.cpp.
#include <torch/library.h>

#include "cpu/vector_clones.h"

#include <string>

namespace bmssl {

// Which of the vector clones (cpu/vector_clones.h) this CPU runs: three versions of one function
// with the clones' own target strings, so the loader's resolver picks among them by the same rule
// as it picks the clones' (GCC function multiversioning).
#if BMSSL_HAVE_VECTOR_CLONES
__attribute__((target("default"))) static const char* vector_clone() { return "default"; }
__attribute__((target(BMSSL_CLONE_NARROW))) static const char* vector_clone() { return BMSSL_CLONE_NARROW; }
__attribute__((target(BMSSL_CLONE_WIDE))) static const char* vector_clone() { return BMSSL_CLONE_WIDE; }
#else
static const char* vector_clone() { return "none (no clones on this compiler or architecture)"; }
#endif

// Facts compiled into this build, as "key=value" lines, for `bmssl info` (the flags are in
// bmssl/_build_config.json, written by setup.py).
static std::string build_info() {
  std::string info;
#ifdef BMSSL_WITH_CUDA
  info += "cuda=1\n";
#else
  info += "cuda=0\n";
#endif
#if defined(__clang__)
  info += std::string("compiler=clang ") + __clang_version__ + "\n";
#elif defined(__GNUC__)
  info += std::string("compiler=gcc ") + __VERSION__ + "\n";
#endif
  info += std::string("cpu_vector_clone=") + vector_clone() + "\n";
  return info;
}

}  // namespace bmssl

TORCH_LIBRARY(bmssl, m) {
  m.set_python_module("bmssl.ops");
  m.def("build_info() -> str", &bmssl::build_info);
}
