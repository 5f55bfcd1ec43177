// FlashAttention-2 forward kernel (fp16/bf16, sm_80 and later; mma.sync tensor cores).
//
// Work and traffic, for batch b, heads hq (hkv for K/V), lengths sq and sk, head dim d:
//   FLOPs  = 4 * b * hq * sq * sk * d   (S = QK^T and O = PV, 2 FLOPs per multiply-add), about
//            half of that with a causal mask when sq == sk; plus b * hq * sq * sk exponentials.
//   Bytes  = 2 * (2 * b * sq * hq * d + 2 * b * sk * hkv * d) + 4 * b * hq * sq
//            (q read and out written once, K and V read once, the float32 LSE written once;
//            K/V are re-read once per Q tile, but those re-reads hit L2).
//   With sq = sk = s and hq = hkv that is s / 2 FLOPs per byte: compute-bound from s ~ 1k on
//   an H100 (ridge ~330 FLOP/B), so the bar is tensor-core throughput (mma.sync) and the
//   shared-memory bandwidth that feeds it.
//
// Algorithm (one CTA per (Q tile of kBlockM rows, query head, sequence)):
//   * Each warp owns kBlockM / kWarps consecutive Q rows (16 per m16n8k16 tile). The Q tile is
//     copied to shared memory once; its MMA fragments are then read with ldmatrix, either once
//     into registers (kQInRegs, when the register budget allows) or per K tile.
//   * K/V tiles of kBlockN rows stream through two shared-memory stages with 16-byte
//     cp.async.cg: the copy of tile j+1 is issued before tile j is computed, and one
//     __syncthreads per tile both publishes tile j and retires tile j-1's stage.
//   * S = Q K^T and O += P V with mma.sync m16n8k16 (f32 accumulate). B operands come from
//     ldmatrix.x4 (V with .trans). The f32 accumulator layout of S is the A-fragment layout
//     of the next MMA, so P is rounded to 16 bits in registers and fed straight into P V.
//   * Online softmax in base 2 with the scale folded into one FFMA per score; the running row
//     max is reduced over the 4 lanes of a quad with shuffles, the row sum stays per-lane until
//     the end, O is rescaled only on tiles where some row max of the warp moved, and O is
//     divided by the row sum once, in the epilogue.
//   * Registers: with 32 Q rows per warp the O accumulator alone is d floats per thread, so the
//     tile shapes (flash_fwd_hdim*.cu) are chosen to fit 255 registers with no spill; see
//     the ptxas report (-Xptxas -v).
//   * Masks: from the causal/window bounds the CTA computes the first and last K tiles any of
//     its rows can see and loops over only those (last tile first); per-element masks run only
//     on tiles that straddle a bound or the sequence end (the kMask instantiation).
//   * Shared-memory tiles are stored in column blocks of 128 bytes (64 bytes for d = 96) with
//     the 16-byte chunk index XORed by the row, so the 8 rows an ldmatrix phase reads, and the
//     8 chunks a cp.async or epilogue phase writes, fall in distinct banks (for d = 96 some
//     cp.async phases span two 64-byte blocks and see 2-way conflicts; reads stay free).
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention/flash_fwd.h"
#include "common/common.h"

namespace ember {
namespace flash {

// ------------------------------------------------------------------------------------------
// Tile configuration
// ------------------------------------------------------------------------------------------

template <typename T_, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_, bool kQInRegs_>
struct FwdConfig {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarps = kWarps_;
  static constexpr bool kQInRegs = kQInRegs_;

  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBlockM / kWarps;
  static constexpr int kMTiles = kWarpRows / 16;   // m16 tiles per warp
  static constexpr int kNTiles = kBlockN / 8;      // n8 tiles of S per warp
  static constexpr int kDTiles = kHeadDim / 8;     // n8 tiles of O per warp
  static constexpr int kChunks = kHeadDim / 8;     // 16-byte chunks per row
  // Swizzled column blocks: 8 chunks (128 B, all 32 banks) when d is a multiple of 64, else 4.
  static constexpr int kBlockChunks = kHeadDim % 64 == 0 ? 8 : 4;
  static constexpr int kRowBytes = kBlockChunks * 16;  // one row of one column block
  // Row r XORs its chunk index with (r & 7) >> kSwizzleShift: with 4-chunk blocks two rows share
  // a 128-byte line, so the row pair, not the row, selects the XOR pattern.
  static constexpr int kSwizzleShift = kBlockChunks == 8 ? 0 : 1;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
  static constexpr int kStageBytes = 2 * kKVBytes;      // K tile then V tile
  static constexpr int kSmemBytes = kQBytes + 2 * kStageBytes;
  // 4-warp CTAs: 2 per SM caps registers at 255 per thread; 8-warp CTAs get 255 with 1.
  static constexpr int kMinBlocks = kWarps == 4 ? 2 : 1;

