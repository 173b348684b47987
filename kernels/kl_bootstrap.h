// Launchers of the CUDA KL bootstrap kernels (kernels/kl_bootstrap.cu). Plain pointers and
// sizes, no torch types, so the .cu file compiles without torch headers.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace bmssl::cuda {

// Element types the kernels take. The accumulation type is fp64 for kF64, else fp32.
enum class ElementType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// row_kl [rows], row_lse [rows, 2] in the accumulation type. Returns the launch status.
cudaError_t kl_bootstrap_rows_forward(ElementType type, const void* student, const void* target,
                                      int64_t rows, int64_t classes, double temperature,
                                      void* row_kl, void* row_lse, cudaStream_t stream);

// grad_row_kl [rows] and row_lse [rows, 2] in the accumulation type; grad_student like student.
cudaError_t kl_bootstrap_rows_backward(ElementType type, const void* grad_row_kl,
                                       const void* student, const void* target,
                                       const void* row_lse, int64_t rows, int64_t classes,
                                       double temperature, void* grad_student,
                                       cudaStream_t stream);

}  // namespace bmssl::cuda
