// CUDA binding of bmssl::kl_bootstrap_rows: checks, allocation and stream; the kernels are in
// kernels/kl_bootstrap.cu (maths in csrc/kl_bootstrap.cpp).
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kl_bootstrap.h"

#include "../../kernels/kl_bootstrap.h"
#include "element_type.h"

namespace bmssl {
namespace {

void check_rows(const at::Tensor& student, const at::Tensor& target, const char* op) {
  check_kl_rows(student, target, op);
  TORCH_CHECK(student.is_cuda(), op, ": expects CUDA tensors");
}

std::tuple<at::Tensor, at::Tensor> kl_bootstrap_rows_cuda(const at::Tensor& student,
                                                          const at::Tensor& target,
                                                          double temperature) {
  check_rows(student, target, "kl_bootstrap_rows");
  TORCH_CHECK(temperature > 0, "kl_bootstrap_rows: temperature must be > 0, got ", temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = target.contiguous();
  const int64_t rows = s.size(0), classes = s.size(1);
  const auto acc_type = at::toOpMathType(s.scalar_type());
  at::Tensor row_kl = at::empty({rows}, s.options().dtype(acc_type));
  at::Tensor row_lse = at::empty({rows, 2}, s.options().dtype(acc_type));
  const cudaError_t status = cuda::kl_bootstrap_rows_forward(
      element_type_of(s, "kl_bootstrap_rows"), s.const_data_ptr(), t.const_data_ptr(), rows, classes,
      temperature, row_kl.mutable_data_ptr(), row_lse.mutable_data_ptr(),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "kl_bootstrap_rows: launch failed: ", cudaGetErrorString(status));
  return {row_kl, row_lse};
}

at::Tensor kl_bootstrap_rows_backward_cuda(const at::Tensor& grad_row_kl, const at::Tensor& student,
                                           const at::Tensor& target, const at::Tensor& row_lse,
                                           double temperature) {
  check_rows(student, target, "kl_bootstrap_rows_backward");
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t rows = student.size(0), classes = student.size(1);
  check_kl_backward(grad_row_kl, row_lse, rows);
  const auto acc_type = at::toOpMathType(student.scalar_type());
  const at::Tensor s = student.contiguous(), t = target.contiguous();
  const at::Tensor g = grad_row_kl.to(acc_type).contiguous(), lse = row_lse.to(acc_type).contiguous();
  at::Tensor grad_student = at::empty_like(s);
  const cudaError_t status = cuda::kl_bootstrap_rows_backward(
      element_type_of(s, "kl_bootstrap_rows_backward"), g.const_data_ptr(), s.const_data_ptr(),
      t.const_data_ptr(), lse.const_data_ptr(), rows, classes, temperature,
      grad_student.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "kl_bootstrap_rows_backward: launch failed: ",
              cudaGetErrorString(status));
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(bmssl, CUDA, m) {
  m.impl("kl_bootstrap_rows", &kl_bootstrap_rows_cuda);
  m.impl("kl_bootstrap_rows_backward", &kl_bootstrap_rows_backward_cuda);
}

}  // namespace bmssl
