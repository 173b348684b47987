// Launchers of the CUDA NT-Xent kernels (kernels/ntxent.cu). Plain pointers and sizes, no torch
// types, so the .cu file compiles without torch headers. Maths in csrc/ntxent.cpp.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "kl_bootstrap.h"  // ElementType

namespace bmssl::cuda {

struct NTXentShape {
  int64_t tasks, batch, dim;  // u is [T, B, d]
};

// u [T, B, d] of `type`, contiguous; labels [T, B] int64. Writes row_loss [T, B] and row_stats
// [T, 2, B] in the accumulation type (fp64 for kF64, else fp32). label_errors [2] int64 must hold
// INT64_MAX on entry; it receives the smallest flat index t * B + i of a row whose label lies
// outside [0, B), and of a row with no positive (INT64_MAX where there is none).
cudaError_t ntxent_forward(ElementType type, const void* u, const int64_t* labels, NTXentShape shape,
                           double inv_tau, bool variant_in, void* row_loss, void* row_stats,
                           int64_t* label_errors, cudaStream_t stream);

// grad_task_loss [T] and row_stats [T, 2, B] in the accumulation type; grad_u like u.
cudaError_t ntxent_backward(ElementType type, const void* grad_task_loss, const void* u,
                            const int64_t* labels, const void* row_stats, NTXentShape shape,
                            double inv_tau, bool variant_in, void* grad_u, cudaStream_t stream);

// grad_grad_u (V) like u. Writes row_ab [T, 2, B] = (a_i, b_i) in the accumulation type (the
// caller forms d/dg_t = mean_i (a_i - b_i)) and grad_u like u. Two launches on `stream`.
cudaError_t ntxent_double_backward(ElementType type, const void* grad_grad_u, const void* grad_task_loss,
                                   const void* u, const int64_t* labels, const void* row_stats,
                                   NTXentShape shape, double inv_tau, bool variant_in, void* row_ab,
                                   void* grad_u, cudaStream_t stream);

}  // namespace bmssl::cuda
