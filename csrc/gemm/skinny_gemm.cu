// skinny_gemm: y = x @ W^T (+ bias) for M = 1..16 rows of x, the linear layers of a decode step.
//
// Bytes: W is N * K * s and is read exactly once; x (M * K * s) and y (M * N * s) are tiny, and
// x stays in L1/L2. FLOPs: 2 * M * N * K, M FLOPs per weight byte for s = 2: memory-bound for
// small M, the bar is the copy bandwidth. At M = 16 the float32 FMAs alone need ~48 TFLOP/s to
// keep pace with 3 TB/s, close to an H100's ~67, so expect less than copy bandwidth there.
//
// Three kernels. The register kernel below serves every M and the largest weights. The bulk-copy
// kernel further down (sm_90+, M <= 4, a weight that the SMs' shared-memory rings hold whole)
// streams the weight with the copy engine and, for a static weight, starts before x exists. The
// streaming kernel after it (M = 1, larger weights up to 256 MB) keeps persistent warps loading.
//
// Register kernel. Layout of the work: each warp owns kRows output rows and one slice of K. Lanes stride over K
// in 16-byte vectors (8 elements), so every row access of a warp is 512 contiguous bytes. Each
// iteration issues kLoadsInFlight = 8 independent 16-byte W loads per lane (kRows rows x kSteps
// vectors; 4 for M > 8 with 4 rows, see steps_per_iteration) before the FMAs that consume them:
// 4 KB in flight per warp. The host sizes the grid for at least kTargetWarpsPerSm = 8 warps per
// SM, 32 KB per SM, above what Little's law asks at ~3 TB/s and ~1 us of loaded DRAM latency
// (~23 KB per SM on 132 SMs).
//
// - W loads skip L1 (ld.global.nc.L1::no_allocate): each byte is used once and would only evict
//   x. x takes the read-only path and is re-read by every warp; one x vector serves kRows rows,
//   so x traffic (from L1/L2) is M / kRows times the weight traffic.
// - When N alone gives too few warps (few rows, long K: a down projection), the kWarps warps of
//   a CTA split K between them (k_splits = 1, 2 or 4, interleaved by 32 vectors) and their
//   partial sums meet in shared memory: no global split-K workspace, no second kernel.
// - Tail rows: a warp whose rows run past N reads the last row instead (in bounds, no extra
//   branch in the loop) and does not store it. Rows of x: kM is M rounded up to 1, 2, 4, 8 or
//   16, and rows past M are skipped by a warp-uniform branch.
// - Each output is the float32 dot product plus the bias, rounded once to the dtype, as in the
//   reference.
// - silu_and_mul prologue: the input vector is silu(gate) * up rounded to the dtype (the rounding
//   point of ember.ops.silu_and_mul), computed by every warp for the K vectors it reads. That is
//   2 SFU operations per element per warp, cheap for M = 1..2 (saving the separate kernel and its
//   launch is the point); for larger M the unfused pair may be faster.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/block_reduce.cuh"
#include "common/bulk_copy.cuh"
#include "common/common.h"
#include "common/pdl.cuh"
#include "common/vec.cuh"
#include "gemm/skinny_gemm.h"

namespace ember {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kElemsPerVec = 8;        // fp16/bf16 elements in a 16-byte vector
constexpr int kLoadsInFlight = 8;      // 16-byte W loads per lane per iteration
constexpr int kTargetWarpsPerSm = 8;   // times 4 KB in flight per warp = 32 KB per SM
constexpr int kMaxM = 16;

// Vectors per row per iteration: kLoadsInFlight W loads per lane, except for the 16 x 4 tile,
// whose 64 accumulators leave room for only 4 W vectors (and then 512 FMAs per lane per
// iteration cover the latency instead).
constexpr int steps_per_iteration(int m_tile, int rows) {
  return m_tile * rows >= 64 ? 1 : kLoadsInFlight / rows;
}

// A 16-byte W vector that is read once: non-coherent (W is constant during the kernel) and not
// allocated in L1, which keeps x's lines there. Volatile, so that loads of a static weight
// issued before wait_for_prior_grids() stay there.
__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p));
}

__device__ __forceinline__ float2 word_to_float2(uint32_t word, __half) {
  __half2 h;
  memcpy(&h, &word, sizeof(h));
  return __half22float2(h);
}

__device__ __forceinline__ float2 word_to_float2(uint32_t word, __nv_bfloat16) {
  __nv_bfloat162 h;
  memcpy(&h, &word, sizeof(h));
  return __bfloat1622float2(h);
}

