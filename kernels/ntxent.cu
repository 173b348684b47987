// CUDA kernels of the fused multi-view NT-Xent (schema and maths in csrc/ntxent.cpp).
//
//   s_ij = u_i . u_j inv_tau,  A(i) = {j != i},  P(i) = {j != i : y_j = y_i}
//   "in":  l_i = lse_A(i) s_i - lse_P(i) s_i        "out": l_i = lse_A(i) s_i - mean_P(i) s_i
//   grad_u = c (G + G^T) U,  G_ij = p_ij - q_ij,  c_t = g_t inv_tau / B
//   double backward: sdot = (V U^T + U V^T) inv_tau,  a_i = sum_j p_ij sdot_ij,  b_i = sum_j q_ij sdot_ij
//     H_ij = p_ij (sdot_ij - a_i) - q_ij (sdot_ij - b_i)  (no q term for "out"),
//     d/dg_t = mean_i (a_i - b_i)  (formed by the binding),  d/du = c [(G + G^T) V + (H + H^T) U]
//
// Pointers: u, v [T, B, d] contiguous (fp32, fp64, fp16 or bf16); labels [T, B] int64; row_loss
// [T, B], row_stats and row_ab [T, 2, B], grad_task_loss [T] in the accumulation type A (fp64
// for fp64, else fp32): row_stats = (lse_A, lse_P) for "in", (lse_A, |P(i)|) for "out".
//
// Tiled as flash attention: a block of 256 threads owns kRows rows of one task and walks all
// columns in tiles of kCols; one tile of S lives in shared memory, never more. Per tile, a
// matmul forms S (and sdot) from the rows and the columns, staged in shared memory in chunks of
// kDepth; then each row is worked on by kThreads / kRows threads. Forward: each thread keeps
// online (max, sum) over A(i), and over P(i) ("in") or the positive sum and count ("out"),
// merged by warp shuffles at the end. Backward: the block forms M_ij = G_ij + G_ji from row i's
// and column j's statistics (S is symmetric) and accumulates M U in registers, so it writes only
// its own rows of grad_u: no atomics. The double backward is two such walks: a_i, b_i, then
// (G + G^T) V + (H + H^T) U. When d > kDepth the backward walks repeat once per kDepth-wide
// chunk of grad_u (S is recomputed per chunk).
//
// fp16/bf16: tensor cores (wmma m16n16k16, fp32 accumulators), tiles 64 rows x 64 columns x
// 128 depth; the weights M and H go to the second matmul rounded to the input type, as in the
// Triton kernels (fp16 backward: scaled by a power of two near sqrt(B) first, so that entries
// ~1/B stay normal); exp is the fast __expf. fp32/fp64: CUDA cores (exact IEEE, no tf32), tiles
// 32 x 32 x 128 (fp64: x 64), accurate exp. No double buffering (cp.async) yet.
// Labels are only compared, never used as indices; the forward flags rows whose label is out of
// range or that have no positive. Every global offset is int64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "ntxent.h"

namespace bmssl::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

enum class Pass { kForward, kBackward, kDoubleAB, kDoubleGrad };

template <typename E> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// dst = x, rounded to dst's type (the half types have no implicit conversions in torch builds).
__device__ __forceinline__ void assign(float& dst, float x) { dst = x; }
__device__ __forceinline__ void assign(double& dst, double x) { dst = x; }
__device__ __forceinline__ void assign(__half& dst, float x) { dst = __float2half_rn(x); }
__device__ __forceinline__ void assign(__nv_bfloat16& dst, float x) { dst = __float2bfloat16_rn(x); }

__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <int kGroup, typename T> __device__ __forceinline__ T group_sum(T x) {
  for (int lane_mask = kGroup / 2; lane_mask > 0; lane_mask >>= 1) x += __shfl_xor_sync(0xffffffffu, x, lane_mask);
  return x;
}

__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// ---- tiles on tensor cores (fp16, bf16) ---------------------------------------------------------

namespace wmma = nvcuda::wmma;

// kCount fp32 accumulator fragments of 16 x 16, held by one warp.
template <int kCount> struct Accumulators {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag[kCount];

  __device__ void zero() {
#pragma unroll
    for (int f = 0; f < kCount; ++f) wmma::fill_fragment(frag[f], 0.0f);
  }
};

