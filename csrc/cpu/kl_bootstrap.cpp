// CPU kernel of bmssl::kl_bootstrap_rows and its backward (maths in csrc/kl_bootstrap.cpp).
//
// student, target: [R, C] contiguous, fp16/bf16/fp32/fp64. Rows run in parallel
// (at::parallel_for, torch's OpenMP pool); the forward makes two passes over a row's C values,
// accumulated in fp32 (fp64 for fp64 input).
//   row_kl  [R]    accumulation dtype
//   row_lse [R, 2] accumulation dtype: lse(student/T), lse(target/T)
// A target entry of -inf has probability 0 and contributes nothing (never 0 * inf = NaN).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../kl_bootstrap.h"

#include <cmath>
#include <limits>

namespace bmssl {
namespace {

void check_rows(const at::Tensor& student, const at::Tensor& target, const char* op) {
  check_kl_rows(student, target, op);
  TORCH_CHECK(student.device().is_cpu(), op, ": expects CPU tensors");
}

// Grain: enough rows per task that a task is worth a thread.
int64_t row_grain(int64_t classes) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(classes, 1)); }

template <typename scalar_t>
void forward_rows(const scalar_t* student, const scalar_t* target, int64_t rows, int64_t classes,
                  double temperature, at::opmath_type<scalar_t>* row_kl,
                  at::opmath_type<scalar_t>* row_lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_t = acc_t(1) / acc_t(temperature);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, rows, row_grain(classes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* s = student + r * classes;
      const scalar_t* t = target + r * classes;
      acc_t max_a = neg_inf, max_b = neg_inf;
      for (int64_t j = 0; j < classes; ++j) {
        max_a = std::max(max_a, acc_t(s[j]) * inv_t);
        max_b = std::max(max_b, acc_t(t[j]) * inv_t);
      }
      // KL = E_q[b' - a'] + log(sum_a / sum_b) with a' = a - max_a, b' = b - max_b, sum_x = sum_j e^{x'_j}:
      // the shifts cancel inside each term, so neither large logits (lse ~ 1e4: ~1e-3 lost in
      // lse_a - lse_b) nor a student that is the target plus a constant (cancelling O(shift) sums)
      // cost accuracy. cross = sum_j e^{b'_j} (b'_j - a'_j).
      acc_t sum_a = 0, sum_b = 0, cross = 0;
      for (int64_t j = 0; j < classes; ++j) {
        const acc_t a = acc_t(s[j]) * inv_t - max_a, b = acc_t(t[j]) * inv_t - max_b;
        sum_a += std::exp(a);
        const acc_t eb = std::exp(b);
        sum_b += eb;
        if (eb > 0) cross += eb * (b - a);
      }
      const acc_t lse_a = max_a + std::log(sum_a), lse_b = max_b + std::log(sum_b);
      row_kl[r] = cross / sum_b + std::log(sum_a / sum_b);
      row_lse[2 * r] = lse_a;
      row_lse[2 * r + 1] = lse_b;
    }
  });
}

template <typename scalar_t>
void backward_rows(const at::opmath_type<scalar_t>* grad_row_kl, const scalar_t* student,
                   const scalar_t* target, const at::opmath_type<scalar_t>* row_lse, int64_t rows,
                   int64_t classes, double temperature, scalar_t* grad_student) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_t = acc_t(1) / acc_t(temperature);
  at::parallel_for(0, rows, row_grain(classes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t scale = grad_row_kl[r] * inv_t;
      const acc_t lse_a = row_lse[2 * r], lse_b = row_lse[2 * r + 1];
      const int64_t base = r * classes;
      for (int64_t j = 0; j < classes; ++j) {
        const acc_t p_student = std::exp(acc_t(student[base + j]) * inv_t - lse_a);
        const acc_t p_target = std::exp(acc_t(target[base + j]) * inv_t - lse_b);
        grad_student[base + j] = scalar_t(scale * (p_student - p_target));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kl_bootstrap_rows_cpu(const at::Tensor& student,
                                                         const at::Tensor& target,
                                                         double temperature) {
  check_rows(student, target, "kl_bootstrap_rows");
  TORCH_CHECK(temperature > 0, "kl_bootstrap_rows: temperature must be > 0, got ", temperature);
  const at::Tensor s = student.contiguous(), t = target.contiguous();
  const int64_t rows = s.size(0), classes = s.size(1);
  const auto acc_type = at::toOpMathType(s.scalar_type());
  at::Tensor row_kl = at::empty({rows}, s.options().dtype(acc_type));
  at::Tensor row_lse = at::empty({rows, 2}, s.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kl_bootstrap_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_rows<scalar_t>(s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), rows, classes,
                           temperature, row_kl.mutable_data_ptr<acc_t>(),
                           row_lse.mutable_data_ptr<acc_t>());
  });
  return {row_kl, row_lse};
}

at::Tensor kl_bootstrap_rows_backward_cpu(const at::Tensor& grad_row_kl, const at::Tensor& student,
                                          const at::Tensor& target, const at::Tensor& row_lse,
                                          double temperature) {
  check_rows(student, target, "kl_bootstrap_rows_backward");
  const int64_t rows = student.size(0), classes = student.size(1);
  const auto acc_type = at::toOpMathType(student.scalar_type());
  check_kl_backward(grad_row_kl, row_lse, rows);
  const at::Tensor s = student.contiguous(), t = target.contiguous();
  const at::Tensor g = grad_row_kl.to(acc_type).contiguous(), lse = row_lse.to(acc_type).contiguous();
  at::Tensor grad_student = at::empty_like(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kl_bootstrap_rows_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_rows<scalar_t>(g.const_data_ptr<acc_t>(), s.const_data_ptr<scalar_t>(),
                            t.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(), rows, classes,
                            temperature, grad_student.mutable_data_ptr<scalar_t>());
  });
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(bmssl, CPU, m) {
  m.impl("kl_bootstrap_rows", &kl_bootstrap_rows_cpu);
  m.impl("kl_bootstrap_rows_backward", &kl_bootstrap_rows_backward_cpu);
}

}  // namespace bmssl