// The 8 elements of T packed in a 16-byte vector, as floats.
template <typename T>
__device__ __forceinline__ void unpack(const uint4& v, float (&f)[kElemsPerVec]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = word_to_float2(words[i], T{});
    f[2 * i] = pair.x;
    f[2 * i + 1] = pair.y;
  }
}

// silu(g) = g / (1 + exp(-g)) in float32, the form of silu_and_mul's kernel and reference.
__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

// The GEMM input for K vector `vec` of one row of x: the row itself, or silu(gate) * up rounded
// to T when x holds [gate | up] (the up half starts k elements later).
template <typename T, bool kSilu>
__device__ __forceinline__ void load_input(const T* __restrict__ x_row, int vec, int64_t k,
                                           float (&f)[kElemsPerVec]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x_row) + vec);
  unpack<T>(raw, f);
  if constexpr (kSilu) {
    float up[kElemsPerVec];
    unpack<T>(__ldg(reinterpret_cast<const uint4*>(x_row + k) + vec), up);
#pragma unroll
    for (int j = 0; j < kElemsPerVec; ++j) f[j] = to_float(from_float<T>(silu(f[j]) * up[j]));
  }
}

// acc[m] += w . x_m over one 16-byte vector of each, for the rows of x that a kM tile holds
// (rows past m, which exist only in a tile rounded up, are skipped). x is staged in shared
// memory: x_vec points at row 0's vector, rows num_vecs vectors apart.
template <typename T, int kM>
__device__ __forceinline__ void accumulate_vector(const uint4& w_raw, const uint4* x_vec,
                                                  int num_vecs, int64_t m_rows,
                                                  float (&acc)[kM]) {
  constexpr int kMinM = kM / 2 + 1;  // rows of x that exist whenever this kM was chosen
  float wf[kElemsPerVec];
  unpack<T>(w_raw, wf);
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    if (m >= kMinM && m >= m_rows) break;
    float xf[kElemsPerVec];
    unpack<T>(x_vec[m * num_vecs], xf);
#pragma unroll
    for (int j = 0; j < kElemsPerVec; ++j) acc[m] = fmaf(wf[j], xf[j], acc[m]);
  }
}

template <typename T, int kM, int kRows, bool kSilu>
__global__ void __launch_bounds__(kThreads)
    skinny_gemm_kernel(const SkinnyGemmParams p, const int k_splits, const bool prefetch_first) {
  constexpr int kSteps = steps_per_iteration(kM, kRows);
  // Rows of x that exist whenever this kM was chosen (M is rounded up to the next kM).
  constexpr int kMinM = kM / 2 + 1;
  allow_dependent_launch();
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int slice = warp % k_splits;
  const int groups = kWarps / k_splits;  // warps owning different rows
  const int rows_per_cta = groups * kRows;
  const int64_t cta_row0 = int64_t{blockIdx.x} * rows_per_cta;
  const int64_t warp_row0 = cta_row0 + (warp / k_splits) * kRows;
  const int num_vecs = static_cast<int>(p.k / kElemsPerVec);
  const int vec_stride = k_splits * 32;

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.weight);
  const T* w_rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = warp_row0 + r < p.n ? warp_row0 + r : p.n - 1;
    w_rows[r] = w + row * p.k;
  }

  // A static weight's first iteration is requested into L2 before the wait, so that its DRAM
  // round trip overlaps the end of the kernel that produces x. Only when the whole grid is
  // resident from the start (prefetch_first): CTAs of later waves start after that kernel, and
  // their prefetches would only double the L2 requests (on the H100 a 16384 x 2048 weight took
  // 27.4 instead of 24.1 us with them).
  if (prefetch_first) {
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int vec = slice * 32 + lane + s * vec_stride;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (vec < num_vecs) prefetch_l2(w_rows[r] + int64_t{vec} * kElemsPerVec);
      }
    }
  }
  wait_for_prior_grids();  // x comes from the previous kernel

  float acc[kRows][kM] = {};
  for (int vec0 = slice * 32 + lane; vec0 < num_vecs; vec0 += kSteps * vec_stride) {
    // All loads of the iteration first, so that they are in flight together.
    uint4 w_raw[kSteps][kRows];
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int vec = vec0 + s * vec_stride;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        w_raw[s][r] = vec < num_vecs ? load_streaming(w_rows[r] + int64_t{vec} * kElemsPerVec)
                                     : make_uint4(0, 0, 0, 0);
      }
    }
    // Vectors past the end of K have W zero and x zero (its load is skipped): no branch around
    // the FMAs, so the compiler may issue the x loads of all steps early.
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int vec = vec0 + s * vec_stride;
      float wf[kRows][kElemsPerVec];