  static_assert(sizeof(T) == 2, "fp16/bf16 only");
  static_assert(kWarpRows % 16 == 0 && kBlockN % 16 == 0 && kHeadDim % 16 == 0, "tile shape");
  static_assert(kChunks % kBlockChunks == 0, "head_dim must fill whole column blocks");
  static_assert(kBlockM * kChunks % kThreads == 0 && kBlockN * kChunks % kThreads == 0,
                "tile copies must split evenly over the threads");
};

// ------------------------------------------------------------------------------------------
// PTX wrappers
// ------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; with valid == false the source size is 0: nothing is read (the
// address may lie past the tensor's end) and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

// 4-byte global->shared copy (cached in L1: .cg takes only 16 bytes).
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D += A * B for one m16n8k16 tile: A row-major 16x16 (4 regs), B column-major 16x8 (2 regs),
// D 16x8 f32 (4 regs).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to one 32-bit register of 16-bit values; `lo` in the low half, which is
// the lower column index in every mma fragment.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// ------------------------------------------------------------------------------------------
// Swizzled shared-memory tiles
// ------------------------------------------------------------------------------------------

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of kRows rows.
template <class Cfg, int kRows>
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk) {
  constexpr int kBC = Cfg::kBlockChunks;
  const int swizzled = (chunk % kBC) ^ ((row & 7) >> Cfg::kSwizzleShift);
  return ((chunk / kBC) * kRows + row) * Cfg::kRowBytes + swizzled * 16;
}

// Copies rows [0, rows_valid) of a kRows x head_dim tile into shared memory and zero-fills the
// rest (so sequence ends need no other special case: zero K rows are masked, zero V rows add 0).
template <class Cfg, int kRows>
__device__ __forceinline__ void load_tile(uint32_t dst, const typename Cfg::T* src,
                                          int64_t row_stride, int rows_valid) {
  using T = typename Cfg::T;
  constexpr int kChunks = Cfg::kChunks;
  constexpr int kPerThread = kRows * kChunks / Cfg::kThreads;
  // The thread index is re-read here (volatile, so ptxas cannot hoist it): otherwise the
  // per-thread copy addresses are computed once and kept live across the K loop, which costs
  // more registers than the MMA loop has to spare and makes ptxas spill.
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(tid));
  if constexpr (Cfg::kThreads % kChunks == 0 && (Cfg::kThreads / kChunks) % 8 == 0) {
    // Each pass covers a whole number of 8-row swizzle periods, so a thread's chunk keeps its
    // swizzled column and the shared-memory address advances by a constant.
    constexpr int kRowStep = Cfg::kThreads / kChunks;
    const int row = tid / kChunks;
    const int chunk = tid % kChunks;
    const uint32_t s = dst + tile_offset<Cfg, kRows>(row, chunk);
    const T* g = src + row * row_stride + chunk * 8;
    const int64_t g_step = kRowStep * row_stride;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const bool valid = row + i * kRowStep < rows_valid;
      cp_async_16(s + i * kRowStep * Cfg::kRowBytes, g + i * g_step, valid);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int idx = i * Cfg::kThreads + tid;
      const int row = idx / kChunks;
      const int chunk = idx % kChunks;
      const bool valid = row < rows_valid;
      cp_async_16(dst + tile_offset<Cfg, kRows>(row, chunk), src + row * row_stride + chunk * 8,
                  valid);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Per-lane fragment coordinates (m16n8k16, PTX ISA "Matrix Fragments for mma.m16n8k16")
// ------------------------------------------------------------------------------------------
// Accumulator element e of an n8 tile belongs to row (lane >> 2) + 8 * (e >> 1) and column
// 2 * (lane & 3) + (e & 1). ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i,
// whose 8x8 block lands in the i-th output register.
// Every ldmatrix.x4 here reads four 8x8 blocks of a 16-row, 2-chunk region whose first row is
// a multiple of 16 and whose first chunk is even:
//   Q as A:          a0..a3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
//                    (rows 8-15, k 8-15): the lane's row is (lane & 7) + 8 * bit 3, chunk bit 4;
//   V as B of PV (.trans): b0, b1 of d 0-7, then b0, b1 of d 8-15 = (keys 0-7, d 0-7),
//                    (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15): same pattern;
//   K as B of QK^T:  b0, b1 of keys 0-7, then b0, b1 of keys 8-15 = (keys 0-7, k 0-7),
//                    (keys 0-7, k 8-15), (keys 8-15, k 0-7), (keys 8-15, k 8-15): row from bit 4,
//                    chunk from bit 3. (Each mma then takes two adjacent registers as b0, b1.)
// Rows start at multiples of 8, so the swizzled chunk depends only on the lane and on
// (2 * pair) % kBlockChunks; precomputing those kBlockChunks / 2 byte offsets per pattern
// leaves the rest of every ldmatrix address an immediate.
template <class Cfg>
struct LaneOffsets {
  uint32_t qv[Cfg::kBlockChunks / 2];  // Q and V pattern
  uint32_t k[Cfg::kBlockChunks / 2];   // K pattern
};

template <class Cfg>
__device__ __forceinline__ LaneOffsets<Cfg> lane_offsets(int lane) {
  const int bit3 = (lane >> 3) & 1, bit4 = lane >> 4;
  const int swz = (lane & 7) >> Cfg::kSwizzleShift;
  LaneOffsets<Cfg> l;
#pragma unroll
  for (int j = 0; j < Cfg::kBlockChunks / 2; ++j) {
    l.qv[j] = ((lane & 7) + 8 * bit3) * Cfg::kRowBytes + (((2 * j) ^ bit4 ^ swz) << 4);
    l.k[j] = ((lane & 7) + 8 * bit4) * Cfg::kRowBytes + (((2 * j) ^ bit3 ^ swz) << 4);
  }
  return l;
}

// ldmatrix address in a tile of kRows rows: rows 16 * row16 + the lane's row, chunk pair `pair`,
// with the lane's offsets `lane_off` (LaneOffsets::qv or ::k).
template <class Cfg, int kRows>
__device__ __forceinline__ uint32_t frag_addr(uint32_t tile,
                                              const uint32_t (&lane_off)[Cfg::kBlockChunks / 2],
                                              int row16, int pair) {
  constexpr int kBC = Cfg::kBlockChunks;
  const int chunk = 2 * pair;
  return tile + lane_off[(chunk % kBC) / 2] +
         ((chunk / kBC) * kRows + 16 * row16) * Cfg::kRowBytes;
}

// Visibility bounds of one CTA: key j is visible to query row i iff
// i + diag - window_left <= j (when window_left >= 0), j <= i + diag + window_right (when
// window_right >= 0), and j < seqlen_k.
struct MaskBounds {
  int seqlen_k, diag, window_left, window_right;
};

// ------------------------------------------------------------------------------------------
// One K/V tile: S = Q K^T, mask, online softmax, O += P V
// ------------------------------------------------------------------------------------------

// Q fragments held in registers (kQInRegs), or a 1-element placeholder when Q is read from
// shared memory per tile.
template <class Cfg>
using QFrag = uint32_t[Cfg::kQInRegs ? Cfg::kMTiles : 1][Cfg::kQInRegs ? Cfg::kHeadDim / 16 : 1][4];

// row0: the lane's first query row (of m-tile 0); col0: its first key column in this tile.
template <class Cfg, bool kMask>
__device__ __forceinline__ void attend_tile(float (&acc_o)[Cfg::kMTiles][Cfg::kDTiles][4],
                                            float (&row_max)[Cfg::kMTiles][2],
                                            float (&row_sum)[Cfg::kMTiles][2],
                                            const QFrag<Cfg>& q_frag, uint32_t s_q_warp,
                                            uint32_t s_k, uint32_t s_v, const LaneOffsets<Cfg>& lo,
                                            const MaskBounds& mb, int row0, int col0,
                                            float scale_log2) {
  using T = typename Cfg::T;
  constexpr int kMT = Cfg::kMTiles, kNT = Cfg::kNTiles;

  // ---- S = Q K^T (raw scores; the scale is applied inside the exponent) ----
  // Zero-initialised S: ptxas folds the zeros into the first k-step's MMAs (RZ accumulator).
  float s[kMT][kNT][4];
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
    for (int nj = 0; nj < kNT; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mi][nj][e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < Cfg::kHeadDim / 16; ++ks) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
      if constexpr (Cfg::kQInRegs) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[mi][e] = q_frag[mi][ks][e];
      } else {
        ldmatrix_x4(a[mi], frag_addr<Cfg, Cfg::kBlockM>(s_q_warp, lo.qv, mi, ks));
      }
    }
#pragma unroll
    for (int nj = 0; nj < kNT / 2; ++nj) {
      uint32_t b[4];
      ldmatrix_x4(b, frag_addr<Cfg, Cfg::kBlockN>(s_k, lo.k, nj, ks));
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
        mma_16816<T>(s[mi][2 * nj], a[mi], b[0], b[1]);
        mma_16816<T>(s[mi][2 * nj + 1], a[mi], b[2], b[3]);
      }
    }
  }

  // ---- element mask, only on tiles that straddle a bound ----
  if constexpr (kMask) {
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = row0 + mi * 16 + 8 * r;
        const int hi = mb.window_right >= 0 ? min(mb.seqlen_k, i + mb.diag + mb.window_right + 1)
                                            : mb.seqlen_k;
        const int lo = mb.window_left >= 0 ? i + mb.diag - mb.window_left : 0;
#pragma unroll
        for (int nj = 0; nj < kNT; ++nj) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int j = col0 + nj * 8 + c;
            if (j < lo || j >= hi) s[mi][nj][2 * r + c] = -INFINITY;
          }
        }
      }
    }
  }

  // ---- online softmax (base 2); P overwrites S ----
  float correction[kMT][2];
  bool max_moved = false;
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m = row_max[mi][r];
#pragma unroll
      for (int nj = 0; nj < kNT; ++nj) {
        m = fmaxf(m, fmaxf(s[mi][nj][2 * r], s[mi][nj][2 * r + 1]));
      }
      // The 4 lanes of a quad hold the same row.
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      // A row with no visible key yet keeps max -inf; subtracting 0 instead keeps exp2 at 0
      // rather than NaN from (-inf) - (-inf).
      const float m_scaled = m == -INFINITY ? 0.f : m * scale_log2;
      correction[mi][r] = exp2f(row_max[mi][r] * scale_log2 - m_scaled);
      max_moved |= m != row_max[mi][r];
      row_max[mi][r] = m;
      float sum = 0.f;
