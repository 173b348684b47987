// Row kernels shared by the CPU NT-Xent ops (csrc/cpu/ntxent.cpp, csrc/cpu/ntxent_rect.cpp):
// a vectorisable exp, loops over one row of a similarity tile (vector clones, vector_clones.h),
// and the grouping of rows by label that gives each anchor its positives.
// Everything here has internal linkage, so each file that includes it gets its own copy.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "vector_clones.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace bmssl {
namespace {


// e^x for float: 2^n e^r with n = round(x log2 e), r = x - n ln 2, e^r by Cephes' degree-6
// polynomial (about 1 ulp); 0 below -87.3. Written branch-free so loops vectorise.
BMSSL_INLINE float exp_of(float x) {
  const float clamped = std::min(std::max(x, -87.3f), 88.7f);
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : y * scale;
}
BMSSL_INLINE double exp_of(double x) { return std::exp(x); }

// ---- row kernels: one row i of a task, s = S_i (B values), a column loop each -------------------

// max and sum of e^{s_j - max} over j != i; returns lse over A(i).
template <typename T>
BMSSL_INLINE T row_lse_excluding(const T* s, int64_t n, int64_t i) {
  T top = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < n; ++j) top = std::max(top, j == i ? -std::numeric_limits<T>::infinity() : s[j]);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += j == i ? T(0) : exp_of(s[j] - top);
  return top + std::log(sum);
}

// In place: s_j <- p_ij + p_ji = e^{s_j - lse_i} + e^{s_j - lse_col_j}, and 0 at j = i.
template <typename T>
BMSSL_INLINE void row_p_sum(T* __restrict__ s, const T* __restrict__ lse_col, T lse_i, int64_t n, int64_t i) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = exp_of(s[j] - lse_i) + exp_of(s[j] - lse_col[j]);
  s[i] = 0;  // after the loop, so that the loop has no branch and vectorises
}

// sum_{j != i} e^{s_j - lse_i} sdot_j
template <typename T>
BMSSL_INLINE T row_p_dot(const T* __restrict__ s, const T* __restrict__ sdot, T lse_i, int64_t n, int64_t i) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += j == i ? T(0) : exp_of(s[j] - lse_i) * sdot[j];
  return sum;
}

// In place: s_j <- p_ij + p_ji,  sdot_j <- p_ij (sdot_j - a_i) + p_ji (sdot_j - a_j); both 0 at j = i.
template <typename T>
BMSSL_INLINE void row_pp_and_h(T* __restrict__ s, T* __restrict__ sdot, const T* __restrict__ lse_col,
                               const T* __restrict__ a_col, T lse_i, T a_i, int64_t n, int64_t i) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T p_ij = exp_of(s[j] - lse_i), p_ji = exp_of(s[j] - lse_col[j]);
    sdot[j] = p_ij * (sdot[j] - a_i) + p_ji * (sdot[j] - a_col[j]);
    s[j] = p_ij + p_ji;
  }
  s[i] = sdot[i] = 0;
}

// In place: s_j <- e^{s_j - lse_i} (the softmax row p_i), 0 at the excluded column (if any).
template <typename T>
BMSSL_INLINE void row_p(T* __restrict__ s, T lse_i, int64_t n, int64_t excluded) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = exp_of(s[j] - lse_i);
  if (excluded >= 0 && excluded < n) s[excluded] = 0;
}

// Clones for float (each compiled for AVX-512, AVX2 and baseline); fp64 uses the templates.
BMSSL_VECTOR_CLONES float lse_excluding_f(const float* s, int64_t n, int64_t i) { return row_lse_excluding(s, n, i); }
BMSSL_VECTOR_CLONES void p_sum_f(float* s, const float* l, float li, int64_t n, int64_t i) { row_p_sum(s, l, li, n, i); }
BMSSL_VECTOR_CLONES float p_dot_f(const float* s, const float* d, float li, int64_t n, int64_t i) { return row_p_dot(s, d, li, n, i); }
BMSSL_VECTOR_CLONES void pp_and_h_f(float* s, float* d, const float* l, const float* a, float li, float ai, int64_t n, int64_t i) { row_pp_and_h(s, d, l, a, li, ai, n, i); }