template <typename E> struct TensorCoreTiles {
  using A = float;
  using Weight = E;  // M and H enter the second matmul in the input type
  static constexpr int kRows = 64, kCols = 64, kDepth = 128, kDepthStep = 16;
  static constexpr int kLdE = kDepth + 8;  // row stride of the staged u/v tiles (elements)
  static constexpr int kLdS = kCols + 4;   // of the S tiles (floats)
  static constexpr int kLdW = kCols + 8;   // of the weight tiles (elements)
  static constexpr size_t kStagingBytes = kWarps * 256 * sizeof(float);
  static_assert(kWarps == 8, "the fragment ownership below assumes 8 warps");

  __device__ static float exp_acc(float x) { return __expf(x); }

  // S [64, 64] += rows [64, depth] cols [64, depth]^T; warp w owns the 16 x 16 fragments
  // (w / 2, 2 (w % 2) + f), f = 0, 1.
  struct Scores : Accumulators<2> {
    __device__ void add(const E* rows, const E* cols, int depth) {
      const int warp = threadIdx.x / 32;
      const E* a_base = rows + (warp / 2) * 16 * kLdE;
      const E* b_base = cols + (warp % 2) * 32 * kLdE;
      for (int k = 0; k < depth; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
        wmma::load_matrix_sync(a, a_base + k, kLdE);
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> b;  // b[k][n] = cols[n][k]
          wmma::load_matrix_sync(b, b_base + f * 16 * kLdE + k, kLdE);
          wmma::mma_sync(frag[f], a, b, frag[f]);
        }
      }
    }
    // s = scale * S (an elementwise scaling of an accumulator is layout-free)
    __device__ void store(float* s, float scale) {
      const int warp = threadIdx.x / 32;
      float* base = s + (warp / 2) * 16 * kLdS + (warp % 2) * 32;
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        for (int i = 0; i < frag[f].num_elements; ++i) frag[f].x[i] *= scale;
        wmma::store_matrix_sync(base + f * 16, frag[f], kLdS, wmma::mem_row_major);
      }
    }
  };

  // out [64, 128] += weight [64, 64] cols [64, 128]; warp w owns the fragments (w / 2, 4 (w % 2) + f).
  struct Output : Accumulators<4> {
    __device__ void add(const E* weight, const E* cols, int width) {
      const int warp = threadIdx.x / 32;
      const E* a_base = weight + (warp / 2) * 16 * kLdW;
      const int col0 = (warp % 2) * 64;
      for (int k = 0; k < kCols; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
        wmma::load_matrix_sync(a, a_base + k, kLdW);
#pragma unroll
        for (int f = 0; f < 4; ++f) {
          if (col0 + 16 * f >= width) continue;  // the same for the whole warp
          wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> b;
          wmma::load_matrix_sync(b, cols + k * kLdE + col0 + 16 * f, kLdE);
          wmma::mma_sync(frag[f], a, b, frag[f]);
        }
      }
    }
    // out[row0 + r, chunk0 + c] = scale * acc[r, c] for r < B - row0, c < width (each warp
    // stages its fragments through its own 16 x 16 floats).
    __device__ void store(float* staging, E* out, int64_t row0, int64_t batch, int64_t dim, int64_t chunk0,
                          int width, float scale) const {
      const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
      float* mine = staging + warp * 256;
      const int64_t frag_row0 = row0 + (warp / 2) * 16;
      const int col0 = (warp % 2) * 64;
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        const int frag_col0 = col0 + 16 * f;
        if (frag_col0 >= width) continue;
        wmma::store_matrix_sync(mine, frag[f], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int64_t row = frag_row0 + e / 16;
          const int col = frag_col0 + e % 16;
          if (row < batch && col < width) assign(out[row * dim + chunk0 + col], mine[e] * scale);
        }
        __syncwarp();
      }
    }
  };
};

// ---- tiles on CUDA cores (fp32, fp64) -----------------------------------------------------------