#pragma unroll
      for (int r = 0; r < kRows; ++r) unpack<T>(w_raw[s][r], wf[r]);
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        if (m >= kMinM && m >= p.m) break;
        float xf[kElemsPerVec] = {};
        if (s == 0 || vec < num_vecs) load_input<T, kSilu>(x + m * p.x_row_stride, vec, p.k, xf);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
#pragma unroll
          for (int j = 0; j < kElemsPerVec; ++j) acc[r][m] = fmaf(wf[r][j], xf[j], acc[r][m]);
        }
      }
    }
  }

  // Partial sums of the warps, [slice][m][row in CTA]; one lane stores each.
  __shared__ float partial[kWarps * kM * kRows];
  const int row_in_cta0 = (warp / k_splits) * kRows;
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    if (m >= kMinM && m >= p.m) break;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float sum = warp_reduce_sum(acc[r][m]);
      if (lane == (m * kRows + r) % 32) {
        partial[(slice * kM + m) * rows_per_cta + row_in_cta0 + r] = sum;
      }
    }
  }
  __syncthreads();

  // Consecutive threads write consecutive rows of y.
  T* y = static_cast<T*>(p.y);
  const T* bias = static_cast<const T*>(p.bias);
  for (int i = threadIdx.x; i < kM * rows_per_cta; i += kThreads) {
    const int m = i / rows_per_cta;
    const int row_in_cta = i % rows_per_cta;
    const int64_t row = cta_row0 + row_in_cta;
    if (m >= p.m || row >= p.n) continue;
    float sum = 0.f;
    for (int s = 0; s < k_splits; ++s) sum += partial[(s * kM + m) * rows_per_cta + row_in_cta];
    if (bias != nullptr) sum += to_float(bias[row]);
    y[m * p.n + row] = from_float<T>(sum);
  }
}

// Rows per warp and K splits per CTA. More rows per warp divide the x traffic (M / kRows per
// weight byte; 4 rows for M >= 4) but give fewer warps; while the grid has fewer than
// kTargetWarpsPerSm warps per SM, first split K (if every slice keeps at least one full
// iteration of loads), then take fewer rows per warp. With the silu prologue, 4 rows per warp
// at every M: each warp computes silu for the K vectors it reads, so the SFU work is the
// weight's rows / kRows times K (K split between a CTA's warps costs nothing extra). At M = 1
// that halves the 2 rows per warp of the plain GEMM, whose x needs no computing.
struct Config {
  int rows, k_splits;
};

Config choose_config(int m_tile, bool silu, int64_t n, int64_t num_vecs, int num_sms) {
  Config c{m_tile >= 4 || silu ? 4 : 2, 1};
  const int64_t target_warps = int64_t{num_sms} * kTargetWarpsPerSm;
  while ((n + c.rows - 1) / c.rows * c.k_splits < target_warps) {
    const int64_t steps = steps_per_iteration(m_tile, c.rows);
    if (c.k_splits < kWarps && num_vecs >= 2 * c.k_splits * 32 * steps) {
      c.k_splits *= 2;
    } else if (c.rows > 1) {
      c.rows /= 2;
    } else {
      break;
    }
  }
  return c;
}

template <typename T, int kM, int kRows, bool kSilu>
void launch(const SkinnyGemmParams& p, int k_splits, int num_sms, cudaStream_t stream) {
  const int64_t rows_per_cta = kWarps / k_splits * kRows;
  const unsigned blocks = grid_x((p.n + rows_per_cta - 1) / rows_per_cta, "skinny_gemm");
  // Taken as one wave: at most 2 x kTargetWarpsPerSm warps per SM (the 1B shape's QKV and down
  // projections; its gate/up and LM head, with 62 and ~490 warps per SM, are not).
  const bool prefetch_first =
      p.static_weight && blocks * int64_t{kWarps} <= int64_t{num_sms} * kTargetWarpsPerSm * 2;
  launch_with_pdl(skinny_gemm_kernel<T, kM, kRows, kSilu>, blocks, kThreads, 0, stream,
                  "skinny_gemm_kernel", p, k_splits, prefetch_first);
}

