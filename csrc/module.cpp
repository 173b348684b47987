// The Python module bmssl._C. Importing it is what registers the `bmssl` ops with the
// dispatcher (static registration in the other csrc files). It has no Python functions, so it
// needs no pybind11: a bare PyInit keeps the build quick. Kept apart so that C++ tests can link
// the op sources without libpython.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
