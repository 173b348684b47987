// CPU kernels of the fused multi-view NT-Xent (maths in csrc/ntxent.cpp).
//
// Work goes in blocks of kRowBlock rows of one task. A block computes S_I = U_I U^T inv_tau (one
// multi-threaded BLAS call into a [kRowBlock, B] scratch), then torch's OpenMP pool walks its rows
// in parallel with vectorised loops (a polynomial exp, cloned for AVX-512, AVX2 and baseline
// x86). BLAS never runs inside our parallel region. Memory is O(kRowBlock * B + T * B), never B x B.
// Backward: a block owns its rows of grad_u. M_ij = G_ij + G_ji needs only the statistics of
// rows i and j (S is symmetric), so grad_u_I = c M_I U is one BLAS call and no atomics are needed.
// Positives P(i) come from a counting sort of the labels per task (members grouped by label).
// Inputs arrive in the accumulation type (fp32, or fp64 for fp64); the binding casts.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../ntxent.h"
#include "ntxent_rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace bmssl {
namespace {

constexpr int64_t kRowBlock = 256;  // rows per BLAS tile: scratch is kRowBlock x B

// Walks the rows of every task in blocks of kRowBlock: tile(t, row0, rows) runs first, with
// BLAS using all threads itself (never inside our parallel region, so the two thread pools do
// not nest), then row(t, i, r) runs for each row of the block in parallel, then finish(...).
template <typename Tile, typename Row, typename Finish>
void for_row_blocks(int64_t tasks, int64_t batch, Tile&& tile, Row&& row, Finish&& finish) {
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t row0 = 0; row0 < batch; row0 += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, batch - row0);
      tile(t, row0, rows);
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) row(t, row0 + r, r);
      });
      finish(t, row0, rows);
    }
  }
}

// ---- forward ----------------------------------------------------------------------------------

template <typename T>
void forward_impl(const at::Tensor& u, const Groups& groups, const at::Tensor& labels, T inv_tau,
                  bool in, at::Tensor& task_loss, at::Tensor& stats) {
  const int64_t tasks = u.size(0), batch = u.size(1);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  at::Tensor row_loss = at::empty({tasks, batch}, u.options());
  at::Tensor tile = at::empty({std::min(kRowBlock, batch), batch}, u.options());
  T* loss = row_loss.mutable_data_ptr<T>();
  T* st = stats.mutable_data_ptr<T>();
  const T* sim = tile.const_data_ptr<T>();
  for_row_blocks(
      tasks, batch,
      [&](int64_t t, int64_t row0, int64_t rows) {  // S_I = U_I U^T inv_tau
        at::Tensor ut = u.select(0, t), out = tile.narrow(0, 0, rows);
        at::addmm_out(out, out, ut.narrow(0, row0, rows), ut.t(), 0, inv_tau);
      },
      [&](int64_t t, int64_t i, int64_t r) {
        const T* s = sim + r * batch;
        const T lse_all = Rows::lse_excluding(s, batch, i);
        T second, pos_term;
        if (in) {
          T top = -std::numeric_limits<T>::infinity(), sum = 0;
          groups.for_positives(t, batch, y[t * batch + i], i, [&](int64_t j) { top = std::max(top, s[j]); });
          groups.for_positives(t, batch, y[t * batch + i], i, [&](int64_t j) { sum += exp_of(s[j] - top); });
          second = pos_term = top + std::log(sum);
        } else {
          T sum = 0, count = 0;
          groups.for_positives(t, batch, y[t * batch + i], i, [&](int64_t j) { sum += s[j]; count += 1; });
          second = count;
          pos_term = sum / count;
        }
        loss[t * batch + i] = lse_all - pos_term;
        st[(t * 2) * batch + i] = lse_all;
        st[(t * 2 + 1) * batch + i] = second;
      },
      [](int64_t, int64_t, int64_t) {});
  task_loss.copy_(row_loss.mean(1));
}

// ---- backward ---------------------------------------------------------------------------------

template <typename T>
void backward_impl(const at::Tensor& grad_task_loss, const at::Tensor& u, const Groups& groups,
                   const at::Tensor& labels, const at::Tensor& stats, T inv_tau, bool in,
                   at::Tensor& grad_u) {
  const int64_t tasks = u.size(0), batch = u.size(1);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const T* g = grad_task_loss.const_data_ptr<T>();
  const T* st = stats.const_data_ptr<T>();
  at::Tensor tile = at::empty({std::min(kRowBlock, batch), batch}, u.options());
  T* m = tile.mutable_data_ptr<T>();
  for_row_blocks(
      tasks, batch,
      [&](int64_t t, int64_t row0, int64_t rows) {  // S_I
        at::Tensor ut = u.select(0, t), out = tile.narrow(0, 0, rows);
        at::addmm_out(out, out, ut.narrow(0, row0, rows), ut.t(), 0, inv_tau);
      },
      [&](int64_t t, int64_t i, int64_t r) {  // row i of M = G + G^T, in place over s_i
        const T* lse_all = st + (t * 2) * batch;
        const T* second = st + (t * 2 + 1) * batch;
        T* row = m + r * batch;
        // the q terms need s_ij of the positives, which p_sum overwrites: read them first
        std::vector<std::pair<int64_t, T>> positive_s;
        groups.for_positives(t, batch, y[t * batch + i], i, [&](int64_t j) { positive_s.emplace_back(j, row[j]); });
        Rows::p_sum(row, lse_all, lse_all[i], batch, i);
        for (const auto& [j, s_ij] : positive_s)
          row[j] -= in ? exp_of(s_ij - second[i]) + exp_of(s_ij - second[j]) : T(1) / second[i] + T(1) / second[j];
      },
      [&](int64_t t, int64_t row0, int64_t rows) {  // grad_u_I = c M_I U
        at::Tensor ut = u.select(0, t), out = grad_u.select(0, t).narrow(0, row0, rows);
        at::addmm_out(out, out, tile.narrow(0, 0, rows), ut, 0, g[t] * inv_tau / T(batch));
      });
}

