// CPU kernels of the fused GroupNorm (+ ReLU) (+ 2x2 max-pool) block (maths in
// csrc/group_norm.cpp).
//
// One group S = (t, n, g), C/G contiguous channel planes, is one unit of work; torch's OpenMP
// pool walks the T*N*G groups. A group is read a few times (its planes stay in cache), and
// nothing full-size is stored besides the outputs: a, xhat and the routed gradient da are
// recomputed from x and the (mean, rstd) statistics. The backward writes da into grad_x first
// and overwrites it in place. Per-channel sums over n (grad_weight, grad_bias) go through a
// [T, N, C] buffer of per-group partials, reduced afterwards: no atomics. Group sums are fp64.
// fp32 and fp64 only; other dtypes take the twin. The group loops are vector clones
// (vector_clones.h): AVX-512, AVX2 + FMA or baseline code, as the CPU allows; everything they
// call is inlined into them (BMSSL_INLINE), so it is compiled for that ISA too.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "vector_clones.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace bmssl {
namespace {

struct Layout {
  int64_t tasks, batch, channels, height, width, groups;
  bool relu, pool;
  int64_t group_channels() const { return channels / groups; }
  int64_t plane() const { return height * width; }
  int64_t out_height() const { return pool ? height / 2 : height; }
  int64_t out_width() const { return pool ? width / 2 : width; }
  int64_t out_plane() const { return out_height() * out_width(); }
  int64_t group_size() const { return group_channels() * plane(); }
  int64_t count() const { return tasks * batch * groups; }
  // the first channel of group index `group` (over t, n, g) counted over all [T, N, C] channels
  int64_t first_channel(int64_t group) const { return group * group_channels(); }
  int64_t task_of(int64_t group) const { return group / (batch * groups); }
  // the channel index within its task's weight row
  int64_t weight_channel(int64_t group) const { return (group % groups) * group_channels(); }
};

Layout layout_of(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                 bool relu, bool pool, const char* op) {
  TORCH_CHECK(x.dim() == 5, op, ": x must be [T, N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, ": expects CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": the CPU kernels take float32 or float64, got ", x.scalar_type());
  const Layout l{x.size(0), x.size(1), x.size(2), x.size(3), x.size(4), groups, relu, pool};
  TORCH_CHECK(groups >= 1 && l.channels % groups == 0, op, ": groups (", groups,
              ") must divide the channels (", l.channels, ")");
  for (const at::Tensor* p : {&weight, &bias}) {
    TORCH_CHECK(p->dim() == 2 && p->size(0) == l.tasks && p->size(1) == l.channels, op,
                ": weight and bias must be [T, C] = [", l.tasks, ", ", l.channels, "], got ", p->sizes());
    TORCH_CHECK(p->scalar_type() == x.scalar_type() && p->device() == x.device(), op,
                ": weight and bias must match x in dtype and device");
  }
  TORCH_CHECK(!pool || (l.height >= 2 && l.width >= 2), op, ": pooling needs H, W >= 2, got ", l.height,
              "x", l.width);
  TORCH_CHECK(l.group_size() > 0, op, ": empty groups");
  return l;
}

// a = (x - mean) * scale + bias for one channel, scale = weight * rstd, from the stored (mean,
// rstd): the forward, backward and double backward all use this one rounding, so they agree on
// every mask and argmax. x = mean gives exactly bias whether or not the compiler fuses the
// multiply-add (the AVX2 and AVX-512 clones do), and an offset group loses nothing to the
// cancellation of x * scale against mean * scale.
template <typename T>
struct Affine {
  T mean, scale, bias;
  BMSSL_INLINE T operator()(T x) const { return (x - mean) * scale + bias; }
};

template <typename T>
BMSSL_INLINE Affine<T> channel_affine(T weight, T bias, T mean, T rstd) {
  return Affine<T>{mean, weight * rstd, bias};
}

// The 2x2 window a0 a1 / a2 a3 of one pooled output (a = affine(x)): returns the
// position of its first maximum (0..3), or -1 where relu masks the window (max a <= 0), and
// sets `best` to that maximum. Selects on computed values only, and at_arg picks a value by
// arithmetic, so the window loops vectorise: data-dependent branches here cost more than the
// memory traffic (and a select of a loaded value is not if-converted).
template <typename T>
BMSSL_INLINE int window_arg(T a0, T a1, T a2, T a3, bool relu, T& best) {
  best = a0;
  int arg = 0;
  bool take = a1 > best;
  best = take ? a1 : best, arg = take ? 1 : arg;
  take = a2 > best;
  best = take ? a2 : best, arg = take ? 2 : arg;
  take = a3 > best;
  best = take ? a3 : best, arg = take ? 3 : arg;
  return (relu & (best <= T(0))) ? -1 : arg;  // a NaN maximum is not masked: NaN stays NaN, as relu(NaN)
}

// The window at columns j, j + 1 of the row pair x0, x1.
template <typename T>
BMSSL_INLINE int window_arg_at(const T* x0, const T* x1, int64_t j, Affine<T> affine, bool relu, T& best) {
  return window_arg(affine(x0[j]), affine(x0[j + 1]), affine(x1[j]), affine(x1[j + 1]), relu, best);
}

// v[arg] for arg in 0..3, and 0 for -1.
template <typename T>
BMSSL_INLINE T at_arg(int arg, T v0, T v1, T v2, T v3) {
  return T(arg == 0) * v0 + T(arg == 1) * v1 + T(arg == 2) * v2 + T(arg == 3) * v3;
}

// Sums of at most kSumChunk terms are formed in T (vectorised) and added in fp64: one T sum over
// a whole plane lost accuracy in proportion to its size (fp32 rstd off by 3e-6 relative at
// 1024x1024 planes, 2e-4 at 4096x4096, enough to flip relu masks and pooling argmaxes).
constexpr int64_t kSumChunk = 512;

template <typename T, typename F>
BMSSL_INLINE double plane_sum(int64_t plane, F&& term) {
  double total = 0;
  for (int64_t start = 0; start < plane; start += kSumChunk) {
    const int64_t stop = std::min(plane, start + kSumChunk);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = start; i < stop; ++i) sum += term(i);
    total += double(sum);
  }
  return total;
}

