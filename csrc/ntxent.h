// Input checks shared by the CPU and CUDA bindings of bmssl::ntxent_* (schema in csrc/ntxent.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>

namespace bmssl {

inline bool ntxent_variant_in(c10::string_view variant) {
  TORCH_CHECK(variant == "in" || variant == "out", "ntxent: variant must be \"in\" or \"out\", got ", variant);
  return variant == "in";
}

// u [T, B, d] and labels [T, B] int64, both on a device of type `device`; inv_tau finite and > 0.
inline void check_ntxent_inputs(const at::Tensor& u, const at::Tensor& labels, double inv_tau,
                                c10::DeviceType device) {
  TORCH_CHECK(u.dim() == 3, "ntxent: u must be [T, B, d], got ", u.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == u.size(0) && labels.size(1) == u.size(1),
              "ntxent: labels must be [T, B] = [", u.size(0), ", ", u.size(1), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "ntxent: labels must be int64");
  TORCH_CHECK(u.device().type() == device && labels.device().type() == device, "ntxent: expects ",
              c10::DeviceTypeName(device), " tensors");
  TORCH_CHECK(u.size(1) >= 2, "ntxent: a task needs at least 2 rows");
  TORCH_CHECK(inv_tau > 0 && std::isfinite(inv_tau), "ntxent: inv_tau must be finite and > 0");
}

// The accumulation type: fp64 for fp64 input, fp32 otherwise.
inline at::ScalarType ntxent_acc_type(const at::Tensor& u) {
  return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace bmssl
