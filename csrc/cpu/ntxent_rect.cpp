// CPU kernels of the rectangular NT-Xent (maths in csrc/ntxent_rect.cpp).
//
// Blocks of kRowBlock local rows: one BLAS call forms S_I = U_I U_cols^T inv_tau
// ([kRowBlock, N] scratch), the rows are walked in parallel (csrc/cpu/ntxent_rows.h), and in
// the backward two BLAS calls add c G_I U_cols to grad_rows and c G_I^T U_I to grad_cols. Blocks
// run one after another, so grad_cols needs no atomics. Memory O(kRowBlock * N + N).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "ntxent_rows.h"

#include <string>
#include <utility>

namespace bmssl {
namespace {

constexpr int64_t kRowBlock = 256;

void check_rect(const at::Tensor& u_rows, const at::Tensor& u_cols, const at::Tensor& labels_rows,
                const at::Tensor& labels_cols, int64_t row_offset, double inv_tau) {
  TORCH_CHECK(u_rows.dim() == 2 && u_cols.dim() == 2 && u_rows.size(1) == u_cols.size(1),
              "ntxent_rect: u_rows [R, d] and u_cols [N, d] must share d, got ", u_rows.sizes(), " and ",
              u_cols.sizes());
  TORCH_CHECK(u_rows.scalar_type() == u_cols.scalar_type(), "ntxent_rect: dtypes differ");
  TORCH_CHECK(u_rows.device().is_cpu() && u_cols.device().is_cpu(), "ntxent_rect: expects CPU tensors");
  TORCH_CHECK(labels_rows.scalar_type() == at::kLong && labels_cols.scalar_type() == at::kLong,
              "ntxent_rect: labels must be int64");
  TORCH_CHECK(labels_rows.numel() == u_rows.size(0) && labels_cols.numel() == u_cols.size(0),
              "ntxent_rect: one label per row and per column");
  TORCH_CHECK(row_offset >= 0 && row_offset + u_rows.size(0) <= u_cols.size(0),
              "ntxent_rect: the rows must be columns row_offset .. row_offset + R - 1 of u_cols");
  TORCH_CHECK(inv_tau > 0 && std::isfinite(inv_tau), "ntxent_rect: inv_tau must be finite and > 0");
}

bool is_in(c10::string_view variant) {
  TORCH_CHECK(variant == "in" || variant == "out", "ntxent_rect: variant must be \"in\" or \"out\"");
  return variant == "in";
}

// Checks every row label against the columns: in range, and a positive besides the row itself.
void check_row_labels(const int64_t* y_rows, int64_t rows, const Groups& groups, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(y_rows[r] >= 0 && y_rows[r] < cols, "ntxent_rect: labels must lie in [0, N) = [0, ", cols,
                "), got ", y_rows[r]);
    TORCH_CHECK(groups.count(0, cols, y_rows[r]) >= 2, "ntxent_rect: row ", r, " (label ", y_rows[r],
                ") has no positive among the columns");
  }
}

template <typename T>
void rect_forward_impl(const at::Tensor& u_rows, const at::Tensor& u_cols, const int64_t* y_rows,
                       const Groups& groups, int64_t offset, T inv_tau, bool in, at::Tensor& loss,
                       at::Tensor& stats) {
  const int64_t rows = u_rows.size(0), cols = u_cols.size(0);
  at::Tensor tile = at::empty({std::min(kRowBlock, rows), cols}, u_rows.options());
  at::Tensor row_loss = at::empty({rows}, u_rows.options());
  T* l = row_loss.mutable_data_ptr<T>();
  T* st = stats.mutable_data_ptr<T>();
  for (int64_t row0 = 0; row0 < rows; row0 += kRowBlock) {
    const int64_t block = std::min(kRowBlock, rows - row0);
    at::Tensor out = tile.narrow(0, 0, block);
    at::addmm_out(out, out, u_rows.narrow(0, row0, block), u_cols.t(), 0, inv_tau);
    const T* sim = tile.const_data_ptr<T>();
    at::parallel_for(0, block, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t r = row0 + k, self = offset + r;
        const T* s = sim + k * cols;
        const T lse_all = Rows::lse_excluding(s, cols, self);
        T second, pos_term;
        if (in) {
          T top = -std::numeric_limits<T>::infinity(), sum = 0;
          groups.for_positives(0, cols, y_rows[r], self, [&](int64_t j) { top = std::max(top, s[j]); });
          groups.for_positives(0, cols, y_rows[r], self, [&](int64_t j) { sum += exp_of(s[j] - top); });
          second = pos_term = top + std::log(sum);
        } else {
          T sum = 0, count = 0;
          groups.for_positives(0, cols, y_rows[r], self, [&](int64_t j) { sum += s[j]; count += 1; });
          second = count;
          pos_term = sum / count;
        }
        l[r] = lse_all - pos_term;
        st[r] = lse_all;
        st[rows + r] = second;
      }
    });
  }
  loss.copy_(row_loss.mean());
}