// Writes the routed gradient da of one plane (grad_y at each window's argmax, 0 elsewhere and
// on a dropped odd row / column) and returns (sum da, sum da xhat, sum da u) over it; u may be
// null (then the third sum is 0). One vectorised loop per row pair: the argmax of each window
// (as the forward) and the window's four da values, stored interleaved. The stores multiply
// by the 0/1 masks: a select of the loaded grad_y is not if-converted (GCC: "control flow in
// loop"), and the scalar loop, mispredicting on random argmaxes, cost 4x the rest of the
// backward. The masks multiply grad_y after relu's mask is applied (ge): an Inf or NaN gradient
// at an output that relu zeroed (sqrt or log downstream give one there) is not a gradient of
// anything and must leave no NaN (0 * Inf) behind. In an unmasked window a NaN or Inf grad_y
// spreads over the window, which changes nothing: the group sums carry it to every element of
// the group in any case. Each row pair's sums are formed in T and added in fp64 (plane_sum).
template <typename T>
BMSSL_INLINE void route_pooled(const Layout& l, const T* x, const T* u, const T* grad_y, Affine<T> affine, T mean,
                               T rstd, T* da, double sums[3]) {
  const int64_t width = l.width, out_w = l.out_width();
  const bool relu = l.relu;
  double total_d = 0, total_dx = 0, total_du = 0;
  for (int64_t oi = 0; oi < l.out_height(); ++oi) {
    T sd = 0, sdx = 0, sdu = 0;
    const T* x0 = x + 2 * oi * width;
    const T* x1 = x0 + width;
    const T* u0 = u ? u + 2 * oi * width : x0;
    const T* u1 = u0 + width;
    const T* g = grad_y + oi * out_w;
    T* d0 = da + 2 * oi * width;
    T* d1 = d0 + width;
#pragma omp simd reduction(+ : sd, sdx, sdu)
    for (int64_t oj = 0; oj < out_w; ++oj) {
      const int64_t j = 2 * oj;
      T best;
      const int arg = window_arg_at(x0, x1, j, affine, relu, best);
      const T x_arg = at_arg(arg, x0[j], x0[j + 1], x1[j], x1[j + 1]);
      const T u_arg = at_arg(arg, u0[j], u0[j + 1], u1[j], u1[j + 1]);
      const T gv = g[oj];
      const T ge = arg >= 0 ? gv : T(0);
      d0[j] = T(arg == 0) * ge;
      d0[j + 1] = T(arg == 1) * ge;
      d1[j] = T(arg == 2) * ge;
      d1[j + 1] = T(arg == 3) * ge;
      sd += ge;
      sdx += ge * ((x_arg - mean) * rstd);
      sdu += ge * u_arg;
    }
    if (width % 2) d0[width - 1] = d1[width - 1] = T(0);
    total_d += double(sd), total_dx += double(sdx), total_du += double(sdu);
  }
  if (l.height % 2) {
    T* last = da + (l.height - 1) * width;
    for (int64_t j = 0; j < width; ++j) last[j] = T(0);
  }
  sums[0] = total_d;
  sums[1] = total_dx;
  sums[2] = u ? total_du : 0.0;
}