// ---- double backward --------------------------------------------------------------------------

// S_I and SDOT_I = (V_I U^T + U_I V^T) inv_tau into the two scratch tiles.
template <typename T>
void sim_and_sdot_tiles(at::Tensor& sim, at::Tensor& sdot, const at::Tensor& ut, const at::Tensor& vt,
                        int64_t row0, int64_t rows, T inv_tau) {
  at::Tensor s = sim.narrow(0, 0, rows), d = sdot.narrow(0, 0, rows);
  at::addmm_out(s, s, ut.narrow(0, row0, rows), ut.t(), 0, inv_tau);
  at::addmm_out(d, d, vt.narrow(0, row0, rows), ut.t(), 0, inv_tau);
  at::addmm_out(d, d, ut.narrow(0, row0, rows), vt.t(), 1, inv_tau);
}

template <typename T>
void double_backward_impl(const at::Tensor& grad_grad_u, const at::Tensor& grad_task_loss,
                          const at::Tensor& u, const Groups& groups, const at::Tensor& labels,
                          const at::Tensor& stats, T inv_tau, bool in, at::Tensor& grad_grad_task,
                          at::Tensor& grad_u) {
  const int64_t tasks = u.size(0), batch = u.size(1);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const T* g = grad_task_loss.const_data_ptr<T>();
  const T* st = stats.const_data_ptr<T>();
  at::Tensor ab = at::empty({tasks, 2, batch}, u.options());  // a_i, b_i
  T* ab_data = ab.mutable_data_ptr<T>();
  at::Tensor sim = at::empty({std::min(kRowBlock, batch), batch}, u.options());
  at::Tensor sdot = at::empty_like(sim);
  T *s_data = sim.mutable_data_ptr<T>(), *d_data = sdot.mutable_data_ptr<T>();
  auto tiles = [&](int64_t t, int64_t row0, int64_t rows) {
    sim_and_sdot_tiles<T>(sim, sdot, u.select(0, t), grad_grad_u.select(0, t), row0, rows, inv_tau);
  };

  // pass 1: a_i = sum_j p_ij sdot_ij, b_i = sum_j q_ij sdot_ij
  for_row_blocks(
      tasks, batch, tiles,
      [&](int64_t t, int64_t i, int64_t r) {
        const T *s = s_data + r * batch, *d = d_data + r * batch;
        const T* lse_all = st + (t * 2) * batch;
        const T* second = st + (t * 2 + 1) * batch;
        T b = 0;
        groups.for_positives(t, batch, y[t * batch + i], i, [&](int64_t j) {
          b += (in ? exp_of(s[j] - second[i]) : T(1) / second[i]) * d[j];
        });
        ab_data[(t * 2) * batch + i] = Rows::p_dot(s, d, lse_all[i], batch, i);
        ab_data[(t * 2 + 1) * batch + i] = b;
      },
      [](int64_t, int64_t, int64_t) {});
  // d/dg_t = (1/B) sum_i (a_i - b_i)
  grad_grad_task.copy_(ab.select(1, 0).sub(ab.select(1, 1)).mean(1));

  // pass 2: grad_u_I = c [(G + G^T)_I V + (H + H^T)_I U]
  for_row_blocks(
      tasks, batch, tiles,
      [&](int64_t t, int64_t i, int64_t r) {
        T *s = s_data + r * batch, *d = d_data + r * batch;
        const T* lse_all = st + (t * 2) * batch;
        const T* second = st + (t * 2 + 1) * batch;
        const T* a = ab_data + (t * 2) * batch;
        const T* b = ab_data + (t * 2 + 1) * batch;
        std::vector<std::tuple<int64_t, T, T>> positive;  // (j, s_ij, sdot_ij) before the overwrite
        groups.for_positives(t, batch, y[t * batch + i], i, [&](int64_t j) { positive.emplace_back(j, s[j], d[j]); });
        Rows::pp_and_h(s, d, lse_all, a, lse_all[i], a[i], batch, i);
        for (const auto& [j, s_ij, d_ij] : positive) {
          if (in) {
            const T q_ij = exp_of(s_ij - second[i]), q_ji = exp_of(s_ij - second[j]);
            s[j] -= q_ij + q_ji;
            d[j] -= q_ij * (d_ij - b[i]) + q_ji * (d_ij - b[j]);
          } else {
            s[j] -= T(1) / second[i] + T(1) / second[j];
          }
        }
      },
      [&](int64_t t, int64_t row0, int64_t rows) {
        const T c = g[t] * inv_tau / T(batch);
        at::Tensor out = grad_u.select(0, t).narrow(0, row0, rows);
        at::addmm_out(out, out, sim.narrow(0, 0, rows), grad_grad_u.select(0, t), 0, c);
        at::addmm_out(out, out, sdot.narrow(0, 0, rows), u.select(0, t), 1, c);
      });
}

