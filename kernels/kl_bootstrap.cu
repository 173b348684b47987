// CUDA kernels of bmssl::kl_bootstrap_rows (maths in csrc/kl_bootstrap.cpp).
//
//   a = student/T, b = target/T;  row_kl = sum_j softmax(b)_j (b_j - a_j) - lse(b) + lse(a)
//   grad_student_rj = grad_row_kl_r (softmax(a)_j - softmax(b)_j) / T
//
// Forward: one warp per row. Each lane keeps online (max, sum) for a and b and the running
// cross term sum e^{b - max_b} (b - a), rescaled when max_b grows; lanes merge by shuffles.
// A target entry of -inf has probability 0 and is skipped (no 0 * inf). Backward: one thread
// per element, int64 indices. No torch headers here; the binding is csrc/cuda/kl_bootstrap.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "kl_bootstrap.h"

namespace bmssl::cuda {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
__device__ __forceinline__ double from_acc_double(double x) { return x; }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// exp(m_old - m_new), with exp(-inf - -inf) taken as 0 rather than NaN.
template <typename A> __device__ __forceinline__ A rescale(A m_old, A m_new) {
  return isinf(m_old) && m_old < 0 ? A(0) : exp_acc(m_old - m_new);
}

// Online state of one row (or one lane's share of it).
template <typename A> struct RowState {
  A max_a, sum_a, max_b, sum_b, cross;

  __device__ void add(A a, A b) {
    if (!(isinf(a) && a < 0)) {
      if (a > max_a) { sum_a = sum_a * rescale(max_a, a) + A(1); max_a = a; }
      else { sum_a += exp_acc(a - max_a); }
    }
    if (!(isinf(b) && b < 0)) {
      if (b > max_b) {
        const A scale = rescale(max_b, b);
        sum_b = sum_b * scale + A(1);
        cross = cross * scale + (b - a);
        max_b = b;
      } else {
        const A eb = exp_acc(b - max_b);
        sum_b += eb;
        if (eb > A(0)) cross += eb * (b - a);
      }
    }
  }

  __device__ void merge(const RowState& o) {
    const A new_a = max(max_a, o.max_a), new_b = max(max_b, o.max_b);
    sum_a = sum_a * rescale(max_a, new_a) + o.sum_a * rescale(o.max_a, new_a);
    const A self_b = rescale(max_b, new_b), other_b = rescale(o.max_b, new_b);
    sum_b = sum_b * self_b + o.sum_b * other_b;
    cross = cross * self_b + o.cross * other_b;
    max_a = new_a;
    max_b = new_b;
  }
};

template <typename T> __device__ __forceinline__ T shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

constexpr int kRowsPerBlock = 4;  // one warp per row, four warps per block

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ student,
                               const scalar_t* __restrict__ target, int64_t rows, int64_t classes,
                               typename Acc<scalar_t>::type inv_t,
                               typename Acc<scalar_t>::type* __restrict__ row_kl,
                               typename Acc<scalar_t>::type* __restrict__ row_lse) {
  using A = typename Acc<scalar_t>::type;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;  // whole warp leaves together
  const A neg_inf = -INFINITY;
  RowState<A> state{neg_inf, A(0), neg_inf, A(0), A(0)};
  const scalar_t* s = student + row * classes;
  const scalar_t* t = target + row * classes;
  for (int64_t j = threadIdx.x; j < classes; j += 32) state.add(to_acc(s[j]) * inv_t, to_acc(t[j]) * inv_t);
  for (int mask = 16; mask > 0; mask >>= 1) {
    RowState<A> other{shfl_xor(state.max_a, mask), shfl_xor(state.sum_a, mask),
                      shfl_xor(state.max_b, mask), shfl_xor(state.sum_b, mask),
                      shfl_xor(state.cross, mask)};
    state.merge(other);
  }
  if (threadIdx.x == 0) {
    const A lse_a = state.max_a + log_acc(state.sum_a);
    const A lse_b = state.max_b + log_acc(state.sum_b);
    row_kl[row] = state.cross / state.sum_b - lse_b + lse_a;
    row_lse[2 * row] = lse_a;
    row_lse[2 * row + 1] = lse_b;
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const typename Acc<scalar_t>::type* __restrict__ grad_row_kl,
                                const scalar_t* __restrict__ student,
                                const scalar_t* __restrict__ target,
                                const typename Acc<scalar_t>::type* __restrict__ row_lse,
                                int64_t rows, int64_t classes, typename Acc<scalar_t>::type inv_t,
                                scalar_t* __restrict__ grad_student) {
  using A = typename Acc<scalar_t>::type;
  const int64_t total = rows * classes;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / classes;
    const A p_student = exp_acc(to_acc(student[i]) * inv_t - row_lse[2 * r]);
    const A p_target = exp_acc(to_acc(target[i]) * inv_t - row_lse[2 * r + 1]);
    const A g = grad_row_kl[r] * inv_t * (p_student - p_target);
    if constexpr (std::is_same_v<scalar_t, double>) grad_student[i] = from_acc_double(g);
    else grad_student[i] = from_acc<scalar_t>(g);
  }
}

