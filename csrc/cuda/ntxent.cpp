// CUDA binding of bmssl::ntxent_forward / ntxent_backward / ntxent_double_backward: checks,
// contiguity, device guard, stream and allocation; the kernels are in kernels/ntxent.cu (maths in
// csrc/ntxent.cpp). Outputs match the CPU kernels: task_loss, row_stats and d/dg in the
// accumulation type (fp64 for fp64, else fp32; d/dg in grad_task_loss's dtype), grad_u like u.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../../kernels/ntxent.h"
#include "../ntxent.h"
#include "element_type.h"

namespace bmssl {
namespace {

constexpr int64_t kNoRow = std::numeric_limits<int64_t>::max();

void check_cuda_inputs(const at::Tensor& u, const at::Tensor& labels, double inv_tau) {
  check_ntxent_inputs(u, labels, inv_tau, c10::DeviceType::CUDA);
  TORCH_CHECK(labels.device() == u.device(), "ntxent: u is on ", u.device(), " but labels are on ", labels.device());
}

void check_on_device_of(const at::Tensor& x, const at::Tensor& u, const char* what) {
  TORCH_CHECK(x.device() == u.device(), "ntxent: ", what, " is on ", x.device(), ", u on ", u.device());
}

cuda::NTXentShape shape_of(const at::Tensor& u) { return {u.size(0), u.size(1), u.size(2)}; }

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(status));
}

// The forward flags rows whose label is out of range or that have no positive. Reading the flags
// waits for the kernel, so it is skipped while the stream is captured into a CUDA graph.
void raise_label_errors(const at::Tensor& errors, const at::Tensor& labels, cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check_launch(cudaStreamIsCapturing(stream, &capture), "ntxent_forward");
  if (capture != cudaStreamCaptureStatusNone) return;
  const at::Tensor host = errors.cpu();
  const int64_t* flagged = host.const_data_ptr<int64_t>();
  const int64_t batch = labels.size(1);
  if (flagged[0] != kNoRow) {
    const int64_t label = labels.select(0, flagged[0] / batch).select(0, flagged[0] % batch).item<int64_t>();
    TORCH_CHECK(false, "ntxent: labels must lie in [0, B) = [0, ", batch, "), got ", label);
  }
  if (flagged[1] != kNoRow) {
    const int64_t task = flagged[1] / batch, anchor = flagged[1] % batch;
    const int64_t label = labels.select(0, task).select(0, anchor).item<int64_t>();
    TORCH_CHECK(false, "ntxent: anchor ", anchor, " of task ", task, " (label ", label, ") has no positive");
  }
}

std::tuple<at::Tensor, at::Tensor> ntxent_forward_cuda(const at::Tensor& u, const at::Tensor& labels,
                                                       double inv_tau, c10::string_view variant) {
  check_cuda_inputs(u, labels, inv_tau);
  const bool in = ntxent_variant_in(variant);
  const c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor uc = u.contiguous(), y = labels.contiguous();
  const auto acc = uc.options().dtype(ntxent_acc_type(u));
  const int64_t tasks = u.size(0), batch = u.size(1);
  at::Tensor row_loss = at::empty({tasks, batch}, acc);
  at::Tensor stats = at::empty({tasks, 2, batch}, acc);
  at::Tensor errors = at::full({2}, kNoRow, uc.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cuda::ntxent_forward(element_type_of(uc, "ntxent_forward"), uc.const_data_ptr(),
                                    y.const_data_ptr<int64_t>(), shape_of(uc), inv_tau, in,
                                    row_loss.mutable_data_ptr(), stats.mutable_data_ptr(),
                                    errors.mutable_data_ptr<int64_t>(), stream),
               "ntxent_forward");
  raise_label_errors(errors, y, stream);
  return {row_loss.mean(1), stats};
}