// The 256 threads form a 16 x 16 grid: thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 16 a
// of both matmuls, columns tx + 16 b.
template <typename E> struct CudaCoreTiles {
  using A = E;
  using Weight = E;
  static constexpr int kRows = 32, kCols = 32, kDepth = sizeof(E) == 8 ? 64 : 128, kDepthStep = 1;
  static constexpr int kLdE = kDepth + 1;  // odd: the 16 column rows read by a warp hit 16 banks
  static constexpr int kLdS = kCols + 8;   // kThreads / kRows = 8 threads per row read 8 banks
  static constexpr int kLdW = kCols + 8;
  static constexpr size_t kStagingBytes = 0;
  static constexpr int kOutCols = kDepth / 16;

  __device__ static A exp_acc(A x) {
    if constexpr (sizeof(A) == 8) return exp(x);
    else return expf(x);
  }

  struct Scores {
    A acc[2][2];

    __device__ void zero() {
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) acc[a][b] = A(0);
    }
    __device__ void add(const E* rows, const E* cols, int depth) {
      const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
      const E* row_a = rows + ty * kLdE;
      const E* row_b = row_a + 16 * kLdE;
      const E* col_a = cols + tx * kLdE;
      const E* col_b = col_a + 16 * kLdE;
      for (int k = 0; k < depth; ++k) {
        const A r0 = row_a[k], r1 = row_b[k], c0 = col_a[k], c1 = col_b[k];
        acc[0][0] += r0 * c0;
        acc[0][1] += r0 * c1;
        acc[1][0] += r1 * c0;
        acc[1][1] += r1 * c1;
      }
    }
    __device__ void store(A* s, A scale) const {
      const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) s[(ty + 16 * a) * kLdS + tx + 16 * b] = acc[a][b] * scale;
    }
  };

  struct Output {
    A acc[2][kOutCols];

    __device__ void zero() {
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < kOutCols; ++b) acc[a][b] = A(0);
    }
    __device__ void add(const A* weight, const E* cols, int width) {
      const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
      const A* weight_a = weight + ty * kLdW;
      const A* weight_b = weight_a + 16 * kLdW;
      for (int n = 0; n < kCols; ++n) {
        const A w0 = weight_a[n], w1 = weight_b[n];
        const E* c = cols + n * kLdE + tx;
#pragma unroll
        for (int b = 0; b < kOutCols; ++b) {
          if (tx + 16 * b >= width) continue;  // staged columns stop at width
          const A y = c[16 * b];
          acc[0][b] += w0 * y;
          acc[1][b] += w1 * y;
        }
      }
    }
    __device__ void store(float*, E* out, int64_t row0, int64_t batch, int64_t dim, int64_t chunk0,
                          int width, A scale) const {
      const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        const int64_t row = row0 + ty + 16 * a;
#pragma unroll
        for (int b = 0; b < kOutCols; ++b) {
          const int col = tx + 16 * b;
          if (row < batch && col < width) out[row * dim + chunk0 + col] = acc[a][b] * scale;
        }
      }
    }
  };
};

template <typename E> struct TilesOf { using type = CudaCoreTiles<E>; };
template <> struct TilesOf<__half> { using type = TensorCoreTiles<__half>; };
template <> struct TilesOf<__nv_bfloat16> { using type = TensorCoreTiles<__nv_bfloat16>; };

// ---- shared memory ------------------------------------------------------------------------------