// ------------------------------------------------------------------------------------------
// The bulk-copy kernel (sm_90+, M <= 4): the weight streams through a shared-memory ring
// ------------------------------------------------------------------------------------------
//
// The register kernel above keeps 32 KB per SM in flight with ~8 load instructions per lane per
// iteration, and its many short warps pay their ramp-up and tail at every launch. Here one
// 256-thread CTA per SM owns a contiguous range of weight rows and one thread streams them in
// with the bulk copy engine, a few 16 KB tiles (rows_per_tile rows each) in flight at all times: a
// tile is one instruction, and the bytes in flight no longer cost registers. Each tile's rows
// are split between the warps (8 / rows warps per row, each a strided share of K), which read
// the weight and x from shared memory; the warps' partial sums meet in shared memory and the
// tile's outputs are written while the next tiles land.
//
// With `static_weight` (the caller promises that no earlier kernel writes the weight) the
// first tiles are requested before wait_for_prior_grids(): under programmatic dependent launch
// the weight is already arriving while the previous kernel (the norm or attention that produces
// x) still runs, and an O projection's whole weight can be in shared memory by the time x is.
constexpr int kBulkWarps = 8;
constexpr int kBulkThreads = kBulkWarps * 32;
constexpr int kBulkMaxM = 4;
constexpr int kBulkMaxStages = 8;
constexpr int64_t kBulkTileTarget = 16 * 1024;    // bytes per tile, rows permitting
constexpr int64_t kBulkRingTarget = 64 * 1024;    // bytes of tiles per CTA
constexpr int64_t kBulkMaxRowBytes = 48 * 1024;   // one row must fit in a tile
constexpr int64_t kBulkMaxInputBytes = 64 * 1024; // x staged in shared memory
constexpr int kBulkHeaderBytes = 512;  // barriers, then the double-buffered partial sums
// The most any plan takes: a ring is at most kBulkRingTarget or two slots of the longest row.
constexpr int kBulkMaxSmemBytes =
    kBulkHeaderBytes + kBulkMaxInputBytes +
    (kBulkRingTarget > 2 * (kBulkMaxRowBytes + 128) ? kBulkRingTarget
                                                    : 2 * (kBulkMaxRowBytes + 128));

struct BulkPlan {
  int rows_per_tile;  // 1, 2, 4 or 8: a divisor of kBulkWarps
  int stages;         // tiles in the ring
  int stage_bytes;    // rows_per_tile rows, rounded up to 128 bytes
  int input_bytes;    // kM rows of x, rounded up to 128 bytes
  int64_t num_tiles;
  int ctas;           // one per SM, or one per tile if fewer
  bool static_weight;
  int smem_bytes() const { return kBulkHeaderBytes + input_bytes + stages * stage_bytes; }
};