at::Tensor ntxent_backward_cuda(const at::Tensor& grad_task_loss, const at::Tensor& u, const at::Tensor& labels,
                                const at::Tensor& stats, double inv_tau, c10::string_view variant) {
  check_cuda_inputs(u, labels, inv_tau);
  const bool in = ntxent_variant_in(variant);
  const int64_t tasks = u.size(0), batch = u.size(1);
  TORCH_CHECK(grad_task_loss.numel() == tasks, "ntxent_backward: grad_task_loss must have T elements");
  TORCH_CHECK(stats.numel() == tasks * 2 * batch, "ntxent_backward: row_stats must be [T, 2, B]");
  check_on_device_of(grad_task_loss, u, "grad_task_loss");
  check_on_device_of(stats, u, "row_stats");
  const c10::cuda::CUDAGuard guard(u.device());
  const auto acc = ntxent_acc_type(u);
  const at::Tensor uc = u.contiguous(), y = labels.contiguous();
  const at::Tensor g = grad_task_loss.to(acc).contiguous(), st = stats.to(acc).contiguous();
  at::Tensor grad_u = at::empty_like(uc);
  check_launch(cuda::ntxent_backward(element_type_of(uc, "ntxent_backward"), g.const_data_ptr(),
                                     uc.const_data_ptr(), y.const_data_ptr<int64_t>(), st.const_data_ptr(),
                                     shape_of(uc), inv_tau, in, grad_u.mutable_data_ptr(),
                                     c10::cuda::getCurrentCUDAStream()),
               "ntxent_backward");
  return grad_u;
}

std::tuple<at::Tensor, at::Tensor> ntxent_double_backward_cuda(
    const at::Tensor& grad_grad_u, const at::Tensor& grad_task_loss, const at::Tensor& u,
    const at::Tensor& labels, const at::Tensor& stats, double inv_tau, c10::string_view variant) {
  check_cuda_inputs(u, labels, inv_tau);
  const bool in = ntxent_variant_in(variant);
  const int64_t tasks = u.size(0), batch = u.size(1);
  TORCH_CHECK(grad_grad_u.sizes() == u.sizes(), "ntxent_double_backward: grad_grad_u must be like u");
  TORCH_CHECK(grad_task_loss.numel() == tasks, "ntxent_double_backward: grad_task_loss must have T elements");
  TORCH_CHECK(stats.numel() == tasks * 2 * batch, "ntxent_double_backward: row_stats must be [T, 2, B]");
  check_on_device_of(grad_grad_u, u, "grad_grad_u");
  check_on_device_of(grad_task_loss, u, "grad_task_loss");
  check_on_device_of(stats, u, "row_stats");
  const c10::cuda::CUDAGuard guard(u.device());
  const auto acc = ntxent_acc_type(u);
  const at::Tensor uc = u.contiguous(), y = labels.contiguous();
  // V enters the matmuls in u's dtype (tensor cores for fp16/bf16), as in the Triton kernels
  const at::Tensor v = grad_grad_u.to(u.scalar_type()).contiguous();
  const at::Tensor g = grad_task_loss.to(acc).contiguous(), st = stats.to(acc).contiguous();
  at::Tensor ab = at::empty({tasks, 2, batch}, uc.options().dtype(acc));
  at::Tensor grad_u = at::empty_like(uc);
  check_launch(cuda::ntxent_double_backward(element_type_of(uc, "ntxent_double_backward"), v.const_data_ptr(),
                                            g.const_data_ptr(), uc.const_data_ptr(), y.const_data_ptr<int64_t>(),
                                            st.const_data_ptr(), shape_of(uc), inv_tau, in,
                                            ab.mutable_data_ptr(), grad_u.mutable_data_ptr(),
                                            c10::cuda::getCurrentCUDAStream()),
               "ntxent_double_backward");
  // d/dg_t = (1/B) sum_i (a_i - b_i)
  at::Tensor grad_grad_task = ab.select(1, 0).sub(ab.select(1, 1)).mean(1).to(grad_task_loss.scalar_type());
  return {grad_grad_task, grad_u};
}

}  // namespace

TORCH_LIBRARY_IMPL(bmssl, CUDA, m) {
  m.impl("ntxent_forward", &ntxent_forward_cuda);
  m.impl("ntxent_backward", &ntxent_backward_cuda);
  m.impl("ntxent_double_backward", &ntxent_double_backward_cuda);
}

}  // namespace bmssl