// The same without pooling: da = grad_y [* (a > 0)], dense.
template <typename T>
BMSSL_INLINE void route_dense(const Layout& l, const T* x, const T* u, const T* grad_y, Affine<T> affine, T mean,
                              T rstd, T* da, double sums[3]) {
  const int64_t plane = l.plane();
  const bool relu = l.relu;
#pragma omp simd
  for (int64_t i = 0; i < plane; ++i) {
    const T g = grad_y[i];
    da[i] = (!relu | (affine(x[i]) > T(0))) ? g : T(0);
  }
  sums[0] = plane_sum<T>(plane, [&](int64_t i) { return da[i]; });
  sums[1] = plane_sum<T>(plane, [&](int64_t i) { return da[i] * ((x[i] - mean) * rstd); });
  sums[2] = u ? plane_sum<T>(plane, [&](int64_t i) { return da[i] * u[i]; }) : 0.0;
}

template <typename T>
BMSSL_INLINE void route_plane(const Layout& l, const T* x, const T* u, const T* grad_y, Affine<T> affine, T mean,
                              T rstd, T* da, double sums[3]) {
  if (l.pool) {
    route_pooled(l, x, u, grad_y, affine, mean, rstd, da, sums);
  } else {
    route_dense(l, x, u, grad_y, affine, mean, rstd, da, sums);
  }
}

// ---- forward ----------------------------------------------------------------------------------

template <typename T>
BMSSL_INLINE void forward_plane(const Layout& l, const T* x, Affine<T> affine, T* y) {
  const bool relu = l.relu;
  if (!l.pool) {
#pragma omp simd
    for (int64_t i = 0; i < l.plane(); ++i) {
      const T a = affine(x[i]);
      y[i] = (relu & (a < T(0))) ? T(0) : a;
    }
    return;
  }
  const int64_t width = l.width, out_w = l.out_width();
  for (int64_t oi = 0; oi < l.out_height(); ++oi) {
    const T* x0 = x + 2 * oi * width;
    const T* x1 = x0 + width;
    T* yr = y + oi * out_w;
#pragma omp simd
    for (int64_t oj = 0; oj < out_w; ++oj) {
      const int64_t j = 2 * oj;
      T best;
      const int arg = window_arg_at(x0, x1, j, affine, relu, best);
      yr[oj] = arg < 0 ? T(0) : best;
    }
  }
}