// Staged rows and columns of u (and v), the S (and sdot) tiles, the weight tiles of the second
// matmul, and per-column label and statistics of the current tile.
template <typename Tiles, typename E, Pass P> struct Shared {
  using A = typename Tiles::A;
  using W = typename Tiles::Weight;
  static constexpr bool kWithV = P == Pass::kDoubleAB || P == Pass::kDoubleGrad;
  static constexpr bool kWithOut = P == Pass::kBackward || P == Pass::kDoubleGrad;
  static constexpr int kMats = kWithV ? 2 : 1;
  static_assert(Tiles::kRows == Tiles::kCols, "row and column tiles share one size");
  static constexpr size_t kMatBytes = align128(sizeof(E) * Tiles::kRows * Tiles::kLdE);
  static constexpr size_t kScoreBytes = align128(sizeof(A) * Tiles::kRows * Tiles::kLdS);
  static constexpr size_t kWeightBytes = kWithOut ? align128(sizeof(W) * Tiles::kRows * Tiles::kLdW) : 0;
  static constexpr size_t kStagingBytes = kWithOut ? Tiles::kStagingBytes : 0;
  static constexpr size_t kColumnBytes = align128(Tiles::kCols * (sizeof(int64_t) + 4 * sizeof(A)));
  static constexpr size_t kBytes =
      kMats * (2 * kMatBytes + kScoreBytes + kWeightBytes) + kStagingBytes + kColumnBytes;

  E* rows[2] = {nullptr, nullptr};  // u rows, v rows [kRows, kLdE]
  E* cols[2] = {nullptr, nullptr};  // u columns, v columns [kCols, kLdE]
  A* score[2] = {nullptr, nullptr};  // S, sdot [kRows, kLdS]
  W* weight[2] = {nullptr, nullptr};  // G + G^T, H + H^T [kRows, kLdW]
  float* staging = nullptr;
  int64_t* col_label = nullptr;
  A* col_stat[4] = {nullptr, nullptr, nullptr, nullptr};  // lse_A, second (1/|P| for "out"), a, b

  __device__ explicit Shared(unsigned char* base) {
    for (int m = 0; m < kMats; ++m) {
      rows[m] = reinterpret_cast<E*>(base);
      cols[m] = reinterpret_cast<E*>(base + kMatBytes);
      score[m] = reinterpret_cast<A*>(base + 2 * kMatBytes);
      weight[m] = kWithOut ? reinterpret_cast<W*>(base + 2 * kMatBytes + kScoreBytes) : nullptr;
      base += 2 * kMatBytes + kScoreBytes + kWeightBytes;
    }
    staging = kWithOut ? reinterpret_cast<float*>(base) : nullptr;
    base += kStagingBytes;
    col_label = reinterpret_cast<int64_t*>(base);
    base += Tiles::kCols * sizeof(int64_t);
    for (int k = 0; k < 4; ++k) col_stat[k] = reinterpret_cast<A*>(base) + k * Tiles::kCols;
  }
};

// dst [kRows, ld] <- rows first .. first + kRows - 1, columns k0 .. k0 + width - 1 of src [B, d],
// zero past B and from width to padded. 16-byte loads for the half types when vector_loads
// (d % 8 == 0 and a 16-byte aligned src, so every 8-element group is aligned).
template <int kRows, int kLd, typename E>
__device__ void stage(E* dst, const E* src, int64_t first, int64_t batch, int64_t dim, int64_t k0, int width,
                      int padded, bool vector_loads) {
  if constexpr (sizeof(E) == 2) {
    if (vector_loads) {
      const int per_row = padded / 8;
      for (int e = threadIdx.x; e < kRows * per_row; e += kThreads) {
        const int r = e / per_row, k = (e - r * per_row) * 8;
        const int64_t row = first + r;
        uint4 value = make_uint4(0u, 0u, 0u, 0u);
        if (row < batch && k < width) value = *reinterpret_cast<const uint4*>(src + row * dim + k0 + k);
        *reinterpret_cast<uint4*>(dst + r * kLd + k) = value;
      }
      return;
    }
  }
  E zero;
  assign(zero, typename Acc<E>::type(0));
  for (int e = threadIdx.x; e < kRows * padded; e += kThreads) {
    const int r = e / padded, k = e - r * padded;
    const int64_t row = first + r;
    dst[r * kLd + k] = row < batch && k < width ? src[row * dim + k0 + k] : zero;
  }
}

// Online log-sum-exp of one thread's share of a row. A -inf term adds e^-inf = 0 (not
// e^(-inf - -inf) = NaN while the max is still -inf); a NaN term makes the sum NaN, and merging
// keeps it NaN even when every lane's max is -inf (the CPU kernel's NaN pattern).
template <typename Tiles> struct OnlineLse {
  using A = typename Tiles::A;
  A max = -A(INFINITY), sum = A(0);

  __device__ void add(A x) {
    if (x > max) {
      sum = sum * Tiles::exp_acc(max - x) + A(1);
      max = x;
    } else if (x != -A(INFINITY)) {
      sum += Tiles::exp_acc(x - max);
    }
  }
  template <int kGroup> __device__ void merge_group() {
    for (int lane_mask = kGroup / 2; lane_mask > 0; lane_mask >>= 1) {
      const A other_max = __shfl_xor_sync(0xffffffffu, max, lane_mask);
      const A other_sum = __shfl_xor_sync(0xffffffffu, sum, lane_mask);
      const A top = other_max > max ? other_max : max;
      if (top > -A(INFINITY)) sum = sum * Tiles::exp_acc(max - top) + other_sum * Tiles::exp_acc(other_max - top);
      else sum += other_sum;
      max = top;
    }
  }
  __device__ A lse() const { return max + log_acc(sum); }
};

