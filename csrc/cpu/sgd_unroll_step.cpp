// CPU kernel of bmssl::sgd_unroll_step: out_k = params_k - lr * grads_k for all k at once.
// The tensors' elements form one index space that torch's OpenMP pool splits into chunks, so
// many small tensors cost one parallel region, not one per tensor. fp16/bf16 compute in fp32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../sgd_unroll_step.h"

namespace bmssl {
namespace {

std::vector<at::Tensor> sgd_unroll_step_cpu(at::TensorList params, at::TensorList grads, double lr) {
  check_sgd_lists(params, grads);
  std::vector<at::Tensor> outs, ps, gs;
  std::vector<int64_t> start{0};  // element offset of each tensor in the joint index space
  for (size_t k = 0; k < params.size(); ++k) {
    TORCH_CHECK(params[k].device().is_cpu(), "sgd_unroll_step: expects CPU tensors");
    ps.push_back(params[k].contiguous());
    gs.push_back(grads[k].contiguous());
    outs.push_back(at::empty_like(ps.back()));
    start.push_back(start.back() + ps.back().numel());
  }
  if (params.empty() || start.back() == 0) return outs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ps[0].scalar_type(), "sgd_unroll_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t step = acc_t(lr);
    at::parallel_for(0, start.back(), 1 << 15, [&](int64_t begin, int64_t end) {
      size_t k = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
      for (int64_t i = begin; i < end; ++k) {
        const int64_t stop = std::min(end, start[k + 1]), base = start[k];
        const scalar_t* p = ps[k].const_data_ptr<scalar_t>();
        const scalar_t* g = gs[k].const_data_ptr<scalar_t>();
        scalar_t* out = outs[k].mutable_data_ptr<scalar_t>();
        for (int64_t j = i - base; j < stop - base; ++j) out[j] = scalar_t(acc_t(p[j]) - step * acc_t(g[j]));
        i = stop;
      }
    });
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(bmssl, CPU, m) { m.impl("sgd_unroll_step", &sgd_unroll_step_cpu); }

}  // namespace bmssl