// rstd of one group when (x - mean)^2 overflows T (|x - mean| past sqrt(T's max), 1.8e19 in
// fp32): var = a^2 mean(((x - mean) / a)^2) with a = max |x - mean|, so rstd = 1 / (a sqrt(q + eps
// / a^2)), q = mean(((x - mean) / a)^2) <= 1. Only overflowing groups take it (a second and third
// pass over the group), so every other group keeps its rounding. An x - mean that is itself
// infinite still gives NaN: a / a.
template <typename T>
BMSSL_INLINE double scaled_rstd(const T* xg, int64_t group_channels, int64_t plane, T mean, double eps) {
  T largest = 0;
  for (int64_t k = 0; k < group_channels; ++k) {
    const T* xc = xg + k * plane;
    for (int64_t i = 0; i < plane; ++i) largest = std::max(largest, T(std::abs(xc[i] - mean)));
  }
  double squares = 0;
  for (int64_t k = 0; k < group_channels; ++k) {
    const T* xc = xg + k * plane;
    squares += plane_sum<T>(plane, [&](int64_t i) {
      const T d = (xc[i] - mean) / largest;
      return d * d;
    });
  }
  const double a = double(largest), m = double(group_channels * plane);
  return 1.0 / (a * std::sqrt(squares / m + eps / (a * a)));
}

// Groups [begin, end) of the forward (vector clones: vector_clones.h).
template <typename T>
BMSSL_VECTOR_CLONES void forward_groups(const Layout& l, const T* x, const T* weight, const T* bias, double eps, T* y,
                                        T* stats, int64_t begin, int64_t end) {
  const int64_t gc = l.group_channels(), plane = l.plane(), m = l.group_size();
  for (int64_t group = begin; group < end; ++group) {
    const T* xg = x + group * m;
    // mean = x_0 + sum (x - x_0) / m: summing the deviations from the group's first value keeps
    // a constant group exact (y = 0, not rounding noise times 1/sqrt(eps)) and an offset group
    // accurate; if they overflow (|x| near T's max), the plain sum of x / m, whose terms and
    // partial sums stay below T's max.
    const T origin = xg[0];
    double deviations = 0;
    for (int64_t k = 0; k < gc; ++k) {
      const T* xc = xg + k * plane;
      deviations += plane_sum<T>(plane, [&](int64_t i) { return xc[i] - origin; });
    }
    T mean_t = T(double(origin) + deviations / double(m));
    if (!std::isfinite(deviations) && std::isfinite(double(origin))) {
      const T inv_m = T(1.0 / double(m));
      double sum = 0;
      for (int64_t k = 0; k < gc; ++k) {
        const T* xc = xg + k * plane;
        sum += plane_sum<T>(plane, [&](int64_t i) { return xc[i] * inv_m; });
      }
      mean_t = T(sum);
    }
    double squares = 0;
    for (int64_t k = 0; k < gc; ++k) {
      const T* xc = xg + k * plane;
      squares += plane_sum<T>(plane, [&](int64_t i) { return (xc[i] - mean_t) * (xc[i] - mean_t); });
    }
    // NaN / Inf input makes the statistics NaN, and the group's output is NaN, so the failure
    // shows instead of passing on as a finite, meaningless value. Squares that overflow T
    // from finite input are summed again, scaled.
    const bool overflowed = std::isfinite(double(mean_t)) && !std::isfinite(squares);
    const double rstd = overflowed ? scaled_rstd<T>(xg, gc, plane, mean_t, eps)
                                   : 1.0 / std::sqrt(squares / double(m) + eps);
    const T mean = mean_t, rstd_t = T(rstd);
    stats[2 * group] = mean;
    stats[2 * group + 1] = rstd_t;
    const int64_t t = l.task_of(group), c0 = l.weight_channel(group);
    const bool finite = std::isfinite(double(mean)) && std::isfinite(double(rstd_t)) && rstd_t > T(0);
    for (int64_t k = 0; k < gc; ++k) {
      const Affine<T> affine =
          channel_affine(weight[t * l.channels + c0 + k], bias[t * l.channels + c0 + k], mean, rstd_t);
      T* yc = y + (l.first_channel(group) + k) * l.out_plane();
      if (!finite) {
        for (int64_t o = 0; o < l.out_plane(); ++o) yc[o] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      forward_plane(l, xg + k * plane, affine, yc);
    }
  }
}

template <typename T>
void forward_impl(const Layout& l, const T* x, const T* weight, const T* bias, double eps, T* y, T* stats) {
  at::parallel_for(0, l.count(), 1, [&](int64_t begin, int64_t end) {
    forward_groups(l, x, weight, bias, eps, y, stats, begin, end);
  });
}

std::tuple<at::Tensor, at::Tensor> group_norm_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                          const at::Tensor& bias_in, int64_t groups, double eps,
                                                          bool relu, bool pool) {
  const Layout l = layout_of(x_in, weight_in, bias_in, groups, relu, pool, "group_norm_forward");
  TORCH_CHECK(eps > 0, "group_norm_forward: eps must be > 0, got ", eps);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor y = at::empty({l.tasks, l.batch, l.channels, l.out_height(), l.out_width()}, x.options());
  at::Tensor stats = at::empty({l.tasks, l.batch, l.groups, 2}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_norm_forward", [&] {
    forward_impl<scalar_t>(l, x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                           bias.const_data_ptr<scalar_t>(), eps, y.mutable_data_ptr<scalar_t>(),
                           stats.mutable_data_ptr<scalar_t>());
  });
  return {y, stats};
}