template <typename E> struct Params {
  using A = typename Acc<E>::type;
  const E* u = nullptr;
  const E* v = nullptr;
  const int64_t* labels = nullptr;
  const A* stats = nullptr;
  const A* ab = nullptr;
  const A* grad_task = nullptr;
  A* row_loss = nullptr;
  A* stats_out = nullptr;
  A* ab_out = nullptr;
  E* grad_u = nullptr;
  long long* label_errors = nullptr;
  int64_t tasks = 0, batch = 0, dim = 0;
  A inv_tau = A(1);
  A weight_scale = A(1);  // a power of two: weights enter the second matmul times it
  bool variant_in = true;
  bool vector_loads = false;
};

// ---- the kernel ---------------------------------------------------------------------------------

// Occupancy, handed to ptxas through __launch_bounds__ so that it budgets registers for the blocks
// that can really share an SM. Without a minimum-blocks bound ptxas chose its own register counts,
// and several kernels spilled in their inner loops (the fp32 forward kept its online max and sum
// in local memory, 104 B per thread, at 48 registers), some for an occupancy their shared memory
// never allows. Blocks per SM = the fewer of what the shared memory allows (228 KB per SM on
// sm_90, 164 KB on sm_80, 1 KB reserved per block) and what the registers each pass needs without
// spilling allow (65536 per SM; the figures are ptxas -v's, CUDA 13.0, on both architectures:
// tests/test_build.py fails on any spill).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr size_t kSharedPerSm = 164 * 1024;
#else
constexpr size_t kSharedPerSm = 228 * 1024;
#endif
constexpr int kRegistersPerSm = 65536;

template <typename E, Pass P> constexpr int registers_without_spills() {
  if constexpr (P == Pass::kForward) return sizeof(E) == 8 ? 80 : 64;
  else if constexpr (P == Pass::kBackward) return sizeof(E) == 4 ? 80 : 128;
  else return 128;
}

template <typename E, Pass P> constexpr int blocks_per_sm() {
  const int by_shared = int(kSharedPerSm / (Shared<typename TilesOf<E>::type, E, P>::kBytes + 1024));
  const int by_registers = kRegistersPerSm / (kThreads * registers_without_spills<E, P>());
  return std::max(1, std::min(by_shared, by_registers));
}

