// CUDA kernels of bmssl::kl_bootstrap_rows (maths in csrc/kl_bootstrap.cpp).
//
//   a = student/T, b = target/T;  row_kl = sum_j softmax(b)_j (b_j - a_j) - lse(b) + lse(a)
//                                        = sum_j softmax(b)_j (b'_j - a'_j) + log(sum e^{a'} / sum e^{b'})
//   with a' = a - max a, b' = b - max b;  grad_student_rj = grad_row_kl_r (softmax(a)_j - softmax(b)_j) / T
//
// Forward: one warp per row, two passes over its C classes (the algorithm of the CPU and Triton
// kernels): the row maxima, then the sums of e^{a'}, e^{b'} and e^{b'} (b' - a'), each reduced
// across the warp by shuffles. A target entry of -inf has probability 0 and adds nothing (no
// 0 * inf). Backward: one thread per element, int64 indices. No torch headers here; the binding is csrc/cuda/kl_bootstrap.cpp.
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

template <typename T> __device__ __forceinline__ T shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

template <typename A> __device__ __forceinline__ A warp_max(A v) {
  for (int mask = 16; mask > 0; mask >>= 1) v = max(v, shfl_xor(v, mask));
  return v;
}

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
  for (int mask = 16; mask > 0; mask >>= 1) v += shfl_xor(v, mask);
  return v;
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
  const scalar_t* s = student + row * classes;
  const scalar_t* t = target + row * classes;
  // pass 1: the row maxima of a and b
  A max_a = -INFINITY, max_b = -INFINITY;
  for (int64_t j = threadIdx.x; j < classes; j += 32) {
    max_a = max(max_a, to_acc(s[j]) * inv_t);
    max_b = max(max_b, to_acc(t[j]) * inv_t);
  }
  max_a = warp_max(max_a);
  max_b = warp_max(max_b);
  // pass 2: with a' = a - max_a, b' = b - max_b, the sums of e^{a'}, e^{b'} and cross =
  // sum e^{b'} (b' - a'): the shifts cancel inside each term, so neither large logits nor a
  // student that is the target plus a constant cost accuracy (csrc/cpu/kl_bootstrap.cpp)
  A sum_a = 0, sum_b = 0, cross = 0;
  for (int64_t j = threadIdx.x; j < classes; j += 32) {
    const A a = to_acc(s[j]) * inv_t - max_a, b = to_acc(t[j]) * inv_t - max_b;
    sum_a += exp_acc(a);
    const A eb = exp_acc(b);
    sum_b += eb;
    if (eb > A(0)) cross += eb * (b - a);
  }
  sum_a = warp_sum(sum_a);
  sum_b = warp_sum(sum_b);
  cross = warp_sum(cross);
  if (threadIdx.x == 0) {
    row_kl[row] = cross / sum_b + log_acc(sum_a / sum_b);
    row_lse[2 * row] = max_a + log_acc(sum_a);
    row_lse[2 * row + 1] = max_b + log_acc(sum_b);
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
