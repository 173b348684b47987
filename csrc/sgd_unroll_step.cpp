// Schema of the fused multi-tensor SGD step of the inner loop (DESIGN.md §2, "Fused inner-loop
// unroll"):   out_k = params_k - lr * grads_k   for every tensor k, in one launch.
// Out of place: the unroll keeps every w_l for the second-order gradient. It is linear, so its
// backward is trivial: d params_k = d out_k, d grads_k = -lr d out_k (bmssl/ops/sgd.py).
// Kernels: csrc/cpu/sgd_unroll_step.cpp, kernels/sgd_unroll_step.cu (bound in
// csrc/cuda/sgd_unroll_step.cpp), bmssl/triton/sgd_unroll_step.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bmssl, m) {
  m.def("sgd_unroll_step(Tensor[] params, Tensor[] grads, float lr) -> Tensor[]");
}