// Grid: (ceil(B / kRows), min(T, 65535)); a block walks tasks blockIdx.y, blockIdx.y + gridDim.y, ...
template <typename E, Pass P>
__global__ void __launch_bounds__(kThreads, (blocks_per_sm<E, P>())) ntxent_kernel(const Params<E> p) {
  using Tiles = typename TilesOf<E>::type;
  using A = typename Tiles::A;
  using Smem = Shared<Tiles, E, P>;
  constexpr bool kWithV = Smem::kWithV, kWithOut = Smem::kWithOut;
  constexpr int kRows = Tiles::kRows, kCols = Tiles::kCols, kDepth = Tiles::kDepth, kLdE = Tiles::kLdE;
  constexpr int kPerRow = kThreads / kRows;  // threads that share a row in the elementwise step

  extern __shared__ __align__(128) unsigned char shared_bytes[];
  const Smem sm(shared_bytes);

  const int r = threadIdx.x / kPerRow, part = threadIdx.x % kPerRow;
  const int64_t batch = p.batch, dim = p.dim;
  const int64_t chunks = (dim + kDepth - 1) / kDepth;
  const bool resident = chunks == 1;  // the rows stay staged for the whole walk
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int64_t row = row0 + r;
  const bool row_ok = row < batch;
  const bool in = p.variant_in;
  auto chunk_width = [&](int64_t chunk) { return int(std::min<int64_t>(kDepth, dim - chunk * kDepth)); };
  auto padded = [](int width) { return (width + Tiles::kDepthStep - 1) / Tiles::kDepthStep * Tiles::kDepthStep; };

  for (int64_t t = blockIdx.y; t < p.tasks; t += gridDim.y) {
    const int64_t matrix = t * batch * dim;
    const E* u = p.u + matrix;
    const E* v = kWithV ? p.v + matrix : nullptr;
    const int64_t* labels = p.labels + t * batch;
    const int64_t label_r = row_ok ? labels[row] : -1;
    const A* stats = nullptr;
    const A* ab = nullptr;
    A lse_r = 0, second_r = 1, a_r = 0, b_r = 0;
    if constexpr (P != Pass::kForward) {
      stats = p.stats + t * 2 * batch;
      if (row_ok) {
        lse_r = stats[row];
        second_r = stats[batch + row];
      }
    }
    if constexpr (P == Pass::kDoubleGrad) {
      ab = p.ab + t * 2 * batch;
      if (row_ok) {
        a_r = ab[row];
        b_r = ab[batch + row];
      }
    }
    const A q_out_r = A(1) / second_r;  // "out": q_ij = 1 / |P(i)|

    auto stage_rows = [&](int64_t chunk) {
      const int width = chunk_width(chunk);
      stage<kRows, kLdE>(sm.rows[0], u, row0, batch, dim, chunk * kDepth, width, padded(width), p.vector_loads);
      if constexpr (kWithV)
        stage<kRows, kLdE>(sm.rows[1], v, row0, batch, dim, chunk * kDepth, width, padded(width), p.vector_loads);
    };
    auto stage_cols = [&](int64_t col0, int64_t chunk) {
      const int width = chunk_width(chunk);
      stage<kCols, kLdE>(sm.cols[0], u, col0, batch, dim, chunk * kDepth, width, padded(width), p.vector_loads);
      if constexpr (kWithV)
        stage<kCols, kLdE>(sm.cols[1], v, col0, batch, dim, chunk * kDepth, width, padded(width), p.vector_loads);
    };

    __syncthreads();  // the previous task's tiles are read
    if (resident) stage_rows(0);

    for (int64_t out_chunk = 0; out_chunk < (kWithOut ? chunks : 1); ++out_chunk) {
      OnlineLse<Tiles> all, pos;  // forward
      A pos_sum = 0, pos_count = 0, a_sum = 0, b_sum = 0;
      [[maybe_unused]] typename Tiles::Output out;
      if constexpr (kWithOut) out.zero();

      for (int64_t col0 = 0; col0 < batch; col0 += kCols) {
        __syncthreads();  // the previous tile is read
        if (threadIdx.x < kCols) {
          const int64_t col = col0 + threadIdx.x;
          const bool ok = col < batch;
          sm.col_label[threadIdx.x] = ok ? labels[col] : -1;
          if constexpr (P != Pass::kForward) {
            const A second = ok ? stats[batch + col] : A(1);
            sm.col_stat[0][threadIdx.x] = ok ? stats[col] : A(0);
            sm.col_stat[1][threadIdx.x] = in ? second : A(1) / second;
          }
          if constexpr (P == Pass::kDoubleGrad) {
            sm.col_stat[2][threadIdx.x] = ok ? ab[col] : A(0);
            sm.col_stat[3][threadIdx.x] = ok ? ab[batch + col] : A(0);
          }
        }

        // S (and sdot) of this tile, over the depth chunks
        typename Tiles::Scores s_acc;
        [[maybe_unused]] typename Tiles::Scores sdot_acc;
        s_acc.zero();
        if constexpr (kWithV) sdot_acc.zero();
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          if (chunk > 0) __syncthreads();
          if (!resident) stage_rows(chunk);
          stage_cols(col0, chunk);
          __syncthreads();
          const int depth = padded(chunk_width(chunk));
          s_acc.add(sm.rows[0], sm.cols[0], depth);
          if constexpr (kWithV) {
            sdot_acc.add(sm.rows[1], sm.cols[0], depth);
            sdot_acc.add(sm.rows[0], sm.cols[1], depth);
          }
        }
        s_acc.store(sm.score[0], p.inv_tau);
        if constexpr (kWithV) sdot_acc.store(sm.score[1], p.inv_tau);
        __syncthreads();

        // elementwise: row r, columns part, part + kPerRow, ...
        const A* s_row = sm.score[0] + r * Tiles::kLdS;
        const A* sdot_row = kWithV ? sm.score[1] + r * Tiles::kLdS : nullptr;
#pragma unroll 4
        for (int c = part; c < kCols; c += kPerRow) {
          const int64_t col = col0 + c;
          const bool valid = row_ok && col < batch && col != row;
          const bool positive = valid && sm.col_label[c] == label_r;
          const A s = s_row[c];
          if constexpr (P == Pass::kForward) {
            if (valid) all.add(s);
            if (positive) {
              pos_count += A(1);
              if (in) pos.add(s);
              else pos_sum += s;
            }
          } else if constexpr (P == Pass::kDoubleAB) {
            const A sdot = sdot_row[c];
            if (valid) a_sum += Tiles::exp_acc(s - lse_r) * sdot;
            if (positive) b_sum += (in ? Tiles::exp_acc(s - second_r) : q_out_r) * sdot;
          } else {
            const A p_ij = valid ? Tiles::exp_acc(s - lse_r) : A(0);
            const A p_ji = valid ? Tiles::exp_acc(s - sm.col_stat[0][c]) : A(0);
            A q_ij = 0, q_ji = 0;
            if (positive) {
              q_ij = in ? Tiles::exp_acc(s - second_r) : q_out_r;
              q_ji = in ? Tiles::exp_acc(s - sm.col_stat[1][c]) : sm.col_stat[1][c];
            }
            assign(sm.weight[0][r * Tiles::kLdW + c], (p_ij - q_ij + p_ji - q_ji) * p.weight_scale);
            if constexpr (P == Pass::kDoubleGrad) {
              const A sdot = sdot_row[c];
              A h = p_ij * (sdot - a_r) + p_ji * (sdot - sm.col_stat[2][c]);
              if (in) h -= q_ij * (sdot - b_r) + q_ji * (sdot - sm.col_stat[3][c]);
              assign(sm.weight[1][r * Tiles::kLdW + c], h * p.weight_scale);
            }
          }
        }

        // grad_u rows += weights . columns, for this chunk of d
        if constexpr (kWithOut) {
          __syncthreads();
          if (!resident && out_chunk != chunks - 1) {  // the columns staged last are chunk chunks - 1
            stage_cols(col0, out_chunk);
            __syncthreads();
          }
          const int width = chunk_width(out_chunk);
          if constexpr (P == Pass::kBackward) {
            out.add(sm.weight[0], sm.cols[0], width);
          } else {
            out.add(sm.weight[0], sm.cols[1], width);
            out.add(sm.weight[1], sm.cols[0], width);
          }
        }
      }

      if constexpr (P == Pass::kForward) {
        all.template merge_group<kPerRow>();
        pos.template merge_group<kPerRow>();
        pos_sum = group_sum<kPerRow>(pos_sum);
        pos_count = group_sum<kPerRow>(pos_count);
        if (part == 0 && row_ok) {
          const A lse_all = all.lse();
          const A second = in ? pos.lse() : pos_count;
          p.row_loss[t * batch + row] = lse_all - (in ? second : pos_sum / pos_count);
          p.stats_out[t * 2 * batch + row] = lse_all;
          p.stats_out[(t * 2 + 1) * batch + row] = second;
          if (label_r < 0 || label_r >= batch) atomicMin(p.label_errors, static_cast<long long>(t * batch + row));
          if (pos_count == A(0)) atomicMin(p.label_errors + 1, static_cast<long long>(t * batch + row));
        }
      } else if constexpr (P == Pass::kDoubleAB) {
        a_sum = group_sum<kPerRow>(a_sum);
        b_sum = group_sum<kPerRow>(b_sum);
        if (part == 0 && row_ok) {
          p.ab_out[t * 2 * batch + row] = a_sum;
          p.ab_out[(t * 2 + 1) * batch + row] = b_sum;
        }
      } else {
        const A scale = p.grad_task[t] * p.inv_tau / (A(batch) * p.weight_scale);
        out.store(sm.staging, p.grad_u + matrix, row0, batch, dim, out_chunk * kDepth, chunk_width(out_chunk), scale);
      }
    }
  }
}

