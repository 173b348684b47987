// Shape checks shared by the CPU and CUDA bindings of bmssl::kl_bootstrap_rows.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace bmssl {

inline void check_kl_rows(const at::Tensor& student, const at::Tensor& target, const char* op) {
  TORCH_CHECK(student.dim() == 2, op, ": student must be [R, C], got ", student.sizes());
  TORCH_CHECK(student.sizes() == target.sizes(), op, ": student ", student.sizes(), " and target ",
              target.sizes(), " differ in shape");
  TORCH_CHECK(student.scalar_type() == target.scalar_type(), op, ": dtypes differ");
  TORCH_CHECK(student.device() == target.device(), op, ": devices differ");
  TORCH_CHECK(student.size(1) > 0, op, ": rows must have at least one class");
}

inline void check_kl_backward(const at::Tensor& grad_row_kl, const at::Tensor& row_lse, int64_t rows) {
  TORCH_CHECK(grad_row_kl.numel() == rows, "kl_bootstrap_rows_backward: grad_row_kl must have ",
              rows, " elements, got ", grad_row_kl.numel());
  TORCH_CHECK(row_lse.numel() == 2 * rows, "kl_bootstrap_rows_backward: row_lse must be [R, 2]");
}

}  // namespace bmssl