template <typename T, int kM, bool kSilu>
__global__ void __launch_bounds__(kBulkThreads, 1)
    skinny_gemm_bulk_kernel(const SkinnyGemmParams p, const BulkPlan plan) {
  constexpr int kMinM = kM / 2 + 1;  // rows of x that exist whenever this kM was chosen
  extern __shared__ __align__(128) unsigned char smem[];
  uint64_t* const full = reinterpret_cast<uint64_t*>(smem);  // [kBulkMaxStages]
  float* const partials = reinterpret_cast<float*>(smem + 128);  // [2][kBulkWarps][kM]
  T* const xs = reinterpret_cast<T*>(smem + kBulkHeaderBytes);   // [kM][k]
  unsigned char* const ring = smem + kBulkHeaderBytes + plan.input_bytes;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows_per_tile = plan.rows_per_tile, stages = plan.stages;
  const int64_t tile_begin = plan.num_tiles * blockIdx.x / gridDim.x;
  const int num_tiles =
      static_cast<int>(plan.num_tiles * (blockIdx.x + 1) / gridDim.x - tile_begin);
  const int64_t row_bytes = p.k * static_cast<int64_t>(sizeof(T));
  const int num_vecs = static_cast<int>(p.k / kElemsPerVec);

  // Tile t of this CTA into ring slot t % stages (thread 0 only).
  const uint64_t policy = l2_evict_first_policy();
  const auto request_tile = [&](int t) {
    const int64_t row0 = (tile_begin + t) * rows_per_tile;
    const int64_t rows = min(int64_t{rows_per_tile}, p.n - row0);
    bulk_copy_to_shared(shared_address(ring + (t % stages) * plan.stage_bytes),
                        static_cast<const unsigned char*>(p.weight) + row0 * row_bytes,
                        static_cast<uint32_t>(rows * row_bytes), shared_address(&full[t % stages]),
                        policy);
  };
  const int prologue_tiles = min(stages, num_tiles);

  allow_dependent_launch();
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) mbarrier_init(shared_address(&full[s]));
    fence_barrier_init();
    if (plan.static_weight) {
      for (int t = 0; t < prologue_tiles; ++t) request_tile(t);
    }
  }
  __syncthreads();  // the barriers are initialised
  wait_for_prior_grids();  // x (and a weight that is not static) may come from earlier kernels
  if (threadIdx.x == 0 && !plan.static_weight) {
    for (int t = 0; t < prologue_tiles; ++t) request_tile(t);
  }

  // x into shared memory, as the GEMM input (silu(gate) * up rounded to T when fused).
  const T* __restrict__ x = static_cast<const T*>(p.x);
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    if (m >= kMinM && m >= p.m) break;
    for (int v = threadIdx.x; v < num_vecs; v += kBulkThreads) {
      float f[kElemsPerVec];
      load_input<T, kSilu>(x + m * p.x_row_stride, v, p.k, f);
      Vec<T, kElemsPerVec> packed;
#pragma unroll
      for (int j = 0; j < kElemsPerVec; ++j) packed.v[j] = from_float<T>(f[j]);
      store_vec(xs + m * p.k + v * kElemsPerVec, packed);
    }
  }
  __syncthreads();

  const int warps_per_row = kBulkWarps / rows_per_tile;
  const int row_in_tile = warp / warps_per_row;
  const int slice = warp % warps_per_row;
  T* const y = static_cast<T*>(p.y);
  const T* const bias = static_cast<const T*>(p.bias);
  for (int t = 0; t < num_tiles; ++t) {
    const int slot = t % stages;
    const int64_t row0 = (tile_begin + t) * rows_per_tile;
    const int rows = static_cast<int>(min(int64_t{rows_per_tile}, p.n - row0));
    mbarrier_wait(shared_address(&full[slot]), (t / stages) & 1);

    float acc[kM] = {};
    if (row_in_tile < rows) {
      const uint4* w = reinterpret_cast<const uint4*>(ring + slot * plan.stage_bytes +
                                                      row_in_tile * row_bytes);
#pragma unroll 4
      for (int v = slice * 32 + lane; v < num_vecs; v += warps_per_row * 32) {
        accumulate_vector<T, kM>(w[v], reinterpret_cast<const uint4*>(xs) + v, num_vecs, p.m,
                                 acc);
      }
    }
    // Partials are double-buffered by tile parity: the block barrier below separates this
    // tile's writes from the reads of tile t - 2's.
    float* const part = partials + (t & 1) * kBulkWarps * kM;
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      if (m >= kMinM && m >= p.m) break;
      const float sum = warp_reduce_sum(acc[m]);
      if (lane == 0) part[warp * kM + m] = sum;
    }
    __syncthreads();  // the slot is consumed and the partial sums are in place
    if (threadIdx.x == 0 && t + stages < num_tiles) request_tile(t + stages);
    if (threadIdx.x < rows * kM) {
      const int r = threadIdx.x / kM, m = threadIdx.x % kM;
      if (m < p.m) {
        float sum = 0.f;
        for (int s = 0; s < warps_per_row; ++s) sum += part[(r * warps_per_row + s) * kM + m];
        if (bias != nullptr) sum += to_float(bias[row0 + r]);
        y[m * p.n + row0 + r] = from_float<T>(sum);
      }
    }
  }
}

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// The bulk kernel's plan, or rows_per_tile == 0 when the shape does not suit it.
BulkPlan choose_bulk_plan(int m_tile, int64_t n, int64_t k, int elem_bytes, int num_sms,
                          bool static_weight) {
  BulkPlan plan{};
  const int64_t row_bytes = k * elem_bytes;
  const int64_t input_bytes = round_up(m_tile * row_bytes, 128);
  // Larger weights stream at least as fast through the register kernel, whose many warps
  // balance across SMs on their own; this one pays off when its rings hold the whole weight,
  // which can then be read before x exists (on the H100, 1 row: 3.8 against 6.2 us for a
  // 2048 x 2048 bf16 weight, but 28 against 25 us for 16384 x 2048; skinny_gemm_probe).
  if (m_tile > kBulkMaxM || row_bytes > kBulkMaxRowBytes || input_bytes > kBulkMaxInputBytes ||
      n * row_bytes > num_sms * kBulkRingTarget || current_device_cc_major() < 9) {
    return plan;
  }
  // The most rows per tile that keep the tile near its target and still give every SM a tile.
  int rows = 8;
  while (rows > 1 && (rows * row_bytes > kBulkTileTarget || (n + rows - 1) / rows < num_sms)) {
    rows /= 2;
  }
  plan.rows_per_tile = rows;
  plan.stage_bytes = static_cast<int>(round_up(rows * row_bytes, 128));
  plan.num_tiles = (n + rows - 1) / rows;
  plan.ctas = static_cast<int>(std::min<int64_t>(plan.num_tiles, num_sms));
  const int64_t tiles_per_cta = (plan.num_tiles + plan.ctas - 1) / plan.ctas;
  // At least two slots so that a tile lands while another is read; no more than a CTA's tiles.
  plan.stages = static_cast<int>(std::clamp<int64_t>(
      std::min(kBulkRingTarget / plan.stage_bytes, tiles_per_cta), 2, kBulkMaxStages));
  plan.input_bytes = static_cast<int>(input_bytes);
  plan.static_weight = static_weight;
  return plan;
}

