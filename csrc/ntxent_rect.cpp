// Schema of the rectangular NT-Xent: local rows against (gathered) global columns (DESIGN.md §2).
//
//   u_rows [R, d] are the columns row_offset .. row_offset + R - 1 of u_cols [N, d]
//   s_rc = u_r . u_c inv_tau;  A(r) = {c != row_offset + r};  P(r) = {c in A(r): y_c = y_r}
//   loss = mean_r l_r with l_r as in the square form ("in" or "out"); row_stats [2, R]
// Backward, c = g inv_tau / R, G_rc = p_rc - q_rc from row r's statistics:
//   grad_rows = c G U_cols,   grad_cols = c G^T U_rows
// Summed over ranks (all_gather's backward), grad_cols + grad_rows is the square gradient.
// Once differentiable. Kernels: csrc/cpu/ntxent_rect.cpp. Twin: bmssl/reference/ntxent.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(bmssl, m) {
  m.def(
      "ntxent_rect_forward(Tensor u_rows, Tensor u_cols, Tensor labels_rows, Tensor labels_cols, "
      "int row_offset, float inv_tau, str variant) -> (Tensor, Tensor)");
  m.def(
      "ntxent_rect_backward(Tensor grad_loss, Tensor u_rows, Tensor u_cols, Tensor labels_rows, "
      "Tensor labels_cols, Tensor row_stats, int row_offset, float inv_tau, str variant) -> (Tensor, Tensor)");
}
