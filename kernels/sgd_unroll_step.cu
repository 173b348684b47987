// CUDA kernel of bmssl::sgd_unroll_step: out_k = params_k - lr * grads_k for up to
// kSgdTensorsPerLaunch tensors in one launch. The pointer and size tables travel in the kernel
// arguments; blockIdx.y picks the tensor, a grid-stride loop over x covers its elements
// (int64 indices). fp16/bf16 compute in fp32. No torch headers here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "sgd_unroll_step.h"

namespace bmssl::cuda {
namespace {

struct Tables {
  const void* params[kSgdTensorsPerLaunch];
  const void* grads[kSgdTensorsPerLaunch];
  void* outs[kSgdTensorsPerLaunch];
  int64_t numels[kSgdTensorsPerLaunch];
};

template <typename T> struct Math { using acc = float; };
template <> struct Math<double> { using acc = double; };

template <typename T> __device__ __forceinline__ typename Math<T>::acc load(const T* p, int64_t i) {
  return static_cast<typename Math<T>::acc>(p[i]);
}
template <> __device__ __forceinline__ float load<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <typename T> __device__ __forceinline__ T store_as(typename Math<T>::acc x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half store_as<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

template <typename T>
__global__ void sgd_kernel(Tables tables, typename Math<T>::acc lr) {
  const int k = blockIdx.y;
  const T* p = static_cast<const T*>(tables.params[k]);
  const T* g = static_cast<const T*>(tables.grads[k]);
  T* out = static_cast<T*>(tables.outs[k]);
  const int64_t n = tables.numels[k];
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = store_as<T>(load(p, i) - lr * load(g, i));
}

template <typename T>
cudaError_t launch(int count, const void* const* params, const void* const* grads, void* const* outs,
                   const int64_t* numels, double lr, cudaStream_t stream) {
  Tables tables;
  int64_t largest = 0;
  for (int k = 0; k < count; ++k) {
    tables.params[k] = params[k];
    tables.grads[k] = grads[k];
    tables.outs[k] = outs[k];
    tables.numels[k] = numels[k];
    largest = std::max(largest, numels[k]);
  }
  if (count == 0 || largest == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((largest + threads - 1) / threads, 1024));
  sgd_kernel<T><<<dim3(blocks, count), threads, 0, stream>>>(tables, static_cast<typename Math<T>::acc>(lr));
  return cudaGetLastError();
}

}  // namespace

cudaError_t sgd_unroll_step(ElementType type, int count, const void* const* params, const void* const* grads,
                            void* const* outs, const int64_t* numels, double lr, cudaStream_t stream) {
  if (count > kSgdTensorsPerLaunch) return cudaErrorInvalidValue;
  switch (type) {
    case ElementType::kF32: return launch<float>(count, params, grads, outs, numels, lr, stream);
    case ElementType::kF64: return launch<double>(count, params, grads, outs, numels, lr, stream);
    case ElementType::kF16: return launch<__half>(count, params, grads, outs, numels, lr, stream);
    case ElementType::kBF16: return launch<__nv_bfloat16>(count, params, grads, outs, numels, lr, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace bmssl::cuda