// ---- launchers ----------------------------------------------------------------------------------

template <typename E, Pass P> cudaError_t launch(const Params<E>& params, cudaStream_t stream) {
  using Tiles = typename TilesOf<E>::type;
  constexpr size_t kBytes = Shared<Tiles, E, P>::kBytes;
  if (params.tasks == 0 || params.batch == 0) return cudaSuccess;
  const int64_t blocks = (params.batch + Tiles::kRows - 1) / Tiles::kRows;
  if (blocks > std::numeric_limits<int>::max()) return cudaErrorInvalidConfiguration;
  const auto kernel = &ntxent_kernel<E, P>;
  const cudaError_t attribute =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kBytes));
  if (attribute != cudaSuccess) return attribute;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(std::min<int64_t>(params.tasks, 65535)));
  kernel<<<grid, kThreads, kBytes, stream>>>(params);
  return cudaGetLastError();
}

template <typename T> struct Tag { using type = T; };

template <typename F> cudaError_t dispatch(ElementType type, F&& f) {
  switch (type) {
    case ElementType::kF32: return f(Tag<float>{});
    case ElementType::kF64: return f(Tag<double>{});
    case ElementType::kF16: return f(Tag<__half>{});
    case ElementType::kBF16: return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename E>
Params<E> common_params(const void* u, const void* v, const int64_t* labels, NTXentShape shape, double inv_tau,
                        bool variant_in) {
  Params<E> p;
  p.u = static_cast<const E*>(u);
  p.v = static_cast<const E*>(v);
  p.labels = labels;
  p.tasks = shape.tasks;
  p.batch = shape.batch;
  p.dim = shape.dim;
  p.inv_tau = static_cast<typename Params<E>::A>(inv_tau);
  p.variant_in = variant_in;
  p.vector_loads = sizeof(E) == 2 && shape.dim % 8 == 0 && aligned16(u) && (v == nullptr || aligned16(v));
  return p;
}

}  // namespace

cudaError_t ntxent_forward(ElementType type, const void* u, const int64_t* labels, NTXentShape shape,
                           double inv_tau, bool variant_in, void* row_loss, void* row_stats,
                           int64_t* label_errors, cudaStream_t stream) {
  return dispatch(type, [&](auto tag) {
    using E = typename decltype(tag)::type;
    using A = typename Acc<E>::type;
    Params<E> p = common_params<E>(u, nullptr, labels, shape, inv_tau, variant_in);
    p.row_loss = static_cast<A*>(row_loss);
    p.stats_out = static_cast<A*>(row_stats);
    p.label_errors = reinterpret_cast<long long*>(label_errors);
    return launch<E, Pass::kForward>(p, stream);
  });
}

cudaError_t ntxent_backward(ElementType type, const void* grad_task_loss, const void* u,
                            const int64_t* labels, const void* row_stats, NTXentShape shape,
                            double inv_tau, bool variant_in, void* grad_u, cudaStream_t stream) {
  return dispatch(type, [&](auto tag) {
    using E = typename decltype(tag)::type;
    using A = typename Acc<E>::type;
    Params<E> p = common_params<E>(u, nullptr, labels, shape, inv_tau, variant_in);
    p.grad_task = static_cast<const A*>(grad_task_loss);
    p.stats = static_cast<const A*>(row_stats);
    p.grad_u = static_cast<E*>(grad_u);
    // fp16: M_ij ~ 1/B falls below fp16's normal range at large B; |M_ij| <= 2, so scaling by a
    // power of two near sqrt(B) (at most 2^10) keeps it normal without overflow
    if constexpr (std::is_same_v<E, __half>) p.weight_scale = std::ldexp(1.0f, std::min(10, std::ilogb(double(shape.batch)) / 2));
    return launch<E, Pass::kBackward>(p, stream);
  });
}

cudaError_t ntxent_double_backward(ElementType type, const void* grad_grad_u, const void* grad_task_loss,
                                   const void* u, const int64_t* labels, const void* row_stats,
                                   NTXentShape shape, double inv_tau, bool variant_in, void* row_ab,
                                   void* grad_u, cudaStream_t stream) {
  return dispatch(type, [&](auto tag) {
    using E = typename decltype(tag)::type;
    using A = typename Acc<E>::type;
    Params<E> p = common_params<E>(u, grad_grad_u, labels, shape, inv_tau, variant_in);
    p.stats = static_cast<const A*>(row_stats);
    p.ab_out = static_cast<A*>(row_ab);
    const cudaError_t first = launch<E, Pass::kDoubleAB>(p, stream);
    if (first != cudaSuccess) return first;
    p.ab = static_cast<const A*>(row_ab);
    p.ab_out = nullptr;
    p.grad_task = static_cast<const A*>(grad_task_loss);
    p.grad_u = static_cast<E*>(grad_u);
    return launch<E, Pass::kDoubleGrad>(p, stream);
  });
}

}  // namespace bmssl::cuda
