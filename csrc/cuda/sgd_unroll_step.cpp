// CUDA binding of bmssl::sgd_unroll_step: allocation, tables and stream; the kernel is in
// kernels/sgd_unroll_step.cu. More than kSgdTensorsPerLaunch tensors take several launches.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../../kernels/sgd_unroll_step.h"
#include "../sgd_unroll_step.h"
#include "element_type.h"

namespace bmssl {
namespace {

std::vector<at::Tensor> sgd_unroll_step_cuda(at::TensorList params, at::TensorList grads, double lr) {
  check_sgd_lists(params, grads);
  std::vector<at::Tensor> outs, ps, gs;
  if (params.empty()) return outs;
  TORCH_CHECK(params[0].is_cuda(), "sgd_unroll_step: expects CUDA tensors");
  const c10::cuda::CUDAGuard guard(params[0].device());
  for (size_t k = 0; k < params.size(); ++k) {
    ps.push_back(params[k].contiguous());
    gs.push_back(grads[k].contiguous());
    outs.push_back(at::empty_like(ps.back()));
  }
  const auto type = element_type_of(ps[0], "sgd_unroll_step");
  for (size_t first = 0; first < ps.size(); first += cuda::kSgdTensorsPerLaunch) {
    const int count = static_cast<int>(std::min<size_t>(cuda::kSgdTensorsPerLaunch, ps.size() - first));
    std::vector<const void*> p(count), g(count);
    std::vector<void*> o(count);
    std::vector<int64_t> n(count);
    for (int k = 0; k < count; ++k) {
      p[k] = ps[first + k].const_data_ptr();
      g[k] = gs[first + k].const_data_ptr();
      o[k] = outs[first + k].mutable_data_ptr();
      n[k] = ps[first + k].numel();
    }
    const cudaError_t status = cuda::sgd_unroll_step(type, count, p.data(), g.data(), o.data(), n.data(), lr,
                                                     c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == cudaSuccess, "sgd_unroll_step: launch failed: ", cudaGetErrorString(status));
  }
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(bmssl, CUDA, m) { m.impl("sgd_unroll_step", &sgd_unroll_step_cuda); }

}  // namespace bmssl
