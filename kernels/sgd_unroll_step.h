// Launcher of the CUDA multi-tensor SGD step (kernels/sgd_unroll_step.cu); no torch types.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "kl_bootstrap.h"  // ElementType

namespace bmssl::cuda {

constexpr int kSgdTensorsPerLaunch = 64;  // kernel-argument tables hold this many tensors

// out[k] = params[k] - lr * grads[k] for k < count (count <= kSgdTensorsPerLaunch), one launch.
cudaError_t sgd_unroll_step(ElementType type, int count, const void* const* params,
                            const void* const* grads, void* const* outs, const int64_t* numels,
                            double lr, cudaStream_t stream);

}  // namespace bmssl::cuda