#pragma unroll
      for (int nj = 0; nj < kNT; ++nj) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float pv = exp2f(fmaf(s[mi][nj][2 * r + c], scale_log2, -m_scaled));
          s[mi][nj][2 * r + c] = pv;
          sum += pv;
        }
      }
      // Per-lane partial sums: the quad shares the max, so they add up correctly at the end.
      row_sum[mi][r] = row_sum[mi][r] * correction[mi][r] + sum;
    }
  }
  // Rescale O only when some row max of the warp moved: past the first tiles it rarely does,
  // and an unmoved max means a correction of exactly 1. (A row still at -inf has O = 0.)
  if (__any_sync(0xffffffffu, max_moved)) {
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
      for (int dn = 0; dn < Cfg::kDTiles; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[mi][dn][e] *= correction[mi][e >> 1];
  }

  // ---- O += P V; the S accumulators of key tiles 2ks and 2ks+1 are exactly the A fragment ----
#pragma unroll
  for (int ks = 0; ks < Cfg::kBlockN / 16; ++ks) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
      a[mi][0] = pack2<T>(s[mi][2 * ks][0], s[mi][2 * ks][1]);
      a[mi][1] = pack2<T>(s[mi][2 * ks][2], s[mi][2 * ks][3]);
      a[mi][2] = pack2<T>(s[mi][2 * ks + 1][0], s[mi][2 * ks + 1][1]);
      a[mi][3] = pack2<T>(s[mi][2 * ks + 1][2], s[mi][2 * ks + 1][3]);
    }
