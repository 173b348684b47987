// Prints the dynamic shared memory per block of each CUDA NT-Xent pass, per element type, as
// kernels/ntxent.cu computes it (tests/test_build.py compiles this for the host and compares
// with bmssl.ops.ntxent.CUDA_SHARED_BYTES).
#include "ntxent.cu"

#include <cstdio>

namespace bmssl::cuda {
namespace {
template <typename E> void print_bytes(const char* name) {
  using T = typename TilesOf<E>::type;
  std::printf("%s %zu %zu %zu %zu\n", name, Shared<T, E, Pass::kForward>::kBytes, Shared<T, E, Pass::kBackward>::kBytes,
              Shared<T, E, Pass::kDoubleAB>::kBytes, Shared<T, E, Pass::kDoubleGrad>::kBytes);
}
}  // namespace

void print_all_bytes() {
  print_bytes<float>("float32");
  print_bytes<double>("float64");
  print_bytes<__half>("float16");
  print_bytes<__nv_bfloat16>("bfloat16");
}
}  // namespace bmssl::cuda

int main() { bmssl::cuda::print_all_bytes(); }
