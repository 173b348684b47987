// The bmssl extension module: the op namespace and what was built.
//
// The module is imported only for its side effect, registering the `bmssl` ops with the
// dispatcher (schemas in csrc/<op>.cpp, kernels in csrc/cpu and csrc/cuda). It has no Python
// functions, so it needs no pybind11: a bare PyInit keeps this file quick to compile.
#include <Python.h>
#include <torch/library.h>

#include <string>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

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