#pragma unroll
    for (int dn = 0; dn < Cfg::kDTiles / 2; ++dn) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, frag_addr<Cfg, Cfg::kBlockN>(s_v, lo.qv, ks, dn));
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
        mma_16816<T>(acc_o[mi][2 * dn], a[mi], b[0], b[1]);
        mma_16816<T>(acc_o[mi][2 * dn + 1], a[mi], b[2], b[3]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// The kernel
// ------------------------------------------------------------------------------------------

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    flash_fwd_kernel(const __grid_constant__ FlashFwdParams p) {
  using T = typename Cfg::T;
  constexpr int kBM = Cfg::kBlockM, kBN = Cfg::kBlockN, kMT = Cfg::kMTiles;

  extern __shared__ __align__(128) unsigned char smem[];

  // Later Q tiles see more keys under a causal mask: launch them first so the long CTAs do
  // not end up alone in the last wave.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y;
  const int seq = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  int64_t q_start = 0, k_start = 0;
  int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k;
  if (p.cu_seqlens_q != nullptr) {
    q_start = p.cu_seqlens_q[seq];
    seqlen_q = p.cu_seqlens_q[seq + 1] - static_cast<int>(q_start);
    k_start = p.cu_seqlens_k[seq];
    seqlen_k = p.cu_seqlens_k[seq + 1] - static_cast<int>(k_start);
  }
  const int m0 = m_block * kBM;
  if (m0 >= seqlen_q) return;  // varlen: this sequence is shorter than the longest one

  const int head_kv = head / (p.heads_q / p.heads_kv);
  const T* q = static_cast<const T*>(p.q) + seq * p.q_batch_stride +
               (q_start + m0) * p.q_row_stride + head * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + seq * p.k_batch_stride + k_start * p.k_row_stride +
               head_kv * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + seq * p.v_batch_stride + k_start * p.v_row_stride +
               head_kv * p.v_head_stride;
  T* out = static_cast<T*>(p.out) + seq * p.o_batch_stride + (q_start + m0) * p.o_row_stride +
           head * p.o_head_stride;
  float* lse = p.lse + seq * p.lse_batch_stride + head * p.lse_head_stride + q_start + m0;

  // Key range any row of this tile can see (bottom-right aligned diagonal).
  const int rows_q = min(kBM, seqlen_q - m0);
  const int m_last = m0 + rows_q - 1;
  const MaskBounds mb{seqlen_k, seqlen_k - seqlen_q, p.window_left, p.window_right};
  const int key_lo = mb.window_left >= 0 ? max(0, m0 + mb.diag - mb.window_left) : 0;
  const int key_hi = mb.window_right >= 0
                         ? min(seqlen_k, m_last + mb.diag + mb.window_right + 1)
                         : seqlen_k;
  const int n_block_min = key_lo / kBN;
  const int n_block_max = key_hi > key_lo ? (key_hi + kBN - 1) / kBN : n_block_min;

  const uint32_t s_q = smem_u32(smem);
  const uint32_t s_kv = s_q + Cfg::kQBytes;  // stage s: K at s_kv + s * kStageBytes, V after it

  float acc_o[kMT][Cfg::kDTiles][4];
  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int dn = 0; dn < Cfg::kDTiles; ++dn)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mi][dn][e] = 0.f;
    row_max[mi][0] = row_max[mi][1] = -INFINITY;
    row_sum[mi][0] = row_sum[mi][1] = 0.f;
  }

  // A tile with no visible key skips straight to the epilogue: zeros and lse = -inf.
  if (n_block_min < n_block_max) {
    const LaneOffsets<Cfg> lo = lane_offsets<Cfg>(lane);
    const uint32_t s_q_warp = s_q + warp * Cfg::kWarpRows * Cfg::kRowBytes;  // the warp's Q rows
    const int row0 = m0 + warp * Cfg::kWarpRows + (lane >> 2);  // this lane's first query row
    const int lane_col = 2 * (lane & 3);

    load_tile<Cfg, kBM>(s_q, q, p.q_row_stride, rows_q);
    cp_async_commit();
    int n = n_block_max - 1;
    const int rows_k = seqlen_k - n * kBN;
    load_tile<Cfg, kBN>(s_kv, k + n * kBN * p.k_row_stride, p.k_row_stride, rows_k);
    load_tile<Cfg, kBN>(s_kv + Cfg::kKVBytes, v + n * kBN * p.v_row_stride, p.v_row_stride, rows_k);
    cp_async_commit();

    QFrag<Cfg> q_frag;
    if constexpr (Cfg::kQInRegs) {
      cp_async_wait<1>();  // the Q group; the first K/V tile may still be in flight
      __syncthreads();
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
        for (int ks = 0; ks < Cfg::kHeadDim / 16; ++ks)
          ldmatrix_x4(q_frag[mi][ks], frag_addr<Cfg, kBM>(s_q_warp, lo.qv, mi, ks));
    }

    for (int stage = 0; n >= n_block_min; --n, stage ^= 1) {
      // Tile n has landed for every thread, and every warp is done with tile n + 1, whose
      // stage the next copy overwrites.
      cp_async_wait<0>();
      __syncthreads();
      if (n > n_block_min) {
        const uint32_t next = s_kv + (stage ^ 1) * Cfg::kStageBytes;
        const int rows = seqlen_k - (n - 1) * kBN;
        load_tile<Cfg, kBN>(next, k + (n - 1) * kBN * p.k_row_stride, p.k_row_stride, rows);
        load_tile<Cfg, kBN>(next + Cfg::kKVBytes, v + (n - 1) * kBN * p.v_row_stride,
                            p.v_row_stride, rows);
        cp_async_commit();
      }
      const uint32_t s_k = s_kv + stage * Cfg::kStageBytes;
      const uint32_t s_v = s_k + Cfg::kKVBytes;
      const int col0 = n * kBN + lane_col;
      // Uniform over the CTA: the tile runs past the sequence end, or some (row, key) pair of
      // it lies beyond the right bound (first row, last key) or the left bound (last row, first
      // key).
      const bool need_mask =
          (n + 1) * kBN > seqlen_k ||
          (mb.window_right >= 0 && (n + 1) * kBN - 1 > m0 + mb.diag + mb.window_right) ||
          (mb.window_left >= 0 && n * kBN < m_last + mb.diag - mb.window_left);
      if (need_mask) {
        attend_tile<Cfg, true>(acc_o, row_max, row_sum, q_frag, s_q_warp, s_k, s_v, lo, mb, row0,
                               col0, p.scale_log2);
      } else {
        attend_tile<Cfg, false>(acc_o, row_max, row_sum, q_frag, s_q_warp, s_k, s_v, lo, mb, row0,
                                col0, p.scale_log2);
      }
    }
  }

  // ---- epilogue: normalise, write the LSE, stage O through shared memory for 16-byte stores ----
  // The O tile reuses the Q tile's space; the barrier keeps those writes after every read of Q.
  __syncthreads();
  const int quad_row = lane >> 2;
  const int quad_col = lane & 3;
  unsigned char* s_o = smem;
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mi][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      // l == 0 only for a row that saw no key (its O is 0): zeros and lse = -inf.
      const float inv = l == 0.f ? 0.f : 1.f / l;
      const int row = warp * Cfg::kWarpRows + mi * 16 + quad_row + 8 * r;
      if (quad_col == 0 && row < rows_q) {
        lse[row] = l == 0.f ? -INFINITY : row_max[mi][r] * p.softmax_scale + logf(l);
      }
#pragma unroll
      for (int dn = 0; dn < Cfg::kDTiles; ++dn) {
        const uint32_t packed =
            pack2<T>(acc_o[mi][dn][2 * r] * inv, acc_o[mi][dn][2 * r + 1] * inv);
        const uint32_t offset = tile_offset<Cfg, kBM>(row, dn) + 4 * quad_col;
        *reinterpret_cast<uint32_t*>(s_o + offset) = packed;
      }
    }
  }
  __syncthreads();
  constexpr int kPerThread = kBM * Cfg::kChunks / Cfg::kThreads;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int idx = i * Cfg::kThreads + tid;
    const int row = idx / Cfg::kChunks;
    const int chunk = idx % Cfg::kChunks;
    if (row < rows_q) {
      const uint4 val = *reinterpret_cast<const uint4*>(s_o + tile_offset<Cfg, kBM>(row, chunk));
      *reinterpret_cast<uint4*>(out + row * p.o_row_stride + chunk * 8) = val;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Launch
// ------------------------------------------------------------------------------------------

template <class Cfg>
void launch_flash_fwd(const FlashFwdParams& p, cudaStream_t stream) {
  const int num_m_blocks = (p.seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM;
  if (num_m_blocks == 0 || p.heads_q == 0 || p.batch == 0) return;  // nothing to write
  const auto kernel = flash_fwd_kernel<Cfg>;
  opt_in_dynamic_smem<flash_fwd_kernel<Cfg>>(Cfg::kSmemBytes, [] {
    return "flash_attn: head_dim " + std::to_string(Cfg::kHeadDim);
  });
  const dim3 grid(num_m_blocks, p.heads_q, p.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  check_launch("flash_fwd_kernel");
}

}  // namespace flash
}  // namespace ember
