// The `bmssl` op namespace and what was built. Schemas of the ops are in csrc/<op>.cpp,
// kernels in csrc/cpu and csrc/cuda; the Python module entry point is csrc/module.cpp.
#include <torch/library.h>

#include <string>

namespace bmssl {

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
  return info;
}

}  // namespace bmssl

TORCH_LIBRARY(bmssl, m) {
  m.set_python_module("bmssl.ops");
  m.def("build_info() -> str", &bmssl::build_info);
}