template <typename T, int kM, bool kSilu>
void launch_bulk(const SkinnyGemmParams& p, const BulkPlan& plan, cudaStream_t stream) {
  // Opt in to what any plan can use, so that this happens once per device.
  opt_in_dynamic_smem<skinny_gemm_bulk_kernel<T, kM, kSilu>>(kBulkMaxSmemBytes,
                                                             [] { return "skinny_gemm"; });
  launch_with_pdl(skinny_gemm_bulk_kernel<T, kM, kSilu>, plan.ctas, kBulkThreads,
                  plan.smem_bytes(), stream, "skinny_gemm_bulk_kernel", p, plan);
}

// ------------------------------------------------------------------------------------------
// The streaming kernel (M = 1): persistent warps, each with its next loads always in flight
// ------------------------------------------------------------------------------------------
//
// For weights past the bulk kernel's rings, up to kStreamMaxWeightBytes. The register kernel's
// warps live for a few iterations each (the 1B gate/up projection: 2 iterations of 4 KB), so
// every warp pays a load round trip with nothing else in flight, and every CTA a launch. Here
// kStreamCtasPerSm CTAs an SM stay for the whole weight. CTA b owns the contiguous rows
// [n * b / G, n * (b + 1) / G); each row is cut into chunks of kStreamVecs vectors per lane
// (4 KB, lane-interleaved, so each load instruction of a warp reads 512 contiguous bytes), and
// the CTA's warps take its chunks round-robin, so the CTA walks its rows front to back. Each
// warp holds two chunks in registers and reloads one while it computes the other, so a load is
// always in flight; with a static weight both are requested before the PDL wait. x (for the
// silu prologue, silu(gate) * up rounded to T) is staged once per CTA in shared memory, where
// every warp reads it; a chunk's dot product is folded across the warp and added to its row's
// float32 sum in shared memory, and the CTA writes its rows at the end.
//
// H100, M = 1, bf16, graph-timed back to back (throwaway lab, session 22), us against the
// register kernel: 1B QKV 5.53 / 6.47, gate/up 24.06 / 24.49 (a plain read of the same bytes:
// 23.48), down with silu 13.68 / 15.99 (read 12.92), 8B gate/up 79.5 / 80.5. It lost on the
// 1B LM head (525 MB: 174.2 against 169.5), where the register kernel's many short CTAs, placed
// by the hardware as SMs free up, balance better than a fixed split: hence the weight bound.
// And at M = 4 it lost to the register kernel (bench/skinny_gemm_probe.py, static weights, two
// H100s of one session: gate/up 32.3 against 27.3 us, down with silu 25.1 against 20.8, QKV 9.5
// against 8.0): each chunk's FMAs and x reads grow with M while one chunk is in flight; hence
// M = 1 only.
constexpr int kStreamWarps = 8;
constexpr int kStreamThreads = kStreamWarps * 32;
constexpr int kStreamCtasPerSm = 2;
constexpr int kStreamVecs = 8;  // 16-byte W vectors per lane per chunk: 4 KB a warp
constexpr int kStreamChunkVecs = kStreamVecs * 32;
constexpr int kStreamMaxM = 1;
constexpr int64_t kStreamMaxWeightBytes = int64_t{256} << 20;
constexpr int64_t kStreamMaxInputBytes = 64 * 1024;  // x staged in shared memory
constexpr int64_t kStreamMaxSumBytes = 16 * 1024;    // a CTA's row sums

struct StreamPlan {
  int ctas;            // 0: the shape does not suit the streaming kernel
  int chunks_per_row;
  int smem_bytes;      // staged x, then the row sums
};

