// Checks shared by the CPU and CUDA bindings of bmssl::sgd_unroll_step.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace bmssl {

inline void check_sgd_lists(at::TensorList params, at::TensorList grads) {
  TORCH_CHECK(params.size() == grads.size(), "sgd_unroll_step: ", params.size(), " params but ",
              grads.size(), " grads");
  for (size_t k = 0; k < params.size(); ++k) {
    TORCH_CHECK(params[k].sizes() == grads[k].sizes(), "sgd_unroll_step: params[", k, "] ",
                params[k].sizes(), " and grads[", k, "] ", grads[k].sizes(), " differ in shape");
    TORCH_CHECK(params[k].scalar_type() == params[0].scalar_type() &&
                    grads[k].scalar_type() == params[0].scalar_type(),
                "sgd_unroll_step: every tensor must have one dtype");
    TORCH_CHECK(params[k].device() == params[0].device() && grads[k].device() == params[0].device(),
                "sgd_unroll_step: every tensor must be on one device");
  }
}

}  // namespace bmssl
