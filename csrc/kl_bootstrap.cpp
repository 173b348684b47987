// Schema of the row-wise KL bootstrap op (DESIGN.md §1 "Bootstrapped target", §2).
//
//   a = student / T, b = target / T                          (rows of length C)
//   row_kl_r  = KL(softmax(b_r) || softmax(a_r)) = sum_j q_j (b_j - a_j) - lse(b_r) + lse(a_r)
//   row_lse_r = (lse(a_r), lse(b_r))                          saved for the backward
//   d row_kl_r / d student_rj = (softmax(a_r)_j - softmax(b_r)_j) / T
//
// The target is a stop-gradient: no op here differentiates through it.
// Kernels: csrc/cpu/kl_bootstrap.cpp, csrc/cuda/kl_bootstrap.cpp (+ kernels/kl_bootstrap.cu),
// bmssl/triton/kl_bootstrap.py. Twin: bmssl/reference/kl_bootstrap.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bmssl, m) {
  m.def("kl_bootstrap_rows(Tensor student, Tensor target, float temperature) -> (Tensor, Tensor)");
  m.def(
      "kl_bootstrap_rows_backward(Tensor grad_row_kl, Tensor student, Tensor target, "
      "Tensor row_lse, float temperature) -> Tensor");
}