template <typename T, int kM, bool kSilu>
__global__ void __launch_bounds__(kStreamThreads, kStreamCtasPerSm)
    skinny_gemm_stream_kernel(const SkinnyGemmParams p, const int chunks_per_row) {
  constexpr int kMinM = kM / 2 + 1;  // rows of x that exist whenever this kM was chosen
  extern __shared__ __align__(128) unsigned char smem[];
  const int num_vecs = static_cast<int>(p.k / kElemsPerVec);
  uint4* const xs = reinterpret_cast<uint4*>(smem);  // [kM][num_vecs]
  float* const sums = reinterpret_cast<float*>(smem + int64_t{kM} * num_vecs * 16);  // [rows][kM]

  allow_dependent_launch();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row_begin = p.n * blockIdx.x / gridDim.x;
  const int rows = static_cast<int>(p.n * (blockIdx.x + 1) / gridDim.x - row_begin);
  const int chunks = rows * chunks_per_row;
  const T* const w = static_cast<const T*>(p.weight) + row_begin * p.k;

  // Chunk c: row c / chunks_per_row, vectors from (c % chunks_per_row) * kStreamChunkVecs;
  // those past K load as zeros (and are skipped by consume).
  const auto load_chunk = [&](uint4(&buf)[kStreamVecs], int c) {
    const T* const row = w + int64_t{c / chunks_per_row} * p.k;
    const int vec0 = (c % chunks_per_row) * kStreamChunkVecs + lane;
#pragma unroll
    for (int i = 0; i < kStreamVecs; ++i) {
      const int vec = vec0 + i * 32;
      buf[i] = vec < num_vecs ? load_streaming(row + int64_t{vec} * kElemsPerVec)
                              : make_uint4(0, 0, 0, 0);
    }
  };
  const auto consume = [&](const uint4(&buf)[kStreamVecs], int c) {
    const int vec0 = (c % chunks_per_row) * kStreamChunkVecs + lane;
    float acc[kM] = {};
#pragma unroll
    for (int i = 0; i < kStreamVecs; ++i) {
      const int vec = vec0 + i * 32;
      if (vec >= num_vecs) break;
      accumulate_vector<T, kM>(buf[i], xs + vec, num_vecs, p.m, acc);
    }
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      if (m >= kMinM && m >= p.m) break;
      const float sum = warp_reduce_sum(acc[m]);
      if (lane == 0) atomicAdd(&sums[(c / chunks_per_row) * kM + m], sum);
    }
  };

  uint4 a[kStreamVecs], b[kStreamVecs];
  const int first = warp, second = warp + kStreamWarps;
  if (p.static_weight) {
    if (first < chunks) load_chunk(a, first);
    if (second < chunks) load_chunk(b, second);
  }
  wait_for_prior_grids();  // x (and a weight that is not static) may come from earlier kernels
  if (!p.static_weight) {
    if (first < chunks) load_chunk(a, first);
    if (second < chunks) load_chunk(b, second);
  }
  const T* __restrict__ x = static_cast<const T*>(p.x);
  for (int i = threadIdx.x; i < kM * num_vecs; i += kStreamThreads) {
    const int m = i / num_vecs, vec = i % num_vecs;
    if (m >= p.m) break;
    float f[kElemsPerVec];
    load_input<T, kSilu>(x + m * p.x_row_stride, vec, p.k, f);
    Vec<T, kElemsPerVec> packed;
#pragma unroll
    for (int j = 0; j < kElemsPerVec; ++j) packed.v[j] = from_float<T>(f[j]);
    store_vec(reinterpret_cast<T*>(xs + m * num_vecs + vec), packed);
  }
  for (int i = threadIdx.x; i < rows * kM; i += kStreamThreads) sums[i] = 0.f;
  __syncthreads();

  // Buffer a holds chunks first, first + 2W, ...; b holds second, second + 2W, ...: each is
  // reloaded right after it is consumed, while the other's loads are in flight.
  for (int c = first; c < chunks; c += 2 * kStreamWarps) {
    consume(a, c);
    if (c + 2 * kStreamWarps < chunks) load_chunk(a, c + 2 * kStreamWarps);
    if (c + kStreamWarps >= chunks) break;
    consume(b, c + kStreamWarps);
    if (c + 3 * kStreamWarps < chunks) load_chunk(b, c + 3 * kStreamWarps);
  }
  __syncthreads();

  T* const y = static_cast<T*>(p.y);
  const T* const bias = static_cast<const T*>(p.bias);
  for (int i = threadIdx.x; i < rows * kM; i += kStreamThreads) {
    const int r = i / kM, m = i % kM;
    if (m >= p.m) continue;
    float sum = sums[i];
    if (bias != nullptr) sum += to_float(bias[row_begin + r]);
    y[m * p.n + row_begin + r] = from_float<T>(sum);
  }
}

// The streaming kernel's plan, or ctas == 0 when the shape does not suit it: rows shorter than
// half a chunk (lanes would idle), an x too large to stage, or a weight past the bound.
StreamPlan choose_stream_plan(int m_tile, int64_t n, int64_t k, int elem_bytes, int num_sms) {
  StreamPlan plan{};
  const int64_t num_vecs = k / kElemsPerVec;
  const int64_t ctas = std::min<int64_t>(int64_t{kStreamCtasPerSm} * num_sms, n);
  const int64_t input_bytes = m_tile * k * elem_bytes;
  const int64_t sum_bytes = (n + ctas - 1) / ctas * m_tile * 4;
  if (m_tile > kStreamMaxM || 2 * num_vecs < kStreamChunkVecs ||
      input_bytes > kStreamMaxInputBytes || sum_bytes > kStreamMaxSumBytes ||
      n * k * elem_bytes > kStreamMaxWeightBytes) {
    return plan;
  }
  plan.ctas = static_cast<int>(ctas);
  plan.chunks_per_row = static_cast<int>((num_vecs + kStreamChunkVecs - 1) / kStreamChunkVecs);
  plan.smem_bytes = static_cast<int>(input_bytes + sum_bytes);
  return plan;
}