BMSSL_VECTOR_CLONES void p_f(float* s, float li, int64_t n, int64_t x) { row_p(s, li, n, x); }

struct Rows {
  static void p(float* s, float li, int64_t n, int64_t x) { p_f(s, li, n, x); }
  static void p(double* s, double li, int64_t n, int64_t x) { row_p(s, li, n, x); }
  static float lse_excluding(const float* s, int64_t n, int64_t i) { return lse_excluding_f(s, n, i); }
  static double lse_excluding(const double* s, int64_t n, int64_t i) { return row_lse_excluding(s, n, i); }
  static void p_sum(float* s, const float* l, float li, int64_t n, int64_t i) { p_sum_f(s, l, li, n, i); }
  static void p_sum(double* s, const double* l, double li, int64_t n, int64_t i) { row_p_sum(s, l, li, n, i); }
  static float p_dot(const float* s, const float* d, float li, int64_t n, int64_t i) { return p_dot_f(s, d, li, n, i); }
  static double p_dot(const double* s, const double* d, double li, int64_t n, int64_t i) { return row_p_dot(s, d, li, n, i); }
  static void pp_and_h(float* s, float* d, const float* l, const float* a, float li, float ai, int64_t n, int64_t i) { pp_and_h_f(s, d, l, a, li, ai, n, i); }
  static void pp_and_h(double* s, double* d, const double* l, const double* a, double li, double ai, int64_t n, int64_t i) { row_pp_and_h(s, d, l, a, li, ai, n, i); }
};

// ---- positives: members of each label, per task (counting sort) ---------------------------------

struct Groups {
  std::vector<int64_t> members;  // [T, B]: row indices sorted by label
  std::vector<int64_t> start;    // [T, B + 1]: members of label y are members[start[y] .. start[y+1])

  // require_pairs: every label must occur twice (the square form: each anchor has a positive).
  Groups(const at::Tensor& labels, int64_t tasks, int64_t batch, bool require_pairs = true)
      : members(tasks * batch), start(tasks * (batch + 1), 0) {
    const int64_t* y = labels.const_data_ptr<int64_t>();
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t* yt = y + t * batch;
      int64_t* st = start.data() + t * (batch + 1);
      for (int64_t i = 0; i < batch; ++i) {
        TORCH_CHECK(yt[i] >= 0 && yt[i] < batch, "ntxent: labels must lie in [0, B) = [0, ", batch,
                    "), got ", yt[i]);
        ++st[yt[i] + 1];
      }
      for (int64_t l = 0; l < batch; ++l) st[l + 1] += st[l];
      std::vector<int64_t> fill(st, st + batch);
      for (int64_t i = 0; i < batch; ++i) members[t * batch + fill[yt[i]]++] = i;
      for (int64_t i = 0; require_pairs && i < batch; ++i)
        TORCH_CHECK(st[yt[i] + 1] - st[yt[i]] >= 2, "ntxent: anchor ", i, " of task ", t, " (label ",
                    yt[i], ") has no positive");
    }
  }
  int64_t count(int64_t t, int64_t batch, int64_t label) const {
    const int64_t* st = start.data() + t * (batch + 1);
    return st[label + 1] - st[label];
  }
  // Positives of row i in task t: the members of its label other than i.
  template <typename F>
  void for_positives(int64_t t, int64_t batch, int64_t label, int64_t i, F&& f) const {
    const int64_t* st = start.data() + t * (batch + 1);
    for (int64_t k = st[label]; k < st[label + 1]; ++k) {
      const int64_t j = members[t * batch + k];
      if (j != i) f(j);
    }
  }
};

}  // namespace
}  // namespace bmssl
