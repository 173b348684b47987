// Schema of the fused multi-view NT-Xent (DESIGN.md §1 "Task loss", §2).
//
//   u [T, B, d] (rows already L2-normalised if asked), labels [T, B] int64 in [0, B)
//   s_ij = u_i . u_j * inv_tau,  A(i) = {j != i},  P(i) = {j != i : y_j = y_i}
//   "in":  l_i = lse_{A(i)} s_i - lse_{P(i)} s_i          "out": l_i = lse_{A(i)} s_i - mean_{P(i)} s_i
//   task_loss [T] = mean_i l_i;  row_stats [T, B, 2] = (lse_A, lse_P) for "in", (lse_A, |P(i)|) for "out"
//
// Backward, with g_t the gradient of task_loss_t and c_t = g_t inv_tau / B:
//   G_ij = p_ij - q_ij,  p_ij = e^{s_ij - lse_A(i)},  q_ij = e^{s_ij - lse_P(i)} ("in") or 1/|P(i)| ("out")
//   grad_u = c (G + G^T) U
// Double backward, with V the gradient arriving at grad_u:
//   sdot_ij = (V_i . u_j + u_i . V_j) inv_tau,  a_i = sum_j p_ij sdot_ij,  b_i = sum_j q_ij sdot_ij
//   H_ij = p_ij (sdot_ij - a_i) - q_ij (sdot_ij - b_i)          (no q term for "out": q is constant)
//   d/dg_t = (1/B) sum_i (a_i - b_i),   d/du = c [(G + G^T) V + (H + H^T) U]
// The B x B matrix is never stored: kernels work on blocks of rows against all columns.
// Kernels: csrc/cpu/ntxent.cpp. Twin: bmssl/reference/ntxent.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bmssl, m) {
  m.def("ntxent_forward(Tensor u, Tensor labels, float inv_tau, str variant) -> (Tensor, Tensor)");
  m.def(
      "ntxent_backward(Tensor grad_task_loss, Tensor u, Tensor labels, Tensor row_stats, "
      "float inv_tau, str variant) -> Tensor");
  m.def(
      "ntxent_double_backward(Tensor grad_grad_u, Tensor grad_task_loss, Tensor u, Tensor labels, "
      "Tensor row_stats, float inv_tau, str variant) -> (Tensor, Tensor)");
}