template <typename T, int kM, bool kSilu>
void launch_stream(const SkinnyGemmParams& p, const StreamPlan& plan, cudaStream_t stream) {
  opt_in_dynamic_smem<skinny_gemm_stream_kernel<T, kM, kSilu>>(
      static_cast<int>(kStreamMaxInputBytes + kStreamMaxSumBytes), [] { return "skinny_gemm"; });
  launch_with_pdl(skinny_gemm_stream_kernel<T, kM, kSilu>, plan.ctas, kStreamThreads,
                  plan.smem_bytes, stream, "skinny_gemm_stream_kernel", p, plan.chunks_per_row);
}

// Calls f(std::integral_constant<int, kM>{}) for the smallest instantiated kM >= m.
template <typename F>
void dispatch_m(int64_t m, F&& f) {
  if (m <= 1) {
    f(std::integral_constant<int, 1>{});
  } else if (m <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (m <= 4) {
    f(std::integral_constant<int, 4>{});
  } else if (m <= 8) {
    f(std::integral_constant<int, 8>{});
  } else {
    f(std::integral_constant<int, 16>{});
  }
}

template <typename T>
void launch_skinny_gemm(const SkinnyGemmParams& p, int num_sms, cudaStream_t stream) {
  if (!rows_16b_aligned<T>(p.x, {{p.m, p.x_row_stride}}) ||
      reinterpret_cast<std::uintptr_t>(p.weight) % 16 != 0) {
    throw std::invalid_argument(
        "ember: skinny_gemm: x's rows and the weight must start on 16-byte boundaries");
  }
  dispatch_m(p.m, [&](auto m_const) {
    constexpr int kM = decltype(m_const)::value;
    dispatch_bool(p.silu_and_mul, [&](auto silu) {
      constexpr bool kSilu = decltype(silu)::value;
      if constexpr (kM <= kBulkMaxM) {
        const BulkPlan plan =
            choose_bulk_plan(kM, p.n, p.k, sizeof(T), num_sms, p.static_weight);
        if (plan.rows_per_tile != 0) {
          launch_bulk<T, kM, kSilu>(p, plan, stream);
          return;
        }
      }
      if constexpr (kM <= kStreamMaxM) {
        const StreamPlan plan = choose_stream_plan(kM, p.n, p.k, sizeof(T), num_sms);
        if (plan.ctas != 0) {
          launch_stream<T, kM, kSilu>(p, plan, stream);
          return;
        }
      }
      const Config c = choose_config(kM, kSilu, p.n, p.k / kElemsPerVec, num_sms);
      switch (c.rows) {
        case 1:
          launch<T, kM, 1, kSilu>(p, c.k_splits, num_sms, stream);
          break;
        case 2:
          launch<T, kM, 2, kSilu>(p, c.k_splits, num_sms, stream);
          break;
        default:
          launch<T, kM, 4, kSilu>(p, c.k_splits, num_sms, stream);
      }
    });
  });
}

}  // namespace

void skinny_gemm(const SkinnyGemmParams& p, int num_sms, int dtype, std::intptr_t stream) {
  if (p.m < 1 || p.m > kMaxM) {
    throw std::invalid_argument("ember: skinny_gemm: m must be in [1, " + std::to_string(kMaxM) +
                                "], got " + std::to_string(p.m));
  }
  // Vector indices are ints, and the loop steps past the last one by up to 1024.
  if (p.k <= 0 || p.k % kElemsPerVec != 0 || p.k >= (int64_t{1} << 31)) {
    throw std::invalid_argument("ember: skinny_gemm: k must be a positive multiple of 8 below "
                                "2^31, got " + std::to_string(p.k));
  }
  if (num_sms < 1) {
    throw std::invalid_argument("ember: skinny_gemm: num_sms must be positive");
  }
  if (p.n == 0) return;
  EMBER_DISPATCH_HALF_TYPES(dtype, "skinny_gemm",
                            [&] { launch_skinny_gemm<scalar_t>(p, num_sms, as_stream(stream)); });
}

}  // namespace ember