// Sums the [T, N, C] per-group partials over n into a [T, C] tensor of x's dtype.
at::Tensor reduce_over_batch(const Layout& l, const std::vector<double>& partials, const at::Tensor& like) {
  at::Tensor out = at::empty({l.tasks, l.channels}, like.options());
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "group_norm_reduce", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t t = 0; t < l.tasks; ++t) {
      for (int64_t c = 0; c < l.channels; ++c) {
        double sum = 0;
        for (int64_t n = 0; n < l.batch; ++n) sum += partials[(t * l.batch + n) * l.channels + c];
        o[t * l.channels + c] = scalar_t(sum);
      }
    }
  });
  return out;
}

// ---- backward ---------------------------------------------------------------------------------

// Groups [begin, end) of the backward (vector clones: vector_clones.h).
template <typename T>
BMSSL_VECTOR_CLONES void backward_groups(const Layout& l, const T* grad_y, const T* x, const T* weight, const T* bias,
                                         const T* stats, T* grad_x, double* weight_partials, double* bias_partials,
                                         int64_t begin, int64_t end) {
  const int64_t gc = l.group_channels(), plane = l.plane(), m = l.group_size();
  for (int64_t group = begin; group < end; ++group) {
    const T mean = stats[2 * group], rstd = stats[2 * group + 1];
    const int64_t t = l.task_of(group), c0 = l.weight_channel(group);
    const T* xg = x + group * m;
    T* dg = grad_x + group * m;  // holds da until the last pass
    double sum_h = 0, sum_h_xhat = 0;
    for (int64_t k = 0; k < gc; ++k) {
      const T w = weight[t * l.channels + c0 + k];
      const Affine<T> affine = channel_affine(w, bias[t * l.channels + c0 + k], mean, rstd);
      double sums[3];
      route_plane<T>(l, xg + k * plane, nullptr, grad_y + (l.first_channel(group) + k) * l.out_plane(), affine,
                     mean, rstd, dg + k * plane, sums);
      const int64_t channel = l.first_channel(group) + k;  // (t, n, c) over [T, N, C]
      bias_partials[channel] = sums[0];
      weight_partials[channel] = sums[1];
      sum_h += double(w) * sums[0];
      sum_h_xhat += double(w) * sums[1];
    }
    const T mean_h = T(sum_h / double(m)), mean_h_xhat = T(sum_h_xhat / double(m));
    for (int64_t k = 0; k < gc; ++k) {
      const T w = weight[t * l.channels + c0 + k];
      const T* xc = xg + k * plane;
      T* dc = dg + k * plane;
#pragma omp simd
      for (int64_t i = 0; i < plane; ++i) {
        const T xhat = (xc[i] - mean) * rstd;
        dc[i] = rstd * (w * dc[i] - mean_h - xhat * mean_h_xhat);
      }
    }
  }
}