// ---- bindings ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> ntxent_forward_cpu(const at::Tensor& u, const at::Tensor& labels,
                                                      double inv_tau, c10::string_view variant) {
  check_ntxent_inputs(u, labels, inv_tau, c10::DeviceType::CPU);
  const bool in = ntxent_variant_in(variant);
  const auto acc = ntxent_acc_type(u);
  const at::Tensor u_acc = u.to(acc).contiguous(), y = labels.contiguous();
  const int64_t tasks = u.size(0), batch = u.size(1);
  const Groups groups(y, tasks, batch);
  at::Tensor task_loss = at::empty({tasks}, u_acc.options());
  at::Tensor stats = at::empty({tasks, 2, batch}, u_acc.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "ntxent_forward", [&] {
    forward_impl<scalar_t>(u_acc, groups, y, scalar_t(inv_tau), in, task_loss, stats);
  });
  return {task_loss, stats};
}

at::Tensor ntxent_backward_cpu(const at::Tensor& grad_task_loss, const at::Tensor& u,
                               const at::Tensor& labels, const at::Tensor& stats, double inv_tau,
                               c10::string_view variant) {
  check_ntxent_inputs(u, labels, inv_tau, c10::DeviceType::CPU);
  const bool in = ntxent_variant_in(variant);
  const auto acc = ntxent_acc_type(u);
  const int64_t tasks = u.size(0), batch = u.size(1);
  TORCH_CHECK(grad_task_loss.numel() == tasks, "ntxent_backward: grad_task_loss must have T elements");
  TORCH_CHECK(stats.numel() == tasks * 2 * batch, "ntxent_backward: row_stats must be [T, 2, B]");
  const at::Tensor u_acc = u.to(acc).contiguous(), y = labels.contiguous();
  const at::Tensor g = grad_task_loss.to(acc).contiguous(), st = stats.to(acc).contiguous();
  const Groups groups(y, tasks, batch);
  at::Tensor grad_u = at::empty_like(u_acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "ntxent_backward", [&] {
    backward_impl<scalar_t>(g, u_acc, groups, y, st, scalar_t(inv_tau), in, grad_u);
  });
  return grad_u.to(u.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> ntxent_double_backward_cpu(
    const at::Tensor& grad_grad_u, const at::Tensor& grad_task_loss, const at::Tensor& u,
    const at::Tensor& labels, const at::Tensor& stats, double inv_tau, c10::string_view variant) {
  check_ntxent_inputs(u, labels, inv_tau, c10::DeviceType::CPU);
  const bool in = ntxent_variant_in(variant);
  const auto acc = ntxent_acc_type(u);
  const int64_t tasks = u.size(0), batch = u.size(1);
  TORCH_CHECK(grad_grad_u.sizes() == u.sizes(), "ntxent_double_backward: grad_grad_u must be like u");
  TORCH_CHECK(grad_task_loss.numel() == tasks, "ntxent_double_backward: grad_task_loss must have T elements");
  TORCH_CHECK(stats.numel() == tasks * 2 * batch, "ntxent_double_backward: row_stats must be [T, 2, B]");
  const at::Tensor u_acc = u.to(acc).contiguous(), v_acc = grad_grad_u.to(acc).contiguous();
  const at::Tensor y = labels.contiguous();
  const at::Tensor g = grad_task_loss.to(acc).contiguous(), st = stats.to(acc).contiguous();
  const Groups groups(y, tasks, batch);
  at::Tensor grad_grad_task = at::empty({tasks}, u_acc.options());
  at::Tensor grad_u = at::empty_like(u_acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "ntxent_double_backward", [&] {
    double_backward_impl<scalar_t>(v_acc, g, u_acc, groups, y, st, scalar_t(inv_tau), in, grad_grad_task, grad_u);
  });
  return {grad_grad_task.to(grad_task_loss.scalar_type()), grad_u.to(u.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(bmssl, CPU, m) {
  m.impl("ntxent_forward", &ntxent_forward_cpu);
  m.impl("ntxent_backward", &ntxent_backward_cpu);
  m.impl("ntxent_double_backward", &ntxent_double_backward_cpu);
}

}  // namespace bmssl