template <typename T>
void rect_backward_impl(T g, const at::Tensor& u_rows, const at::Tensor& u_cols, const int64_t* y_rows,
                        const Groups& groups, const at::Tensor& stats, int64_t offset, T inv_tau, bool in,
                        at::Tensor& grad_rows, at::Tensor& grad_cols) {
  const int64_t rows = u_rows.size(0), cols = u_cols.size(0);
  const T* st = stats.const_data_ptr<T>();
  const T c = g * inv_tau / T(rows);
  at::Tensor tile = at::empty({std::min(kRowBlock, rows), cols}, u_rows.options());
  grad_cols.zero_();
  for (int64_t row0 = 0; row0 < rows; row0 += kRowBlock) {
    const int64_t block = std::min(kRowBlock, rows - row0);
    at::Tensor out = tile.narrow(0, 0, block);
    at::addmm_out(out, out, u_rows.narrow(0, row0, block), u_cols.t(), 0, inv_tau);
    T* m = tile.mutable_data_ptr<T>();
    at::parallel_for(0, block, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t r = row0 + k, self = offset + r;
        T* row = m + k * cols;
        std::vector<std::pair<int64_t, T>> positive_s;  // read before row_p overwrites them
        groups.for_positives(0, cols, y_rows[r], self, [&](int64_t j) { positive_s.emplace_back(j, row[j]); });
        Rows::p(row, st[r], cols, self);
        for (const auto& [j, s_rj] : positive_s) row[j] -= in ? exp_of(s_rj - st[rows + r]) : T(1) / st[rows + r];
      }
    });
    at::Tensor rows_out = grad_rows.narrow(0, row0, block);
    at::addmm_out(rows_out, rows_out, out, u_cols, 0, c);
    at::addmm_out(grad_cols, grad_cols, out.t(), u_rows.narrow(0, row0, block), 1, c);
  }
}

at::ScalarType acc_of(const at::Tensor& u) { return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> ntxent_rect_forward_cpu(const at::Tensor& u_rows, const at::Tensor& u_cols,
                                                           const at::Tensor& labels_rows,
                                                           const at::Tensor& labels_cols, int64_t row_offset,
                                                           double inv_tau, c10::string_view variant) {
  check_rect(u_rows, u_cols, labels_rows, labels_cols, row_offset, inv_tau);
  const bool in = is_in(variant);
  const auto acc = acc_of(u_rows);
  const at::Tensor r = u_rows.to(acc).contiguous(), c = u_cols.to(acc).contiguous();
  const at::Tensor y_rows = labels_rows.contiguous(), y_cols = labels_cols.contiguous();
  const Groups groups(y_cols, 1, c.size(0), /*require_pairs=*/false);
  check_row_labels(y_rows.const_data_ptr<int64_t>(), r.size(0), groups, c.size(0));
  at::Tensor loss = at::empty({}, r.options());
  at::Tensor stats = at::empty({2, r.size(0)}, r.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "ntxent_rect_forward", [&] {
    rect_forward_impl<scalar_t>(r, c, y_rows.const_data_ptr<int64_t>(), groups, row_offset, scalar_t(inv_tau),
                                in, loss, stats);
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> ntxent_rect_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& u_rows, const at::Tensor& u_cols, const at::Tensor& labels_rows,
    const at::Tensor& labels_cols, const at::Tensor& stats, int64_t row_offset, double inv_tau,
    c10::string_view variant) {
  check_rect(u_rows, u_cols, labels_rows, labels_cols, row_offset, inv_tau);
  const bool in = is_in(variant);
  const auto acc = acc_of(u_rows);
  TORCH_CHECK(stats.numel() == 2 * u_rows.size(0), "ntxent_rect_backward: row_stats must be [2, R]");
  const at::Tensor r = u_rows.to(acc).contiguous(), c = u_cols.to(acc).contiguous();
  const at::Tensor y_rows = labels_rows.contiguous(), y_cols = labels_cols.contiguous();
  const at::Tensor st = stats.to(acc).contiguous();
  const Groups groups(y_cols, 1, c.size(0), /*require_pairs=*/false);
  check_row_labels(y_rows.const_data_ptr<int64_t>(), r.size(0), groups, c.size(0));
  at::Tensor grad_rows = at::empty_like(r), grad_cols = at::empty_like(c);
  AT_DISPATCH_FLOATING_TYPES(acc, "ntxent_rect_backward", [&] {
    rect_backward_impl<scalar_t>(grad_loss.item<scalar_t>(), r, c, y_rows.const_data_ptr<int64_t>(), groups, st,
                                 row_offset, scalar_t(inv_tau), in, grad_rows, grad_cols);
  });
  return {grad_rows.to(u_rows.scalar_type()), grad_cols.to(u_cols.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(bmssl, CPU, m) {
  m.impl("ntxent_rect_forward", &ntxent_rect_forward_cpu);
  m.impl("ntxent_rect_backward", &ntxent_rect_backward_cpu);
}

}  // namespace bmssl
