// The kernels' ElementType of a tensor, shared by the CUDA bindings (csrc/cuda/*.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../../kernels/kl_bootstrap.h"  // ElementType

namespace bmssl {

inline cuda::ElementType element_type_of(const at::Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::ElementType::kF32;
    case at::kDouble: return cuda::ElementType::kF64;
    case at::kHalf: return cuda::ElementType::kF16;
    case at::kBFloat16: return cuda::ElementType::kBF16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", x.scalar_type());
  }
}

}  // namespace bmssl