template <typename scalar_t>
cudaError_t launch_forward(const void* s, const void* t, int64_t rows, int64_t classes,
                           double temperature, void* row_kl, void* row_lse, cudaStream_t stream) {
  using A = typename Acc<scalar_t>::type;
  if (rows == 0) return cudaSuccess;
  const dim3 block(32, kRowsPerBlock);
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 2147483647LL) return cudaErrorInvalidConfiguration;
  forward_kernel<scalar_t><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
      static_cast<const scalar_t*>(s), static_cast<const scalar_t*>(t), rows, classes,
      A(1) / A(temperature), static_cast<A*>(row_kl), static_cast<A*>(row_lse));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_backward(const void* g, const void* s, const void* t, const void* lse,
                            int64_t rows, int64_t classes, double temperature, void* out,
                            cudaStream_t stream) {
  using A = typename Acc<scalar_t>::type;
  const int64_t total = rows * classes;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535LL * 8);
  backward_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const A*>(g), static_cast<const scalar_t*>(s), static_cast<const scalar_t*>(t),
      static_cast<const A*>(lse), rows, classes, A(1) / A(temperature), static_cast<scalar_t*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t kl_bootstrap_rows_forward(ElementType type, const void* student, const void* target,
                                      int64_t rows, int64_t classes, double temperature,
                                      void* row_kl, void* row_lse, cudaStream_t stream) {
  switch (type) {
    case ElementType::kF32: return launch_forward<float>(student, target, rows, classes, temperature, row_kl, row_lse, stream);
    case ElementType::kF64: return launch_forward<double>(student, target, rows, classes, temperature, row_kl, row_lse, stream);
    case ElementType::kF16: return launch_forward<__half>(student, target, rows, classes, temperature, row_kl, row_lse, stream);
    case ElementType::kBF16: return launch_forward<__nv_bfloat16>(student, target, rows, classes, temperature, row_kl, row_lse, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t kl_bootstrap_rows_backward(ElementType type, const void* grad_row_kl,
                                       const void* student, const void* target,
                                       const void* row_lse, int64_t rows, int64_t classes,
                                       double temperature, void* grad_student,
                                       cudaStream_t stream) {
  switch (type) {
    case ElementType::kF32: return launch_backward<float>(grad_row_kl, student, target, row_lse, rows, classes, temperature, grad_student, stream);
    case ElementType::kF64: return launch_backward<double>(grad_row_kl, student, target, row_lse, rows, classes, temperature, grad_student, stream);
    case ElementType::kF16: return launch_backward<__half>(grad_row_kl, student, target, row_lse, rows, classes, temperature, grad_student, stream);
    case ElementType::kBF16: return launch_backward<__nv_bfloat16>(grad_row_kl, student, target, row_lse, rows, classes, temperature, grad_student, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace bmssl::cuda