template <typename T>
void backward_impl(const Layout& l, const T* grad_y, const T* x, const T* weight, const T* bias, const T* stats,
                   T* grad_x, std::vector<double>& weight_partials, std::vector<double>& bias_partials) {
  at::parallel_for(0, l.count(), 1, [&](int64_t begin, int64_t end) {
    backward_groups(l, grad_y, x, weight, bias, stats, grad_x, weight_partials.data(), bias_partials.data(),
                           begin, end);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
    const at::Tensor& stats_in, int64_t groups, bool relu, bool pool) {
  const Layout l = layout_of(x_in, weight_in, bias_in, groups, relu, pool, "group_norm_backward");
  TORCH_CHECK(grad_y_in.sizes() == at::IntArrayRef({l.tasks, l.batch, l.channels, l.out_height(), l.out_width()}),
              "group_norm_backward: grad_y has shape ", grad_y_in.sizes(), ", not the output's");
  TORCH_CHECK(stats_in.numel() == 2 * l.count(), "group_norm_backward: stats must be [T, N, G, 2]");
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor grad_y = grad_y_in.to(x.scalar_type()).contiguous();
  const at::Tensor stats = stats_in.to(x.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty_like(x);
  std::vector<double> weight_partials(l.tasks * l.batch * l.channels), bias_partials(weight_partials.size());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_norm_backward", [&] {
    backward_impl<scalar_t>(l, grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                            weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
                            stats.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
                            weight_partials, bias_partials);
  });
  return {grad_x, reduce_over_batch(l, weight_partials, x), reduce_over_batch(l, bias_partials, x)};
}

// ---- double backward --------------------------------------------------------------------------

// d grad_y of one plane: route^T of d_da = weight rstd P(u) + p xhat + q.
template <typename T>
BMSSL_INLINE void d_grad_y_plane(const Layout& l, const T* x, const T* u, Affine<T> affine, T mean, T rstd, T w, T p,
                                 T q, T mean_u, T mean_u_xhat, T* out) {
  auto d_da = [&](T xv, T uv) {
    const T xhat = (xv - mean) * rstd;
    return w * rstd * (uv - mean_u - xhat * mean_u_xhat) + p * xhat + q;
  };
  const bool relu = l.relu;
  if (!l.pool) {
#pragma omp simd
    for (int64_t i = 0; i < l.plane(); ++i) {
      const T value = d_da(x[i], u[i]);
      out[i] = (!relu | (affine(x[i]) > T(0))) ? value : T(0);
    }
    return;
  }
  const int64_t width = l.width, out_w = l.out_width();
  for (int64_t oi = 0; oi < l.out_height(); ++oi) {
    const T* x0 = x + 2 * oi * width;
    const T* x1 = x0 + width;
    const T* u0 = u + 2 * oi * width;
    const T* u1 = u0 + width;
    T* o = out + oi * out_w;
#pragma omp simd
    for (int64_t oj = 0; oj < out_w; ++oj) {
      const int64_t j = 2 * oj;
      T best;
      const int arg = window_arg_at(x0, x1, j, affine, relu, best);
      const T x_arg = at_arg(arg, x0[j], x0[j + 1], x1[j], x1[j + 1]);
      const T u_arg = at_arg(arg, u0[j], u0[j + 1], u1[j], u1[j + 1]);
      o[oj] = T(arg >= 0) * d_da(x_arg, u_arg);
    }
  }
}

// Groups [begin, end) of the double backward (vector clones: vector_clones.h).
template <typename T>
BMSSL_VECTOR_CLONES void double_backward_groups(const Layout& l, const T* gg_x, const T* gg_weight, const T* gg_bias,
                                                const T* grad_y, const T* x, const T* weight, const T* bias,
                                                const T* stats, T* d_grad_y, T* d_x, double* weight_partials,
                                                int64_t begin, int64_t end) {
  const int64_t gc = l.group_channels(), plane = l.plane(), m = l.group_size();
  for (int64_t group = begin; group < end; ++group) {
    const T mean = stats[2 * group], rstd = stats[2 * group + 1];
    const int64_t t = l.task_of(group), c0 = l.weight_channel(group);
    const T* xg = x + group * m;
    const T* ug = gg_x + group * m;
    T* dg = d_x + group * m;  // holds da until the last pass
    // pass 1: da, and the group sums of u, u xhat, h, h xhat, u h (h = weight da)
    double sum_u = 0, sum_u_xhat = 0, sum_h = 0, sum_h_xhat = 0, sum_u_h = 0;
    for (int64_t k = 0; k < gc; ++k) {
      const T w = weight[t * l.channels + c0 + k];
      const Affine<T> affine = channel_affine(w, bias[t * l.channels + c0 + k], mean, rstd);
      const T* xc = xg + k * plane;
      const T* uc = ug + k * plane;
      double sums[3];
      route_plane<T>(l, xc, uc, grad_y + (l.first_channel(group) + k) * l.out_plane(), affine, mean, rstd,
                     dg + k * plane, sums);
      sum_u += plane_sum<T>(plane, [&](int64_t i) { return uc[i]; });
      sum_u_xhat += plane_sum<T>(plane, [&](int64_t i) { return uc[i] * ((xc[i] - mean) * rstd); });
      sum_h += double(w) * sums[0];
      sum_h_xhat += double(w) * sums[1];
      sum_u_h += double(w) * sums[2];
    }
    const double md = double(m);
    const T mean_u = T(sum_u / md), mean_u_xhat = T(sum_u_xhat / md);
    const T phi_r = T(sum_u_h - sum_h * sum_u / md - sum_h_xhat * sum_u_xhat / md);
    const T g_h = T(-double(rstd) / md * sum_u_xhat), g_u = T(-double(rstd) / md * sum_h_xhat);
    // pass 2: d grad_y, the d weight partials, and the group sums of G and G xhat
    double sum_g = 0, sum_g_xhat = 0;
    for (int64_t k = 0; k < gc; ++k) {
      const int64_t wc = t * l.channels + c0 + k;
      const T w = weight[wc], p = gg_weight[wc], q = gg_bias[wc];
      const T* xc = xg + k * plane;
      const T* uc = ug + k * plane;
      const T* da = dg + k * plane;
      weight_partials[l.first_channel(group) + k] = plane_sum<T>(plane, [&](int64_t i) {
        return da[i] * (rstd * (uc[i] - mean_u - (xc[i] - mean) * rstd * mean_u_xhat));
      });
      auto g = [&](int64_t i) { return (g_h * w + p) * da[i] + g_u * uc[i]; };
      sum_g += plane_sum<T>(plane, g);
      sum_g_xhat += plane_sum<T>(plane, [&](int64_t i) { return g(i) * ((xc[i] - mean) * rstd); });
      const Affine<T> affine = channel_affine(w, bias[wc], mean, rstd);
      d_grad_y_plane(l, xc, uc, affine, mean, rstd, w, p, q, mean_u, mean_u_xhat,
                     d_grad_y + (l.first_channel(group) + k) * l.out_plane());
    }
    // pass 3: d x = rstd (G - mean G - xhat mean(G xhat)) - (rstd^2 / m) Phi_r xhat
    const T mean_g = T(sum_g / md), mean_g_xhat = T(sum_g_xhat / md);
    const T r_term = T(double(rstd) * double(rstd) / md * double(phi_r));
    for (int64_t k = 0; k < gc; ++k) {
      const int64_t wc = t * l.channels + c0 + k;
      const T gain = g_h * weight[wc] + gg_weight[wc];
      const T* xc = xg + k * plane;
      const T* uc = ug + k * plane;
      T* dc = dg + k * plane;
#pragma omp simd
      for (int64_t i = 0; i < plane; ++i) {
        const T xhat = (xc[i] - mean) * rstd;
        const T g = gain * dc[i] + g_u * uc[i];
        dc[i] = rstd * (g - mean_g - xhat * mean_g_xhat) - r_term * xhat;
      }
    }
  }
}

template <typename T>
void double_backward_impl(const Layout& l, const T* gg_x, const T* gg_weight, const T* gg_bias, const T* grad_y,
                          const T* x, const T* weight, const T* bias, const T* stats, T* d_grad_y, T* d_x,
                          std::vector<double>& weight_partials) {
  at::parallel_for(0, l.count(), 1, [&](int64_t begin, int64_t end) {
    double_backward_groups(l, gg_x, gg_weight, gg_bias, grad_y, x, weight, bias, stats, d_grad_y, d_x,
                                  weight_partials.data(), begin, end);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_double_backward_cpu(
    const at::Tensor& gg_x_in, const at::Tensor& gg_weight_in, const at::Tensor& gg_bias_in,
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
    const at::Tensor& stats_in, int64_t groups, bool relu, bool pool) {
  const Layout l = layout_of(x_in, weight_in, bias_in, groups, relu, pool, "group_norm_double_backward");
  TORCH_CHECK(gg_x_in.sizes() == x_in.sizes(), "group_norm_double_backward: grad_grad_x must be x's shape");
  TORCH_CHECK(gg_weight_in.sizes() == weight_in.sizes() && gg_bias_in.sizes() == bias_in.sizes(),
              "group_norm_double_backward: grad_grad_weight / grad_grad_bias must be [T, C]");
  TORCH_CHECK(grad_y_in.sizes() == at::IntArrayRef({l.tasks, l.batch, l.channels, l.out_height(), l.out_width()}),
              "group_norm_double_backward: grad_y has shape ", grad_y_in.sizes(), ", not the output's");
  TORCH_CHECK(stats_in.numel() == 2 * l.count(), "group_norm_double_backward: stats must be [T, N, G, 2]");
  const auto dtype = x_in.scalar_type();
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor gg_x = gg_x_in.to(dtype).contiguous(), gg_weight = gg_weight_in.to(dtype).contiguous();
  const at::Tensor gg_bias = gg_bias_in.to(dtype).contiguous(), grad_y = grad_y_in.to(dtype).contiguous();
  const at::Tensor stats = stats_in.to(dtype).contiguous();
  at::Tensor d_grad_y = at::empty_like(grad_y), d_x = at::empty_like(x);
  std::vector<double> weight_partials(l.tasks * l.batch * l.channels);
  AT_DISPATCH_FLOATING_TYPES(dtype, "group_norm_double_backward", [&] {
    double_backward_impl<scalar_t>(
        l, gg_x.const_data_ptr<scalar_t>(), gg_weight.const_data_ptr<scalar_t>(), gg_bias.const_data_ptr<scalar_t>(),
        grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        bias.const_data_ptr<scalar_t>(), stats.const_data_ptr<scalar_t>(), d_grad_y.mutable_data_ptr<scalar_t>(),
        d_x.mutable_data_ptr<scalar_t>(), weight_partials);
  });
  return {d_grad_y, d_x, reduce_over_batch(l, weight_partials, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bmssl, CPU, m) {
  m.impl("group_norm_forward", &group_norm_forward_cpu);
  m.impl("group_norm_backward", &group_norm_backward_cpu);
  m.impl("group_norm_double_backward", &group_norm_double_backward_cpu);
}

}  // namespace bmssl
