// flash_attn_with_kvcache: Flash-Decoding over contiguous and paged KV caches (fp16/bf16 queries,
// fp16/bf16/fp8-e4m3 caches, sm_80 and later; mma.sync tensor cores).
//
// Work and traffic for batch b, kv heads hkv, query heads hq = group * hkv, seqlen_q sq, keys
// per sequence sk, head dim d, cache element size e (2, or 1 for fp8):
//   Bytes  = 2 * b * sk * hkv * d * e                   (K and V, each read once)
//            + 4 * b * sq * hq * d                        (q read, out written, 16-bit)
//            + with S > 1 splits, 2 * 4 * S * b * sq * hq * (d + 1)  (float32 partials out and in)
//   FLOPs  = 4 * b * sq * hq * sk * d.
//   Decode (sq = 1) does 2 * group FLOPs per cache byte (8 for GQA 32:8 at 16 bits): far below
//   the H100's ~300 FLOP/B ridge, so the bar is memory bandwidth; the kernel's job is to keep
//   enough K/V bytes in flight on every SM and to read each K/V byte exactly once.
//
// Algorithm: one CTA of 4 warps per (query-row block, split, kv head, sequence).
//   * GQA packing: the CTA owns all `group` query heads of its kv head, for every query position:
//     packed row r is position r / group of head kv_head * group + r % group. K/V are read from
//     memory once per kv head, whatever the group size.
//   * Two warp layouts over m16n8k16 MMA tiles:
//       - decode (<= 16 packed rows): 1 x 4, one row block shared by the 4 warps, each warp
//         taking its own quarter of every K/V tile and keeping its own online softmax; the four
//         partial states are merged through shared memory at the end. Up to 8 rows (every GQA
//         group of a single-token decode up to 8) it runs key-major, S^T = K Q^T and
//         O^T = V^T P^T, keys and head dims on the MMA's 16-row side and the rows on its 8
//         columns (attend_tile_key_major); 9 to 16 rows run row-major, S = Q K^T, 16 rows on
//         the MMA's row side. The padded rows or columns cost tensor-core cycles only.
//       - append / chunked prefill / tree (> 16 rows): 4 x 1, 64 rows, each warp 16 rows over
//         the whole K/V tile (FlashAttention-2's split of the work).
//   * K/V tiles stream through a multi-stage cp.async pipeline (16-byte copies, coalesced along
//     head_dim, kStages - 1 tiles in flight while one is computed); in the decode layout each
//     warp copies and waits for its own quarter of every tile, with no CTA barrier per tile
//     (kWarpPipeline). A paged cache differs only
//     in where row j lives: block block_table[b, j / page_size], slot j % page_size, so a tile
//     may span several pages (any page size that is a multiple of 16). Rows past the sequence
//     end are zero-filled, never read.
//   * fp8 caches: tiles stay bytes in shared memory; each lane reads the bytes of its own MMA
//     B fragments (head_dim is summed in a permuted order for K, O's columns are permuted for
//     V, so those bytes are contiguous) and widens them to fp16 in registers, exactly (every
//     e4m3 value is an fp16 value; one conversion instruction per pair on sm_89+). The MMAs
//     then run in fp16 whatever q's type: bf16 queries are rewritten as fp16 once per CTA, each
//     row scaled by a power of two that its softmax scale takes back. The cache scales are
//     applied outside the loop: k_scale joins the softmax scale, v_scale the normalisation.
//   * S = Q K^T and O += P V with mma.sync (f32 accumulate), online softmax in base 2, and the
//     masks (sequence end, causal/window bounds around the bottom-right diagonal, tree mask over
//     the last seqlen_q keys) applied per element only on tiles that straddle one of them.
//   * Split-KV: split s of S takes tiles [s * P, (s + 1) * P) of the T tiles the block's rows
//     can see, P = T if T <= unsplit_tiles, else ceil(T / S) (ember.ops._split_kv's rule);
//     splits past the last one holding tiles (the split count is planned for the cache's
//     capacity, a sequence may be shorter) leave at once. With one live split, it writes the result
//     directly. With several, each writes its float32 partial output and LSE (a row that saw
//     no key: only lse = -inf), then counts itself in on its row block's counter; the last to
//     arrive folds them with the math of merge_attn_states (merge_row.cuh) and writes the
//     result. No second kernel: its launch and the gap before it cost more than the fold
//     itself at decode sizes.
//   * Decode with a new token (p.new_k; seqlen_q = 1): the key at position seqlens_k[b] is
//     the new one. 16-bit caches: its K/V rows are copied from new_k/new_v instead of the
//     cache; the CTA holding that tile rotates the K row in shared memory (rotary_cos), and
//     the first row block's CTA writes K and V into the cache. fp8 caches: once that tile has
//     landed, the CTA rotates the new K row in registers and quantises K and V as
//     store_kvcache does (store_cache.cuh) over that row of the tile and, in the first row
//     block, into the cache. Q is rotated in shared memory by every CTA. Only the split whose
//     tiles hold the new key ever reads it, so no other CTA waits for the write: rotary, the
//     KV store and attention are one kernel, one launch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

// Swizzled shared-memory tiles, ldmatrix / mma.sync / cp.async wrappers of the prefill kernel.
#include "attention/flash_fwd_kernel.cuh"
#include "common/common.h"
#include "common/pdl.cuh"
#include "decode/decode_attention.h"
#include "decode/merge_row.cuh"
#include "kvcache/store_cache.cuh"
#include "rotary/rotary.cuh"

namespace ember {
namespace decode {

using flash::cp_async_16;
using flash::cp_async_4;
using flash::cp_async_commit;
using flash::cp_async_wait;
using flash::frag_addr;
using flash::lane_offsets;
using flash::LaneOffsets;
using flash::ldmatrix_x4;
using flash::ldmatrix_x4_trans;
using flash::mma_16816;
using flash::pack2;
using flash::smem_u32;
using flash::tile_offset;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Rows of the query block per warp: one m16n8k16 tile.
constexpr int kWarpRows = 16;
constexpr int kWarps = 4;
// More packed rows than one warp tile switch to the 4 x 1 warp layout.
inline int decode_warps_m(int packed_rows) { return packed_rows <= kWarpRows ? 1 : kWarps; }

// Block-table entries a CTA stages in shared memory: the pages of up to 4096 keys at 16 keys a
// page (a longer split reads the block table per tile, see PageList). 1 KB, which keeps every
// decode configuration within two CTAs an SM; at 2048 keys (128 entries), one CTA per SM over
// a 128k-key sequence (44 splits of 2979 keys at GQA 9:3) read its pages per tile.
constexpr int kStagedPages = 256;

// Keep a CTA's shared memory at most this large so that two CTAs share an H100 SM (228 KB):
// while one waits on a barrier or its softmax, the other's copies keep the memory busy.
constexpr int kTwoPerSmBytes = 100 * 1024;

constexpr int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }

// Keys per KV tile of the decode layout, narrow or wide. Narrow: 64. Wide, where it differs:
// 128 for 16-bit caches at d = 64 (the 128-byte rows of d = 128), and for fp8 caches the keys
// of a 32 KB stage of K+V (256 at d = 64, 128 at d = 96 and 128), as bf16 has at d = 128. Wide
// tiles stream long splits faster: the per-tile barriers and softmax bookkeeping of narrow ones
// cost about as much as their bytes (H100: bf16 d=64 rows 32:8 32 x 4k 2684 -> 2850 GB/s, 9:3
// 16 x 32k 2442 -> 2720). At a few hundred keys, alone, a one-split 16-bit call at 384 keys
// takes 6.4 us with 128-key tiles against 7.7 with 64 (32:8 and 9:3 alike); in the decode step
// they gain too (SmolLM2 shape +10%, Llama-3.2-1B +0.5% once its O projection, launched early
// behind the attention, moved to cuBLAS: session 22), while fp8's 256-key tiles lose there
// (8.4 -> 10.0 us alone). So the host asks for wide tiles when each split streams many keys,
// or, for 16-bit caches, when a launch of short unsplit sequences is latency-bound
// (ember.ops._cuda_decode), and the two widths
// are two kernels: one kernel holding both, each row block picking from its lengths, ran the 1B
// decode step at 704 tok/s against 805 (branch next/decode-dual-tiles). Append layout: 64-key
// tiles, 32 at d = 256 to keep the shared memory of two stages under the budget.
constexpr int decode_block_n(int head_dim, bool fp8, bool wide) {
  return !wide ? 64 : fp8 ? 64 * (256 / head_dim) : (head_dim == 64 ? 128 : 64);
}

// Packed rows up to which the decode layout runs key-major (see attend_tile_key_major).
constexpr int kKeyMajorRows = 8;

template <typename T_, int kHeadDim_, int kWarpsM_, bool kFp8_, bool kWide_ = false,
          bool kKeyMajor_ = false>
struct DecodeConfig {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr int kWarpsN = kWarps / kWarpsM;
  static constexpr bool kFp8 = kFp8_;
  // S^T = K Q^T and O^T = V^T P^T: keys (and head dims) on the MMA's 16-row side, the packed
  // query rows (at most 8) on its 8-column side. Decode layout only.
  static constexpr bool kKeyMajor = kKeyMajor_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kElemBytes = kFp8 ? 1 : 2;  // per cache element
  // The MMAs' input type: fp16 over an fp8 cache (e4m3x2_to_half2), else q's.
  using MmaT = std::conditional_t<kFp8, __half, T>;
  static constexpr int kCacheRowBytes = kHeadDim * kElemBytes;

  static constexpr int kBlockM = kWarpRows * kWarpsM;
  static constexpr int kBlockN = kWarpsM == 1 ? decode_block_n(kHeadDim, kFp8, kWide_)
                                              : (kHeadDim <= 128 ? 64 : 32);
  static constexpr int kWarpKeys = kBlockN / kWarpsN;
  // Tiles of S per warp: n8 (row-major) or m16 (key-major, S^T) tiles of keys.
  static constexpr int kSTiles = kWarpKeys / (kKeyMajor ? 16 : 8);
  // Accumulator tiles of O per warp: n8 tiles of dims, or m16 tiles of dims of O^T.
  static constexpr int kDTiles = kHeadDim / (kKeyMajor ? 16 : 8);
  static constexpr int kChunks = kHeadDim / 8;   // 16-byte chunks per 16-bit row
  // Q fragments live in registers unless they would crowd out O (d = 256).
  static constexpr bool kQInRegs = kHeadDim <= 128;

  // Swizzle parameters read by flash::tile_offset / frag_addr / lane_offsets: column blocks of 8
  // chunks (128 bytes) when d is a multiple of 64, else 4.
  static constexpr int kBlockChunks = kHeadDim % 64 == 0 ? 8 : 4;
  static constexpr int kRowBytes = kBlockChunks * 16;
  static constexpr int kSwizzleShift = kBlockChunks == 8 ? 0 : 1;

  // Global -> shared copies: 16-byte chunks of 8 (16-bit) or 16 (fp8) elements.
  static constexpr int kCopyElems = kFp8 ? 16 : 8;
  static constexpr int kCopyChunks = kHeadDim / kCopyElems;  // per cache row

  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kRawTileBytes = kBlockN * kCacheRowBytes;  // one K or V tile, as stored
  static constexpr int kStageBytes = 2 * kRawTileBytes;           // K then V

  // At most 4 stages. A build that let d = 64 take 6 (98 KB per CTA instead of 66) ran the
  // Llama-3.2-1B decode step at 1300 us of graph time on one H100, against 1237-1265 us with 4
  // stages on other H100s. Probable cause, not traced: under PDL the kernels before and after
  // this one share SMs with its CTAs, and a larger footprint leaves them less room.
  static constexpr int stages() {
    for (int s = 4; s > 2; --s) {
      if (kQBytes + s * kStageBytes <= kTwoPerSmBytes) return s;
    }
    return 2;
  }
  static constexpr int kStages = stages();
  static constexpr int kMainBytes = kQBytes + kStages * kStageBytes;

  // Epilogue: each warp column's O rows as float32, rows padded by 8 floats so the float2
  // stores of a half-warp (4 rows x 4 lanes) hit 32 distinct banks; then row max and row sum.
  static constexpr int kOStride = kHeadDim + 8;
  static constexpr int kCombineBytes = kWarpsN * kBlockM * kOStride * 4;
  static constexpr int kStatsOffset = kMainBytes > kCombineBytes ? kMainBytes : kCombineBytes;
  // Block-table entries of the CTA's keys, staged once (see PageList).
  static constexpr int kPagesOffset = kStatsOffset + 2 * kWarpsN * kBlockM * 4;
  static constexpr int kSmemBytes = kPagesOffset + kStagedPages * 4;
  static constexpr int kMinBlocks = kSmemBytes <= kTwoPerSmBytes + 4096 ? 2 : 1;

  static_assert(sizeof(T) == 2, "fp16/bf16 queries only");
  static_assert(kHeadDim % 32 == 0 && kWarpKeys % 16 == 0, "tile shape");
  static_assert(kChunks % kBlockChunks == 0, "head_dim must fill whole column blocks");
  static_assert(!kFp8 || kRawTileBytes % 128 == 0, "fp8 tiles are whole 128-byte lines");
  static_assert(!kKeyMajor || kWarpsM == 1, "key-major is a decode-layout variant");
  // The key-major fp8 reads of one 16-key tile are those of the first shifted by 16 rows, a
  // constant when 16 rows span whole 8-line swizzle periods (Fp8KeyMajorOffsets).
  static_assert(!kKeyMajor || !kFp8 || kHeadDim % 64 == 0, "key-major fp8: d % 64 == 0");
};

// This lane's two rows of the query block (row index r = 0, 1 of its MMA state): rows g and
// g + 8 of its warp's 16 (row-major), or columns 2t and 2t + 1 of S^T (key-major), where
// (g, t) = (lane / 4, lane % 4).
template <class Cfg>
__device__ __forceinline__ int lane_row(int warp_m, int lane, int r) {
  return Cfg::kKeyMajor ? 2 * (lane & 3) + r : warp_m * kWarpRows + (lane >> 2) + 8 * r;
}

// ------------------------------------------------------------------------------------------
// fp8 e4m3 -> fp16, exact
// ------------------------------------------------------------------------------------------
// Every e4m3 value is an fp16 value, so an fp8 cache feeds fp16 MMAs whatever q's type is
// (bf16 queries are rewritten as fp16 once per CTA: rescale_q_to_half). sm_89 and later
// convert a pair in one instruction. sm_80 places the 7 exponent/mantissa bits under fp16's
// fields, which gives the value times 2^-8 (subnormals included), and multiplies by 2^8.
// e4m3's NaN code (never written by store_kvcache, which saturates) reads as NaN on sm_89+ and
// as +-480 on sm_80.

// Two e4m3 values, bits 0..7 (-> the low half) and 8..15 of `pair`, as two fp16 values.
__device__ __forceinline__ uint32_t e4m3x2_to_half2(uint32_t pair) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t out;
  asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.rn.f16x2.e4m3x2 %0, lo;\n}\n"
      : "=r"(out)
      : "r"(pair));
  return out;
#else
  const uint32_t y = __byte_perm(pair, 0u, 0x1000u);  // byte 0 -> bits 8..15, byte 1 -> 24..31
  const uint32_t bits = (y & 0x80008000u) | ((y >> 1) & 0x3F803F80u);
  const uint32_t two_to_8 = 0x5C005C00u;  // 2^8 in both halves
  const __half2 h = __hmul2(*reinterpret_cast<const __half2*>(&bits),
                            *reinterpret_cast<const __half2*>(&two_to_8));
  return *reinterpret_cast<const uint32_t*>(&h);
#endif
}

// Four e4m3 values (byte 0 first) -> four fp16 values in two registers.
__device__ __forceinline__ void widen4(uint32_t x, uint32_t& lo, uint32_t& hi) {
  lo = e4m3x2_to_half2(x);
  hi = e4m3x2_to_half2(x >> 16);
}

// Byte `byte` of `lo` and of `hi` -> two fp16 values (lo's in the low half). `byte` is a
// constant after unrolling, so the selector is an immediate.
__device__ __forceinline__ uint32_t widen_column(uint32_t lo, uint32_t hi, int byte) {
  return e4m3x2_to_half2(__byte_perm(lo, hi, ((4u + byte) << 4) | byte));
}

// ------------------------------------------------------------------------------------------
// fp8 tiles in shared memory, read straight into MMA fragments
// ------------------------------------------------------------------------------------------
// An fp8 K or V tile is kept as stored (rows of head_dim bytes) and never widened in shared
// memory: each lane reads the bytes of its own B fragments and widens them in registers. That
// needs each lane's bytes to be contiguous, which two reorderings give:
//   * K (B of S = Q K^T, lane (g, t) = (lane / 4, lane % 4) holding k slots 2t, 2t+1, 2t+8,
//     2t+9 of key g): the sum over head_dim may run in any order, so slots (2t, 2t+1, 2t+8,
//     2t+9) of k-step ks are taken to be dims (d/4) t + 4 ks + (0, 1, 2, 3), and Q's A
//     fragments are read in the same order (load_q_frag_fp8). Lane (g, t) reads d/4 contiguous
//     bytes of key g, all its k-steps at once.
//   * V (B of O += P V, lane (g, t) holding keys 2t, 2t+1, 2t+8, 2t+9 of column g): column g of
//     O tile dn is taken to be dim (d/8) g + dn, so a lane reads d/8 contiguous bytes of each of
//     its four keys, and the O accumulators hold a permutation of the dims that the epilogue
//     undoes (lane (g, t) holds dims (d/4) t .. (d/4) t + d/4 - 1 of its rows).
// Rows are laid out as 128-byte lines of 16-byte chunks (a row spans d/128 lines, or two rows
// share one at d = 64), chunk c of line l stored at c ^ swizzle(l): with this swizzle neither
// the K reads (8 lanes: 2 keys x 4 column ranges) nor the V reads (4 keys x 2 column ranges at
// d = 128, 4 x 4 at d = 64) of a shared-memory phase hit one bank twice.

__device__ __forceinline__ uint32_t fp8_line_swizzle(uint32_t line) {
  const uint32_t l = line & 7;
  return ((((l & 3) ^ (l >> 2)) << 1) | (l & 1));
}

// Byte offset of 16-byte chunk `chunk` of row `row` in an fp8 tile.
template <class Cfg>
__device__ __forceinline__ uint32_t fp8_chunk_offset(int row, int chunk) {
  const uint32_t linear = row * (Cfg::kHeadDim / 16) + chunk;
  const uint32_t line = linear >> 3;
  return (line << 7) | (((linear & 7) ^ fp8_line_swizzle(line)) << 4);
}

// kBytes contiguous bytes of an fp8 tile row are read in the widest shared loads that divide
// kBytes, kFp8Pieces<kBytes> of them.
template <int kBytes>
constexpr int kFp8Piece = kBytes % 16 == 0 ? 16 : kBytes % 8 == 0 ? 8 : 4;
template <int kBytes>
constexpr int kFp8Pieces = kBytes / kFp8Piece<kBytes>;

// Offsets in an fp8 tile of the pieces of kBytes contiguous bytes of row `row` from byte
// `byte0` (a multiple of kBytes).
template <class Cfg, int kBytes>
__device__ __forceinline__ void fp8_piece_offsets(uint32_t (&off)[kFp8Pieces<kBytes>], int row,
                                                  int byte0) {
#pragma unroll
  for (int i = 0; i < kFp8Pieces<kBytes>; ++i) {
    const int byte = byte0 + i * kFp8Piece<kBytes>;
    off[i] = fp8_chunk_offset<Cfg>(row, byte / 16) + byte % 16;
  }
}

// The pieces at tile + off[i] into 32-bit words.
template <int kBytes>
__device__ __forceinline__ void load_fp8_pieces(uint32_t (&w)[kBytes / 4], uint32_t tile,
                                                const uint32_t (&off)[kFp8Pieces<kBytes>]) {
  constexpr int kPiece = kFp8Piece<kBytes>;
#pragma unroll
  for (int i = 0; i < kFp8Pieces<kBytes>; ++i) {
    const uint32_t addr = tile + off[i];
    uint32_t* d = w + i * (kPiece / 4);
    if constexpr (kPiece == 16) {
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                   : "r"(addr));
    } else if constexpr (kPiece == 8) {
      asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(d[0]), "=r"(d[1]) : "r"(addr));
    } else {
      asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(d[0]) : "r"(addr));
    }
  }
}

// kBytes contiguous bytes of row `row` of an fp8 tile from byte `byte0` (a multiple of kBytes)
// into 32-bit words.
template <class Cfg, int kBytes>
__device__ __forceinline__ void load_fp8_bytes(uint32_t (&w)[kBytes / 4], uint32_t tile, int row,
                                               int byte0) {
  uint32_t off[kFp8Pieces<kBytes>];
  fp8_piece_offsets<Cfg, kBytes>(off, row, byte0);
  load_fp8_pieces<kBytes>(w, tile, off);
}

// Q's A fragment of k-step ks in the dim order of the fp8 K fragments (see above): slots 2t,
// 2t+1 and 2t+8, 2t+9 of rows g and g + 8 are 4 consecutive dims of the 16-bit Q tile.
template <class Cfg>
__device__ __forceinline__ void load_q_frag_fp8(uint32_t (&a)[4], uint32_t s_q, int warp_m,
                                                int ks, int lane) {
  const int row = warp_m * kWarpRows + (lane >> 2);
  const int dim = (Cfg::kHeadDim / 4) * (lane & 3) + 4 * ks;
  const uint32_t in_chunk = (dim % 8) * 2;
  const uint32_t top = s_q + tile_offset<Cfg, Cfg::kBlockM>(row, dim / 8) + in_chunk;
  const uint32_t bottom = s_q + tile_offset<Cfg, Cfg::kBlockM>(row + 8, dim / 8) + in_chunk;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(a[0]), "=r"(a[2]) : "r"(top));
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(a[1]), "=r"(a[3]) : "r"(bottom));
}

// bf16 queries over an fp8 cache: rewrites the Q tile in place as fp16 for the fp16 MMAs, each
// row times the power of two 2^e that puts its largest |q| in [2^14, 2^15) (e at most 126, so
// that 2^-e is a normal float), and stores 2^-e per row in s_unscale for the row's softmax
// scale. Exact for every value down to 2^-28 of its row's largest (fp16's 11 significant bits
// hold bf16's 8 down to 2^-14); smaller ones round to fp16 subnormals, an error under 2^-39 of
// the row's largest.
template <class Cfg>
__device__ __forceinline__ void rescale_q_to_half(unsigned char* q_tile, float* s_unscale,
                                                  int tid) {
  constexpr int kPerRow = Cfg::kThreads / Cfg::kBlockM;  // threads sharing a row
  const int row = tid / kPerRow, sub = tid % kPerRow;
  float top = 0.f;
  for (int c = sub; c < Cfg::kChunks; c += kPerRow) {
    const uint4 w =
        *reinterpret_cast<const uint4*>(q_tile + tile_offset<Cfg, Cfg::kBlockM>(row, c));
    for (const uint32_t pair : {w.x, w.y, w.z, w.w}) {
      const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pair));
      top = fmaxf(top, fmaxf(fabsf(f.x), fabsf(f.y)));
    }
  }
#pragma unroll
  for (int offset = kPerRow / 2; offset > 0; offset >>= 1)
    top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));
  // floor(log2(top)) from the exponent field: -127 for 0 (a padding row) and subnormals.
  const int top_exp = static_cast<int>((__float_as_uint(top) >> 23) & 0xffu) - 127;
  const int e = min(14 - top_exp, 126);
  const float scale = __uint_as_float(static_cast<uint32_t>(127 + e) << 23);
  for (int c = sub; c < Cfg::kChunks; c += kPerRow) {
    uint4* chunk = reinterpret_cast<uint4*>(q_tile + tile_offset<Cfg, Cfg::kBlockM>(row, c));
    uint4 w = *chunk;
    for (uint32_t* pair : {&w.x, &w.y, &w.z, &w.w}) {
      const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(pair));
      *pair = pack2<__half>(f.x * scale, f.y * scale);
    }
    *chunk = w;
  }
  if (sub == 0) s_unscale[row] = __uint_as_float(static_cast<uint32_t>(127 - e) << 23);
}

// ------------------------------------------------------------------------------------------
// Tile loads
// ------------------------------------------------------------------------------------------

// Query rows [r0, r0 + rows_here) of the packed block into the swizzled Q tile (zero rows after).
template <class Cfg>
__device__ __forceinline__ void load_q_tile(uint32_t s_q, const DecodeParams& p, int b,
                                            int kv_head, int group, int r0, int rows_here,
                                            int tid) {
  using T = typename Cfg::T;
  constexpr int kItems = Cfg::kBlockM * Cfg::kChunks;
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride;
#pragma unroll
  for (int i = 0; i < (kItems + Cfg::kThreads - 1) / Cfg::kThreads; ++i) {
    const int idx = i * Cfg::kThreads + tid;
    if (kItems % Cfg::kThreads == 0 || idx < kItems) {
      const int row = idx / Cfg::kChunks;
      const int chunk = idx % Cfg::kChunks;
      const bool valid = row < rows_here;
      const int packed = r0 + row;
      const int pos = packed / group;
      const int head = kv_head * group + (packed - pos * group);
      const T* src = valid ? q + pos * p.q_row_stride + head * p.q_head_stride + chunk * 8 : q;
      cp_async_16(s_q + tile_offset<Cfg, Cfg::kBlockM>(row, chunk), src, valid);
    }
  }
}

// The page of a paged cache that key `key` lies in.
__device__ __forceinline__ int page_of(const DecodeParams& p, int key) {
  return __umulhi(static_cast<uint32_t>(key), p.page_div_mul) >> p.page_div_shift;
}

// Where a paged cache's pages are: entry i of `entries` is the block of page `first + i` of the
// sequence. The kernel stages its split's entries in shared memory before its first tile copy
// when they fit (kStagedPages), in one round trip; otherwise `entries` is the block table's row
// itself (first = 0). Why: a tile's copies cannot be issued before its block numbers arrive,
// and in a decode step the block table is cold (the weight streams evict it from L2), so per
// tile reads put a DRAM round trip in front of each tile's copies. Measured on H100s: alone
// (graph of back-to-back calls) staging changed little; in the Llama-3.2-1B step with one split
// per sequence, 822-826 tok/s unstaged and 836-840 staged (two machines whose main measured
// 811-815 and 811-812).
struct PageList {
  const int* entries;  // shared memory or global (generic address)
  int first;
};

// Issues the copies of K/V tile `tile` (keys [tile * kBlockN, + kBlockN)) into one stage. 16-bit
// caches land in swizzled tiles ready for ldmatrix, fp8 caches in the fp8 tile layout
// (fp8_chunk_offset). Keys at or past seqlen_k are zero-filled without a read, so their
// block_table entries are never looked up either.
//
// The address arithmetic is kept short on purpose: it is issued by the same warps, between the
// same barriers, as the tile's math, and at d = 64 it was 40% of a tile's instructions (sm_90a
// SASS, ~45 per K/V copy pair: the swizzled destination, a 64-bit block product and a row
// product per copy). A thread copies one 16-byte chunk column of rows row0 + i * kRowStep:
//   * its destinations are computed for the first kDstPeriod copies only, those of later copies
//     being the same plus whole swizzle periods (every head dim but 96);
//   * contiguous caches: the sources are the first one's plus i row steps, a 64-bit add;
//   * paged caches: block_table[b, key / page_size] times the block stride plus the slot times
//     the row stride, each a 32 x 32 -> 64-bit product (entries are non-negative, and both
//     strides fit 32 bits: the launcher checks), looked up once per 16 keys of the thread's
//     rows, the other copies of those 16 keys a row step on.
//
// kPerWarp (the decode layout, whose warps each read their own kWarpKeys rows of every tile):
// each warp copies its own rows, so that it waits for no other warp's copies (see the K/V loop).
template <class Cfg, bool kPerWarp>
__device__ __forceinline__ void load_kv_tile(uint32_t s_k, uint32_t s_v, const DecodeParams& p,
                                             const PageList& pages, int b, int kv_head, int tile,
                                             int seqlen_k, int new_pos) {
  using E = std::conditional_t<Cfg::kFp8, uint8_t, typename Cfg::T>;
  constexpr int kCopyThreads = kPerWarp ? 32 : Cfg::kThreads;
  constexpr int kRows = kPerWarp ? Cfg::kWarpKeys : Cfg::kBlockN;  // rows to copy
  constexpr int kRowStep = kCopyThreads / Cfg::kCopyChunks;      // rows copied per step
  constexpr int kSteps = (kRows + kRowStep - 1) / kRowStep;
  // Every thread busy and every step whole: true unless head_dim is 96.
  constexpr bool kExact = kRowStep * Cfg::kCopyChunks == kCopyThreads && kRows % kRowStep == 0;
  // Destinations repeat with the swizzle: steps kDstPeriod apart lie a whole number of swizzle
  // periods (1 KB of an fp8 tile, 8 rows of a 16-bit one) apart, so only the first kDstPeriod
  // are computed. 0 where the steps are not exact (head_dim 96): every one is computed.
  constexpr int kDstPeriod = !kExact    ? 0
                             : Cfg::kFp8 ? 1024 / gcd(1024, kRowStep * Cfg::kCacheRowBytes)
                                         : 8 / gcd(8, kRowStep);
  constexpr uint32_t kDstPeriodBytes =
      kDstPeriod * kRowStep * (Cfg::kFp8 ? Cfg::kCacheRowBytes : Cfg::kRowBytes);
  // Re-read the thread index (volatile: ptxas cannot hoist it) so that the per-thread offsets are
  // recomputed per tile instead of being kept live across the whole K/V loop, where they would
  // crowd out the O accumulators (as in the prefill kernel's load_tile).
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(tid));
  const int thread = kPerWarp ? tid & 31 : tid;
  const int row0 = (kPerWarp ? (tid >> 5) * kRows : 0) + thread / Cfg::kCopyChunks;
  const int chunk = thread % Cfg::kCopyChunks;
  const int col = chunk * Cfg::kCopyElems;
  const E* k = static_cast<const E*>(p.k_cache) + kv_head * p.k_head_stride + col;
  const E* v = static_cast<const E*>(p.v_cache) + kv_head * p.v_head_stride + col;
  const bool paged = p.block_table != nullptr;
  const uint32_t k_row_stride = static_cast<uint32_t>(p.k_row_stride);
  const uint32_t v_row_stride = static_cast<uint32_t>(p.v_row_stride);
  // The first step's key; contiguous caches: its rows.
  const int key0 = tile * Cfg::kBlockN + row0;
  const E* k_first = k + b * p.k_batch_stride +
                     static_cast<uint64_t>(static_cast<uint32_t>(key0)) * k_row_stride;
  const E* v_first = v + b * p.v_batch_stride +
                     static_cast<uint64_t>(static_cast<uint32_t>(key0)) * v_row_stride;
  // The new token's rows, computed once: a per-copy computation behind a branch (instead of a
  // select between two live pointers) cost SmolLM2's decode step 2.5% on the H100.
  const E* new_k = nullptr;
  const E* new_v = nullptr;
  if (!Cfg::kFp8 && new_pos >= 0) {
    new_k = static_cast<const E*>(p.new_k) + b * p.new_k_batch_stride +
            kv_head * p.new_k_head_stride + col;
    new_v = static_cast<const E*>(p.new_v) + b * p.new_v_batch_stride +
            kv_head * p.new_v_head_stride + col;
  }
  const auto dst_of = [&](int i) {
    return Cfg::kFp8 ? fp8_chunk_offset<Cfg>(row0 + i * kRowStep, chunk)
                     : tile_offset<Cfg, Cfg::kBlockN>(row0 + i * kRowStep, chunk);
  };
  uint32_t dst_first[kDstPeriod > 0 ? kDstPeriod : 1];
#pragma unroll
  for (int i = 0; i < kDstPeriod; ++i) dst_first[i] = dst_of(i);
  // The layout is tested once per tile, not per copy: each has its own unrolled loop, which
  // calls `copy(i, valid, k_src, v_src)` for its steps.
  auto copy = [&](int i, bool valid, const E* k_src, const E* v_src) {
    if (!Cfg::kFp8 && key0 + i * kRowStep == new_pos) {  // the new token: not in the cache yet
      k_src = new_k;
      v_src = new_v;
    }
    uint32_t dst;
    if constexpr (kDstPeriod > 0) {
      dst = dst_first[i % kDstPeriod] + (i / kDstPeriod) * kDstPeriodBytes;
    } else {
      dst = dst_of(i);
    }
    cp_async_16(s_k + dst, k_src, valid);
    cp_async_16(s_v + dst, v_src, valid);
  };
  // Whether step i is a copy of this thread (always, unless head_dim is 96).
  auto active = [&](int i) {
    return kExact || (thread < kRowStep * Cfg::kCopyChunks &&
                      thread / Cfg::kCopyChunks + i * kRowStep < kRows);
  };
  if (paged) {
    // Block strides fit 32 bits too (the launcher checks): one 32 x 32 -> 64-bit product each.
    const uint32_t k_block_stride = static_cast<uint32_t>(p.k_batch_stride);
    const uint32_t v_block_stride = static_cast<uint32_t>(p.v_batch_stride);
    // One block-table lookup per group of steps within 16 keys: pages hold a multiple of 16
    // keys (the launcher checks), and where the steps are exact and kRowStep divides 16, a
    // thread's first key is a multiple of 16 plus thread / kCopyChunks < kRowStep, so the
    // 16 / kRowStep steps from each multiple of 16 share a page, their sources a row step
    // apart. Lookups per step: fp8 d = 64 1/2, bf16 d = 64 1/4, bf16 d = 128 1/8.
    constexpr int kGroupSteps = kExact && kRowStep < 16 && 16 % kRowStep == 0 ? 16 / kRowStep : 1;
    const uint64_t k_step = static_cast<uint64_t>(kRowStep) * k_row_stride;
    const uint64_t v_step = static_cast<uint64_t>(kRowStep) * v_row_stride;
#pragma unroll
    for (int g = 0; g < kSteps; g += kGroupSteps) {
      if (!active(g)) continue;  // (groups are single steps where some are inactive)
      const int key = key0 + g * kRowStep;
      // A group past the end is looked up as the sequence's last key (seqlen_k >= 1 here): an
      // in-range address, never read.
      const int live_key = min(key, seqlen_k - 1);
      const int page = page_of(p, live_key);
      const uint32_t slot = static_cast<uint32_t>(live_key - page * p.page_size);
      const uint32_t block = static_cast<uint32_t>(pages.entries[page - pages.first]);
      const E* k_src = k + static_cast<uint64_t>(block) * k_block_stride +
                       static_cast<uint64_t>(slot) * k_row_stride;
      const E* v_src = v + static_cast<uint64_t>(block) * v_block_stride +
                       static_cast<uint64_t>(slot) * v_row_stride;
#pragma unroll
      for (int i = g; i < g + kGroupSteps && i < kSteps; ++i, k_src += k_step, v_src += v_step) {
        if (active(i)) copy(i, key0 + i * kRowStep < seqlen_k, k_src, v_src);
      }
    }
  } else {
    // A running pointer per cache: one 64-bit add a step. Rows past the end (even past the
    // cache's capacity) are never read: cp.async reads no byte of an invalid copy, as in the
    // prefill kernel's load_tile.
    const uint64_t k_step = static_cast<uint64_t>(kRowStep) * k_row_stride;
    const uint64_t v_step = static_cast<uint64_t>(kRowStep) * v_row_stride;
    const E* k_src = k_first;
    const E* v_src = v_first;
#pragma unroll
    for (int i = 0; i < kSteps; ++i, k_src += k_step, v_src += v_step) {
      if (active(i)) copy(i, key0 + i * kRowStep < seqlen_k, k_src, v_src);
    }
  }
}

// ------------------------------------------------------------------------------------------
// A new token: rotary embedding in shared memory, and its K/V rows into the cache
// ------------------------------------------------------------------------------------------

// Element `feature` of row `row` of a swizzled 16-bit tile of kRows rows.
template <class Cfg, int kRows>
__device__ __forceinline__ typename Cfg::T& tile_element(unsigned char* tile, int row,
                                                         int feature) {
  return reinterpret_cast<typename Cfg::T*>(
      tile + tile_offset<Cfg, kRows>(row, feature / 8))[feature % 8];
}

// cos and sin of pair i at table row `at` (clipped to the table by the caller).
template <typename T>
__device__ __forceinline__ void rotary_cos_sin(const DecodeParams& p, int64_t at, int i,
                                               float& cos, float& sin) {
  if (p.rotary_float) {
    cos = static_cast<const float*>(p.rotary_cos)[at * p.rotary_cos_stride + i];
    sin = static_cast<const float*>(p.rotary_sin)[at * p.rotary_sin_stride + i];
  } else {
    cos = to_float(static_cast<const T*>(p.rotary_cos)[at * p.rotary_cos_stride + i]);
    sin = to_float(static_cast<const T*>(p.rotary_sin)[at * p.rotary_sin_stride + i]);
  }
}

// Rotates rows [row0, row0 + rows) of a swizzled tile by position `pos` (clipped to the table)
// with rotate_pair, the rounding of ember's rotary kernels; the CTA's threads share the pairs.
template <class Cfg, int kRows>
__device__ __forceinline__ void rotate_tile_rows(unsigned char* tile, int row0, int rows, int pos,
                                                 const DecodeParams& p, int tid) {
  using T = typename Cfg::T;
  const int half = p.rotary_dim / 2;
  const int64_t at = min(max(pos, 0), p.rotary_rows - 1);
  for (int idx = tid; idx < rows * half; idx += Cfg::kThreads) {
    const int row = row0 + idx / half, i = idx % half;
    const int f0 = p.rotary_interleaved ? 2 * i : i;
    const int f1 = p.rotary_interleaved ? 2 * i + 1 : i + half;
    float cos, sin;
    rotary_cos_sin<T>(p, at, i, cos, sin);
    T& a = tile_element<Cfg, kRows>(tile, row, f0);
    T& b = tile_element<Cfg, kRows>(tile, row, f1);
    rotate_pair<T>(to_float(a), to_float(b), cos, sin, a, b);
  }
}

// The cache block and the row in it of key position `pos` of sequence b (a contiguous cache is
// one block per sequence).
struct CacheSlot {
  int64_t block;
  int slot;
};

__device__ __forceinline__ CacheSlot cache_slot(const DecodeParams& p, const PageList& pages,
                                                int b, int pos) {
  if (p.block_table == nullptr) return {b, pos};
  const int page = pos / p.page_size;
  return {pages.entries[page - pages.first], pos - page * p.page_size};
}

// Writes row `row` of the K and V tiles (the new token, at key position `pos`) into the cache.
// The page lookup repeats load_kv_tile's on purpose: one helper shared by both (H100, same run)
// changed load_kv_tile's code enough that a CTA streaming 16 tiles took 20.6 us instead of 15.7.
template <class Cfg>
__device__ __forceinline__ void store_new_row(const unsigned char* k_tile,
                                              const unsigned char* v_tile, int row,
                                              const DecodeParams& p, const PageList& pages, int b,
                                              int kv_head, int pos, int tid) {
  using T = typename Cfg::T;
  const CacheSlot at = cache_slot(p, pages, b, pos);
  const int64_t block = at.block;
  const int slot = at.slot;
  if (tid < 2 * Cfg::kChunks) {
    const bool is_v = tid >= Cfg::kChunks;
    const int chunk = is_v ? tid - Cfg::kChunks : tid;
    T* dst = is_v ? static_cast<T*>(const_cast<void*>(p.v_cache)) + block * p.v_batch_stride +
                        slot * p.v_row_stride + kv_head * p.v_head_stride
                  : static_cast<T*>(const_cast<void*>(p.k_cache)) + block * p.k_batch_stride +
                        slot * p.k_row_stride + kv_head * p.k_head_stride;
    const unsigned char* tile = is_v ? v_tile : k_tile;
    *reinterpret_cast<uint4*>(dst + chunk * 8) = *reinterpret_cast<const uint4*>(
        tile + tile_offset<Cfg, Cfg::kBlockN>(row, chunk));
  }
}

// fp8 caches: the new token's K row (rotated with rotate_pair, rounded to T, as
// rotary_embedding does) and V row, quantised with to_e4m3 as store_kvcache does, into row
// `row` of the fp8 K and V tiles and, with `to_cache`, into the cache at key position `pos`.
// One thread per feature: a K feature inside the rotary dims rotates with its partner.
// Not inlined: it runs once per CTA. Inlined into the K/V loop, with a test in the tile copies
// that skipped the new row, the fp8 kernel ran 1-8% slower on cache-only calls (H100, same
// run of bench.decode_probe: 32:8 d=128 16 x 32k 2479 -> 2691 GB/s, 9:3 d=64 32 x 4k 1422 ->
// 1496, 32:8 d=64 8 x 8k 1770 -> 1795); the 1B decode on an fp8 cache measured 704 -> 695
// tok/s.
template <class Cfg>
__device__ __noinline__ void quantize_new_row(unsigned char* k_tile, unsigned char* v_tile,
                                              int row, const DecodeParams& p, PageList pages,
                                              int b, int kv_head, int pos, bool to_cache,
                                              int tid) {
  using T = typename Cfg::T;
  const T* k = static_cast<const T*>(p.new_k) + b * p.new_k_batch_stride +
               kv_head * p.new_k_head_stride;
  const T* v = static_cast<const T*>(p.new_v) + b * p.new_v_batch_stride +
               kv_head * p.new_v_head_stride;
  const CacheSlot at = cache_slot(p, pages, b, pos);
  const int64_t block = at.block;
  const int slot = at.slot;
  Fp8* k_dst = static_cast<Fp8*>(const_cast<void*>(p.k_cache)) + block * p.k_batch_stride +
               slot * p.k_row_stride + kv_head * p.k_head_stride;
  Fp8* v_dst = static_cast<Fp8*>(const_cast<void*>(p.v_cache)) + block * p.v_batch_stride +
               slot * p.v_row_stride + kv_head * p.v_head_stride;
  const float k_scale = *p.k_scale, v_scale = *p.v_scale;
  const int half = p.rotary_cos != nullptr ? p.rotary_dim / 2 : 0;
  for (int f = tid; f < Cfg::kHeadDim; f += Cfg::kThreads) {
    T k_f = k[f];
    if (f < 2 * half) {
      const bool first = p.rotary_interleaved ? f % 2 == 0 : f < half;
      const int i = p.rotary_interleaved ? f / 2 : (first ? f : f - half);
      const int f0 = p.rotary_interleaved ? 2 * i : i;
      const int f1 = p.rotary_interleaved ? 2 * i + 1 : i + half;
      float cos, sin;
      rotary_cos_sin<T>(p, min(max(pos, 0), p.rotary_rows - 1), i, cos, sin);
      T a, r;
      rotate_pair<T>(to_float(k[f0]), to_float(k[f1]), cos, sin, a, r);
      k_f = first ? a : r;
    }
    const Fp8 kq = to_e4m3(to_float(k_f), k_scale);
    const Fp8 vq = to_e4m3(to_float(v[f]), v_scale);
    const uint32_t at = fp8_chunk_offset<Cfg>(row, f / 16) + f % 16;
    k_tile[at] = kq;
    v_tile[at] = vq;
    if (to_cache) {
      k_dst[f] = kq;
      v_dst[f] = vq;
    }
  }
}

// ------------------------------------------------------------------------------------------
// One K/V tile for one warp: S = Q K^T over the warp's keys, mask, online softmax, O += P V
// ------------------------------------------------------------------------------------------

// What a lane needs to mask its two rows (lane_row): key j is visible iff lo[r] <= j < hi[r]
// and, with tree[r] set, j < diag or tree[r][j - diag].
struct RowMask {
  int lo[2], hi[2];
  const uint8_t* tree[2];
  int diag;
};

// Q's MMA fragments, kept in registers when kQInRegs: per k-step the A fragment of the warp's
// 16 rows (row-major), or the B fragment of Q^T's 8 columns (key-major).
template <class Cfg>
using QFrag = uint32_t[Cfg::kQInRegs ? Cfg::kHeadDim / 16 : 1][Cfg::kKeyMajor ? 2 : 4];

// Q's fragment of k-step ks from the shared Q tile. Key-major takes the A fragment's elements
// 0 and 2 (rows 0..7, k slots 2t, 2t+1 and 2t+8, 2t+9), which are the B fragment of Q^T.
template <class Cfg>
__device__ __forceinline__ void load_q_frag(uint32_t (&q)[Cfg::kKeyMajor ? 2 : 4], uint32_t s_q,
                                            const LaneOffsets<Cfg>& lo, int warp_m, int ks,
                                            int lane) {
  uint32_t a[4];
  if constexpr (Cfg::kFp8) {
    load_q_frag_fp8<Cfg>(a, s_q, warp_m, ks, lane);
  } else {
    ldmatrix_x4(a, frag_addr<Cfg, Cfg::kBlockM>(s_q, lo.qv, warp_m, ks));
  }
  if constexpr (Cfg::kKeyMajor) {
    q[0] = a[0];
    q[1] = a[2];
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) q[e] = a[e];
  }
}

// Scores into log2 units (first, so that the scale's sign cannot upset the max), then the
// mask. Element e of score tile i is this lane's row r (lane_row: e >> 1 row-major, e & 1
// key-major) against key key_of(i, e).
template <class Cfg, bool kMask, class KeyOf>
__device__ __forceinline__ void scale_and_mask(float (&s)[Cfg::kSTiles][4], const RowMask& rm,
                                               const float (&scale_log2)[2], KeyOf key_of) {
#pragma unroll
  for (int i = 0; i < Cfg::kSTiles; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = Cfg::kKeyMajor ? e & 1 : e >> 1;
      float x = s[i][e] * scale_log2[r];
      if constexpr (kMask) {
        const int j = key_of(i, e);
        bool visible = j >= rm.lo[r] && j < rm.hi[r];
        // The tree rows are read only for keys of the sequence (j < hi <= seqlen_k), so
        // j - diag < seqlen_q.
        if (visible && rm.tree[r] != nullptr && j >= rm.diag) {
          visible = rm.tree[r][j - rm.diag] != 0;
        }
        if (!visible) x = -INFINITY;
      }
      s[i][e] = x;
    }
  }
}

// Online softmax (base 2) of a tile of scores, P overwriting S, and the rescale of O by the
// moved maxima. A row's scores are spread over the 4 lanes of a quad (row-major) or the 8
// lanes sharing lane % 4 (key-major); each lane keeps its own partial row sums, which add up in
// the epilogue.
template <class Cfg>
__device__ __forceinline__ void online_softmax(float (&s)[Cfg::kSTiles][4],
                                               float (&acc_o)[Cfg::kDTiles][4],
                                               float (&row_max)[2], float (&row_sum)[2]) {
  float correction[2];
  bool max_moved = false;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // Elements (e0, e1) of every tile are this row's.
    const int e0 = Cfg::kKeyMajor ? r : 2 * r, e1 = Cfg::kKeyMajor ? r + 2 : 2 * r + 1;
    float m = row_max[r];
#pragma unroll
    for (int i = 0; i < Cfg::kSTiles; ++i) m = fmaxf(m, fmaxf(s[i][e0], s[i][e1]));
#pragma unroll
    for (int offset = Cfg::kKeyMajor ? 4 : 1; offset < (Cfg::kKeyMajor ? 32 : 4); offset <<= 1)
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    // Until a row has seen a key its max is -inf; shifting by 0 then keeps exp2 at 0 instead of
    // the NaN of (-inf) - (-inf).
    const float shift = m == -INFINITY ? 0.f : m;
    correction[r] = exp2f(row_max[r] - shift);
    max_moved |= m != row_max[r];
    row_max[r] = m;
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < Cfg::kSTiles; ++i) {
      s[i][e0] = exp2f(s[i][e0] - shift);
      s[i][e1] = exp2f(s[i][e1] - shift);
      sum += s[i][e0] + s[i][e1];
    }
    row_sum[r] = row_sum[r] * correction[r] + sum;
  }
  // A max that did not move means a correction of exactly 1: past the first tiles, the common
  // case, so the rescale of O is skipped when no row of the warp moved.
  if (__any_sync(0xffffffffu, max_moved)) {
#pragma unroll
    for (int dn = 0; dn < Cfg::kDTiles; ++dn)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[dn][e] *= correction[Cfg::kKeyMajor ? e & 1 : e >> 1];
  }
}

// Row-major tile: S = Q K^T (16 rows x the warp's kWarpKeys keys, in n8 tiles), softmax,
// O += P V (16 rows x head_dim, in n8 tiles).
template <class Cfg, bool kMask>
__device__ __forceinline__ void attend_tile(float (&acc_o)[Cfg::kDTiles][4], float (&row_max)[2],
                                            float (&row_sum)[2], const QFrag<Cfg>& q_frag,
                                            uint32_t s_q, uint32_t s_k, uint32_t s_v,
                                            const LaneOffsets<Cfg>& lo, int warp_m, int key16,
                                            int key0, const RowMask& rm,
                                            const float (&scale_log2)[2]) {
  using M = typename Cfg::MmaT;
  constexpr int kNT = Cfg::kSTiles;

  // ---- S = Q K^T over keys key0 .. key0 + kWarpKeys - 1 (16-row groups key16 ..) ----
  float s[kNT][4];
#pragma unroll
  for (int nj = 0; nj < kNT; ++nj)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nj][e] = 0.f;
  const int lane = threadIdx.x & 31;
  if constexpr (Cfg::kFp8) {
    // Lane (g, t) reads d/4 contiguous bytes of key g of each n8 tile: every k-step's B
    // fragment (4 bytes each), in the dim order of load_q_frag_fp8.
    constexpr int kWords = Cfg::kHeadDim / 16;
#pragma unroll
    for (int nj = 0; nj < kNT; ++nj) {
      uint32_t kw[kWords];
      load_fp8_bytes<Cfg, Cfg::kHeadDim / 4>(kw, s_k, 16 * key16 + 8 * nj + (lane >> 2),
                                             (Cfg::kHeadDim / 4) * (lane & 3));
#pragma unroll
      for (int ks = 0; ks < kWords; ++ks) {
        uint32_t a[4];
        if constexpr (Cfg::kQInRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[e] = q_frag[ks][e];
        } else {
          load_q_frag_fp8<Cfg>(a, s_q, warp_m, ks, lane);
        }
        uint32_t b0, b1;
        widen4(kw[ks], b0, b1);
        mma_16816<M>(s[nj], a, b0, b1);
      }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < Cfg::kHeadDim / 16; ++ks) {
      uint32_t a[4];
      if constexpr (Cfg::kQInRegs) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] = q_frag[ks][e];
      } else {
        ldmatrix_x4(a, frag_addr<Cfg, Cfg::kBlockM>(s_q, lo.qv, warp_m, ks));
      }
#pragma unroll
      for (int nj = 0; nj < kNT / 2; ++nj) {
        uint32_t bk[4];
        ldmatrix_x4(bk, frag_addr<Cfg, Cfg::kBlockN>(s_k, lo.k, key16 + nj, ks));
        mma_16816<M>(s[2 * nj], a, bk[0], bk[1]);
        mma_16816<M>(s[2 * nj + 1], a, bk[2], bk[3]);
      }
    }
  }

  const int lane_key = key0 + 2 * (lane & 3);
  scale_and_mask<Cfg, kMask>(s, rm, scale_log2,
                             [&](int nj, int e) { return lane_key + nj * 8 + (e & 1); });
  online_softmax<Cfg>(s, acc_o, row_max, row_sum);

  // ---- O += P V: the S accumulators of key tiles 2ks and 2ks + 1 form the A fragment ----
#pragma unroll
  for (int ks = 0; ks < kNT / 2; ++ks) {
    uint32_t a[4];
    a[0] = pack2<M>(s[2 * ks][0], s[2 * ks][1]);
    a[1] = pack2<M>(s[2 * ks][2], s[2 * ks][3]);
    a[2] = pack2<M>(s[2 * ks + 1][0], s[2 * ks + 1][1]);
    a[3] = pack2<M>(s[2 * ks + 1][2], s[2 * ks + 1][3]);
    if constexpr (Cfg::kFp8) {
      // Lane (g, t) reads d/8 contiguous bytes (column g of every O tile, see above) of each of
      // its keys 2t, 2t+1, 2t+8, 2t+9 of the 16-key group.
      constexpr int kBytes = Cfg::kHeadDim / 8;
      const int key = 16 * (key16 + ks) + 2 * (lane & 3);
      const int byte0 = kBytes * (lane >> 2);
      uint32_t v0[kBytes / 4], v1[kBytes / 4], v8[kBytes / 4], v9[kBytes / 4];
      load_fp8_bytes<Cfg, kBytes>(v0, s_v, key, byte0);
      load_fp8_bytes<Cfg, kBytes>(v1, s_v, key + 1, byte0);
      load_fp8_bytes<Cfg, kBytes>(v8, s_v, key + 8, byte0);
      load_fp8_bytes<Cfg, kBytes>(v9, s_v, key + 9, byte0);
#pragma unroll
      for (int dn = 0; dn < Cfg::kDTiles; ++dn) {
        const uint32_t b0 = widen_column(v0[dn / 4], v1[dn / 4], dn % 4);
        const uint32_t b1 = widen_column(v8[dn / 4], v9[dn / 4], dn % 4);
        mma_16816<M>(acc_o[dn], a, b0, b1);
      }
    } else {
#pragma unroll
      for (int dn = 0; dn < Cfg::kHeadDim / 16; ++dn) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, frag_addr<Cfg, Cfg::kBlockN>(s_v, lo.qv, key16 + ks, dn));
        mma_16816<M>(acc_o[2 * dn], a, bv[0], bv[1]);
        mma_16816<M>(acc_o[2 * dn + 1], a, bv[2], bv[3]);
      }
    }
  }
}

// Transposes an 8x8 matrix of 16-bit values held one row pair per lane in MMA fragment order.
__device__ __forceinline__ uint32_t transpose_8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// This lane's offsets in an fp8 K/V tile for the key-major reads of its warp's first 16 keys
// (16 key16 ..): K keys g and g+8 from byte (d/4) t, V keys 2t, 2t+1, 2t+8, 2t+9 from byte
// (d/8) g. Key tile mi of the warp is 16 mi rows, 16 mi d bytes, further on. Computed once per
// CTA: per tile, the swizzle arithmetic cost as many instructions as the reads it addressed.
template <class Cfg>
struct Fp8KeyMajorOffsets {
  static constexpr int kKBytes = Cfg::kHeadDim / 4, kVBytes = Cfg::kHeadDim / 8;
  uint32_t k[2][kFp8Pieces<kKBytes>];
  uint32_t v[4][kFp8Pieces<kVBytes>];

  __device__ __forceinline__ Fp8KeyMajorOffsets(int key16, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h)
      fp8_piece_offsets<Cfg, kKBytes>(k[h], 16 * key16 + g + 8 * h, kKBytes * t);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      fp8_piece_offsets<Cfg, kVBytes>(v[i], 16 * key16 + 2 * t + (i & 1) + 8 * (i >> 1),
                                      kVBytes * g);
    // Opaque to the compiler, which would otherwise recompute them from the thread index in
    // every tile (about 25 instructions a tile at d = 64) rather than keep 6 registers. Only
    // where they are used: the other kernels drop them as dead code.
    if constexpr (Cfg::kKeyMajor && Cfg::kFp8) {
      for (auto& o : k) for (uint32_t& x : o) asm volatile("" : "+r"(x));
      for (auto& o : v) for (uint32_t& x : o) asm volatile("" : "+r"(x));
    }
  }
};

// Key-major tile, for at most 8 packed rows: S^T = K Q^T in m16 tiles of 16 keys (keys on the
// MMA's M side, the rows on its 8 columns), softmax per column, O^T += V^T P^T in m16 tiles of
// 16 dims. Against the row-major tile, whose 16 MMA rows hold at most 8 real ones (4 in GQA
// 32:8, 3 in 9:3), each MMA covers twice the keys or dims, so the tile takes half the MMAs, half
// the softmax work per lane and half the accumulator registers; the K/V reads and the fp8
// conversions are the same. What it adds: one movmatrix per 8 keys, turning P^T's
// accumulators (lane (g, t): keys g, g+8 x rows 2t, 2t+1) into the B fragments of P^T (keys
// 2t, 2t+1, 2t+8, 2t+9 x row g).
//   Fragments, lane (g, t) = (lane / 4, lane % 4):
//   * K, A of S^T: keys g and g+8 of the m16 tile; fp8 in the permuted dim order of the
//     row-major tile (k-step ks, slots 2t, 2t+1, 2t+8, 2t+9 = dims (d/4) t + 4 ks + 0..3), so
//     the lane reads d/4 contiguous bytes of each of its two keys; 16-bit through ldmatrix as
//     Q is read in the row-major tile.
//   * V, A of O^T = V^T P^T (rows = dims): fp8 row g / g+8 of dim tile dm is dim (d/8) g +
//     2 dm / + 1, so the lane reads d/8 contiguous bytes of each of keys 2t, 2t+1, 2t+8, 2t+9
//     (the row-major tile's V reads) and one byte permute pairs two dims of two keys; 16-bit
//     through ldmatrix.trans.
template <class Cfg, bool kMask>
__device__ __forceinline__ void attend_tile_key_major(
    float (&acc_o)[Cfg::kDTiles][4], float (&row_max)[2], float (&row_sum)[2],
    const QFrag<Cfg>& q_frag, uint32_t s_q, uint32_t s_k, uint32_t s_v,
    const LaneOffsets<Cfg>& lo, const Fp8KeyMajorOffsets<Cfg>& fo, int key16, int key0,
    const RowMask& rm, const float (&scale_log2)[2]) {
  using M = typename Cfg::MmaT;
  using Fo = Fp8KeyMajorOffsets<Cfg>;
  constexpr int kMT = Cfg::kSTiles;
  const int lane = threadIdx.x & 31;

  // ---- S^T = K Q^T over keys key0 .. key0 + kWarpKeys - 1 ----
  float s[kMT][4];
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[mi][e] = 0.f;
  constexpr uint32_t kTileShift = 16 * Cfg::kHeadDim;  // bytes of 16 fp8 rows
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
    [[maybe_unused]] uint32_t kw[2][Cfg::kHeadDim / 16];
    if constexpr (Cfg::kFp8) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        load_fp8_pieces<Fo::kKBytes>(kw[h], s_k + mi * kTileShift, fo.k[h]);
      }
    }
#pragma unroll
    for (int ks = 0; ks < Cfg::kHeadDim / 16; ++ks) {
      uint32_t a[4];
      if constexpr (Cfg::kFp8) {
        widen4(kw[0][ks], a[0], a[2]);
        widen4(kw[1][ks], a[1], a[3]);
      } else {
        ldmatrix_x4(a, frag_addr<Cfg, Cfg::kBlockN>(s_k, lo.qv, key16 + mi, ks));
      }
      uint32_t b[2];
      if constexpr (Cfg::kQInRegs) {
        b[0] = q_frag[ks][0];
        b[1] = q_frag[ks][1];
      } else {
        load_q_frag<Cfg>(b, s_q, lo, 0, ks, lane);
      }
      mma_16816<M>(s[mi], a, b[0], b[1]);
    }
  }

  const int lane_key = key0 + (lane >> 2);
  scale_and_mask<Cfg, kMask>(s, rm, scale_log2,
                             [&](int mi, int e) { return lane_key + 16 * mi + 8 * (e >> 1); });
  online_softmax<Cfg>(s, acc_o, row_max, row_sum);

  // ---- O^T += V^T P^T, one k-step per m16 tile of S^T ----
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
    const uint32_t b0 = transpose_8x8(pack2<M>(s[mi][0], s[mi][1]));  // keys 2t, 2t+1 x row g
    const uint32_t b1 = transpose_8x8(pack2<M>(s[mi][2], s[mi][3]));  // keys 2t+8, 2t+9
    if constexpr (Cfg::kFp8) {
      constexpr int kWords = Cfg::kHeadDim / 32;  // d/8 bytes per key
      const uint32_t tile = s_v + mi * kTileShift;
      uint32_t v0[kWords], v1[kWords], v8[kWords], v9[kWords];
      load_fp8_pieces<Fo::kVBytes>(v0, tile, fo.v[0]);
      load_fp8_pieces<Fo::kVBytes>(v1, tile, fo.v[1]);
      load_fp8_pieces<Fo::kVBytes>(v8, tile, fo.v[2]);
      load_fp8_pieces<Fo::kVBytes>(v9, tile, fo.v[3]);
#pragma unroll
      for (int w = 0; w < kWords; ++w) {
        // Bytes 2h, 2h+1 of word w are rows g, g+8 of dim tile 2w + h: byte 2h of keys 2t and
        // 2t+1 interleaved with byte 2h+1 of both, one permute for two fragment registers.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t sel = h == 0 ? 0x5140u : 0x7362u;
          uint32_t a[4];
          widen4(__byte_perm(v0[w], v1[w], sel), a[0], a[1]);
          widen4(__byte_perm(v8[w], v9[w], sel), a[2], a[3]);
          mma_16816<M>(acc_o[2 * w + h], a, b0, b1);
        }
      }
    } else {
#pragma unroll
      for (int dm = 0; dm < Cfg::kDTiles; ++dm) {
        // K's lane pattern (lo.k) orders the four 8x8 matrices as A wants them: keys 0-7 x
        // dims 0-7, keys 0-7 x dims 8-15, keys 8-15 x dims 0-7, keys 8-15 x dims 8-15.
        uint32_t a[4];
        ldmatrix_x4_trans(a, frag_addr<Cfg, Cfg::kBlockN>(s_v, lo.k, key16 + mi, dm));
        mma_16816<M>(acc_o[dm], a, b0, b1);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Split-KV: the last split of a row block folds the partials
// ------------------------------------------------------------------------------------------

// Called by every thread after the CTA wrote its partial rows. Threadfence-reduction pattern:
// each thread's partial stores are made visible device-wide before thread 0 counts the split
// in; the split that brings the count to live_splits is the last, so every other split's
// partials are visible to it, and it reads them from L2 (merge_row's loads bypass L1).
template <class Cfg>
__device__ __forceinline__ void fold_splits_if_last(const DecodeParams& p, int b, int kv_head,
                                                    int m_block, int live_splits, int r0,
                                                    int rows_here, int group) {
  __shared__ int s_is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int m_blocks = gridDim.x / p.num_splits;
    int* counter =
        p.split_counters + (static_cast<int64_t>(b) * p.heads_kv + kv_head) * m_blocks + m_block;
    const bool last = atomicAdd(counter, 1) == live_splits - 1;
    if (last) *counter = 0;  // ready for the next launch or graph replay
    s_is_last = last;
  }
  __syncthreads();
  if (!s_is_last) return;
  __threadfence();
  const merge::SplitStates states{{p.out_part, p.lse_part, p.part_batch_stride,
                                   p.part_row_stride, p.part_head_stride,
                                   p.lse_part_batch_stride, p.lse_part_head_stride},
                                  p.part_split_stride,
                                  p.lse_part_split_stride,
                                  live_splits};
  using T = typename Cfg::T;
  const StateRows<T> out{static_cast<T*>(p.out), p.lse, p.o_batch_stride, p.o_row_stride,
                         p.o_head_stride, p.lse_batch_stride, p.lse_head_stride};
  const int warp = threadIdx.x >> 5;
  for (int row = warp; row < rows_here; row += kWarps) {  // one warp per packed row
    const int packed = r0 + row;
    const int pos = packed / group;
    const int head = kv_head * group + (packed - pos * group);
    merge::merge_row<float, T, Cfg::kHeadDim>(states, out, b, pos, head, threadIdx.x & 31);
  }
}

// ------------------------------------------------------------------------------------------
// The kernel
// ------------------------------------------------------------------------------------------

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    decode_attention_kernel(const __grid_constant__ DecodeParams p) {
  using T = typename Cfg::T;
  constexpr int kBM = Cfg::kBlockM, kBN = Cfg::kBlockN, kStages = Cfg::kStages;
  // The decode layout's warps each read only their own kWarpKeys rows of a K/V tile, so each
  // copies its own rows and waits only for its own copies: four pipelines that drift apart
  // instead of one that waits for its slowest warp at a CTA barrier every tile (that barrier
  // held 36% of the stall samples of a 9:3 batch-1 decode under ncu, session 23).
  constexpr bool kWarpPipeline = Cfg::kWarpsM == 1;
  extern __shared__ __align__(128) unsigned char smem[];

  allow_dependent_launch();
  // q, the new keys in the cache, cache_seqlens and the block table may all come from kernels
  // just before this one (rotary_embedding_and_store_kvcache in a decode step).
  wait_for_prior_grids();
  const int split = blockIdx.x % p.num_splits;
  const int m_block = blockIdx.x / p.num_splits;
  const int kv_head = blockIdx.y;
  const int b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / Cfg::kWarpsN, warp_n = warp % Cfg::kWarpsN;

  const int group = p.heads_q / p.heads_kv;
  const int r0 = m_block * kBM;
  const int rows_here = min(kBM, group * p.seqlen_q - r0);

  // Loads that do not depend on the sequence's length go out before it is read, so that their
  // round trips overlap that read: the CTA's query rows, and for the first split (which starts
  // at page 0 unless a window moves it) the sequence's first block-table entries, staged on
  // speculation and used when the split's pages lie among them. Why: in a single-token decode
  // step the prologue is a chain of dependent DRAM round trips (the kernel before, cuBLAS, does
  // not launch this one early), and the block-table read was its own link after the length.
  const uint32_t s_q = smem_u32(smem);
  int* const staged_pages = reinterpret_cast<int*>(smem + Cfg::kPagesOffset);
  const int speculated_pages =
      p.block_table != nullptr && split == 0 ? min(p.max_blocks, kStagedPages) : 0;
  for (int i = tid; i < speculated_pages; i += Cfg::kThreads) {
    cp_async_4(smem_u32(staged_pages + i),
               p.block_table + static_cast<int64_t>(b) * p.max_blocks + i);
  }
  cp_async_commit();  // the block-table group (empty unless speculated)
  load_q_tile<Cfg>(s_q, p, b, kv_head, group, r0, rows_here, tid);
  cp_async_commit();  // the Q group

  // With a new token, seqlens_k counts the keys before it.
  const int seqlen_k = min(p.seqlens_k[b] + (p.new_k != nullptr ? 1 : 0), p.capacity);
  const int new_pos = p.new_k != nullptr && seqlen_k > 0 ? seqlen_k - 1 : -1;
  const int diag = seqlen_k - p.seqlen_q;  // query position i sits on key i + diag
  const int first_q = r0 / group;
  const int last_q = (r0 + rows_here - 1) / group;

  // Keys any row of the block may see, as whole tiles, and this split's share of them.
  const int key_lo = p.window_left >= 0 ? max(0, first_q + diag - p.window_left) : 0;
  const int key_hi =
      p.window_right >= 0 ? min(seqlen_k, last_q + diag + p.window_right + 1) : seqlen_k;
  const int tile_lo = key_lo / kBN;
  const int num_tiles = key_hi > key_lo ? (key_hi + kBN - 1) / kBN - tile_lo : 0;
  const int per_split = num_tiles <= p.unsplit_tiles
                            ? num_tiles
                            : (num_tiles + p.num_splits - 1) / p.num_splits;
  // Splits holding tiles (at least one, so that a row block without keys is still written).
  // The others have nothing to contribute: they leave at once, and the last live split merges.
  const int live_splits = num_tiles == 0 ? 1 : (num_tiles + per_split - 1) / per_split;
  if (split >= live_splits) {
    cp_async_wait<0>();  // its Q copies: nothing may land in the shared memory of a CTA that left
    return;
  }
  const int t_begin = tile_lo + split * per_split;
  const int t_end = min(t_begin + per_split, tile_lo + num_tiles);

  // The softmax scale in log2 units (times k_scale for fp8), per row of this lane: see
  // rescale_q_to_half.
  float scale_log2[2];
  scale_log2[0] = scale_log2[1] = p.softmax_scale * kLog2e * (Cfg::kFp8 ? *p.k_scale : 1.f);

  const uint32_t s_stages = s_q + Cfg::kQBytes;  // stage s: K at s * kStageBytes, V after it

  float acc_o[Cfg::kDTiles][4];
#pragma unroll
  for (int dn = 0; dn < Cfg::kDTiles; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[dn][e] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  // A split without tiles goes straight to the epilogue: zeros and lse = -inf.
  if (t_begin < t_end) {
    // This lane's two rows and their visible key ranges.
    RowMask rm;
    rm.diag = diag;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = lane_row<Cfg>(warp_m, lane, r);
      const int pos = (r0 + row) / group;
      if (row < rows_here) {
        rm.lo[r] = p.window_left >= 0 ? pos + diag - p.window_left : 0;
        rm.hi[r] = p.window_right >= 0 ? min(seqlen_k, pos + diag + p.window_right + 1)
                                       : seqlen_k;
        rm.tree[r] = p.tree_mask == nullptr
                         ? nullptr
                         : p.tree_mask + (static_cast<int64_t>(b) * p.seqlen_q + pos) * p.seqlen_q;
      } else {  // padding row of the last block: sees nothing and is never stored
        rm.lo[r] = 0;
        rm.hi[r] = 0;
        rm.tree[r] = nullptr;
      }
    }
    const LaneOffsets<Cfg> lo = lane_offsets<Cfg>(lane);
    const int key16 = warp_n * (Cfg::kWarpKeys / 16);  // the warp's keys of every tile
    const Fp8KeyMajorOffsets<Cfg> fp8_offsets(key16, lane);

    // The split's block-table entries, staged in shared memory (PageList): the speculative
    // copy from the start where it covers them, else one round trip while Q lands.
    PageList pages{nullptr, 0};
    if (p.block_table != nullptr) {
      pages.entries = p.block_table + static_cast<int64_t>(b) * p.max_blocks;
      const int first = page_of(p, t_begin * kBN);
      const int count = page_of(p, min(t_end * kBN, seqlen_k) - 1) - first + 1;
      // This thread's speculative copies have landed (the newer Q group may not have). Staging
      // below writes the same entries per thread, so no other thread's copy can race it.
      if (speculated_pages > 0) cp_async_wait<1>();
      if (first == 0 && count <= speculated_pages) {
        __syncthreads();
        pages = {staged_pages, 0};
      } else if (count <= kStagedPages) {
        for (int i = tid; i < count; i += Cfg::kThreads) staged_pages[i] = pages.entries[first + i];
        __syncthreads();
        pages = {staged_pages, first};
      }
    }
    // Prologue: the first kStages - 1 tiles, one commit group each (empty groups keep the count
    // uniform, so cp_async_wait's constant stays right when the split is short).
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (t_begin + s < t_end) {
        const uint32_t st = s_stages + s * Cfg::kStageBytes;
        load_kv_tile<Cfg, kWarpPipeline>(st, st + Cfg::kRawTileBytes, p, pages, b, kv_head,
                                         t_begin + s, seqlen_k, new_pos);
      }
      cp_async_commit();
    }

    QFrag<Cfg> q_frag;
    cp_async_wait<kStages - 1>();  // the Q group
    __syncthreads();
    if (p.rotary_cos != nullptr) {  // (a new token's query: seqlen_q = 1, at new_pos)
      rotate_tile_rows<Cfg, kBM>(smem, 0, rows_here, new_pos, p, tid);
      __syncthreads();
    }
    if constexpr (Cfg::kFp8 && std::is_same_v<T, __nv_bfloat16>) {
      // The stats buffer is free until the epilogue.
      float* s_unscale = reinterpret_cast<float*>(smem + Cfg::kStatsOffset);
      rescale_q_to_half<Cfg>(smem, s_unscale, tid);
      __syncthreads();
#pragma unroll
      for (int r = 0; r < 2; ++r) scale_log2[r] *= s_unscale[lane_row<Cfg>(warp_m, lane, r)];
    }
    if constexpr (Cfg::kQInRegs) {
#pragma unroll
      for (int ks = 0; ks < Cfg::kHeadDim / 16; ++ks) {
        load_q_frag<Cfg>(q_frag[ks], s_q, lo, warp_m, ks, lane);
      }
    }

    int stage = 0;
    for (int t = t_begin; t < t_end; ++t) {
      // Tile t has landed for every thread, and every warp is done with tile t - 1, whose stage
      // the next copies overwrite (with kWarpPipeline: for every lane of the warp, its rows).
      cp_async_wait<kStages - 2>();
      if constexpr (kWarpPipeline) {
        __syncwarp();
      } else {
        __syncthreads();
      }
      {
        const int ahead = t + kStages - 1;
        const int ahead_stage = stage == 0 ? kStages - 1 : stage - 1;
        if (ahead < t_end) {
          const uint32_t st = s_stages + ahead_stage * Cfg::kStageBytes;
          load_kv_tile<Cfg, kWarpPipeline>(st, st + Cfg::kRawTileBytes, p, pages, b, kv_head,
                                           ahead, seqlen_k, new_pos);
        }
        cp_async_commit();
      }
      const uint32_t s_k = s_stages + stage * Cfg::kStageBytes;
      const uint32_t s_v = s_k + Cfg::kRawTileBytes;

      if (new_pos >= 0 && t == new_pos / kBN) {  // the tile holding the new token
        const int row = new_pos - t * kBN;
        unsigned char* k_tile = smem + (s_k - s_q);
        // All threads work on the new row, which one warp copied.
        if constexpr (kWarpPipeline) __syncthreads();
        if constexpr (Cfg::kFp8) {
          quantize_new_row<Cfg>(k_tile, smem + (s_v - s_q), row, p, pages, b, kv_head,
                                new_pos, m_block == 0, tid);
          __syncthreads();
        } else {
          if (p.rotary_cos != nullptr) {
            rotate_tile_rows<Cfg, kBN>(k_tile, row, 1, new_pos, p, tid);
            __syncthreads();
          }
          if (m_block == 0) {
            store_new_row<Cfg>(k_tile, smem + (s_v - s_q), row, p, pages, b, kv_head, new_pos,
                               tid);
          }
          // The row's warp may copy the next tiles into this stage once the others read it.
          if constexpr (kWarpPipeline) __syncthreads();
        }
      }

      // Uniform over the CTA: some (row, key) pair of the tile lies past the sequence end,
      // right of the first row's right bound, left of the last row's left bound, or among the
      // tree keys.
      const int n0 = t * kBN;
      const bool need_mask =
          n0 + kBN > seqlen_k ||
          (p.window_right >= 0 && n0 + kBN - 1 > first_q + diag + p.window_right) ||
          (p.window_left >= 0 && n0 < last_q + diag - p.window_left) ||
          (p.tree_mask != nullptr && n0 + kBN > diag);
      const int key0 = n0 + warp_n * Cfg::kWarpKeys;
      if constexpr (Cfg::kKeyMajor) {
        if (need_mask) {
          attend_tile_key_major<Cfg, true>(acc_o, row_max, row_sum, q_frag, s_q, s_k, s_v, lo,
                                           fp8_offsets, key16, key0, rm, scale_log2);
        } else {
          attend_tile_key_major<Cfg, false>(acc_o, row_max, row_sum, q_frag, s_q, s_k, s_v, lo,
                                            fp8_offsets, key16, key0, rm, scale_log2);
        }
      } else if (need_mask) {
        attend_tile<Cfg, true>(acc_o, row_max, row_sum, q_frag, s_q, s_k, s_v, lo, warp_m, key16,
                               key0, rm, scale_log2);
      } else {
        attend_tile<Cfg, false>(acc_o, row_max, row_sum, q_frag, s_q, s_k, s_v, lo, warp_m,
                                key16, key0, rm, scale_log2);
      }
      stage = stage + 1 == kStages ? 0 : stage + 1;
    }
  }

  // ---- epilogue: merge the warp columns' states, normalise, store ----
  // The buffers below reuse the Q and stage space: wait until no copy or read of it is pending.
  cp_async_wait<0>();
  __syncthreads();
  float* s_o = reinterpret_cast<float*>(smem);  // [kWarpsN][kBM][kOStride]
  float* s_m = reinterpret_cast<float*>(smem + Cfg::kStatsOffset);  // [kWarpsN][kBM], log2 units
  float* s_l = s_m + Cfg::kWarpsN * kBM;                            // [kWarpsN][kBM]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // The lanes sharing the row (see online_softmax) add their partial sums.
    float l = row_sum[r];
#pragma unroll
    for (int offset = Cfg::kKeyMajor ? 4 : 1; offset < (Cfg::kKeyMajor ? 32 : 4); offset <<= 1)
      l += __shfl_xor_sync(0xffffffffu, l, offset);
    if ((Cfg::kKeyMajor ? lane >> 2 : lane & 3) == 0) {
      s_m[warp_n * kBM + lane_row<Cfg>(warp_m, lane, r)] = row_max[r];
      s_l[warp_n * kBM + lane_row<Cfg>(warp_m, lane, r)] = l;
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = lane_row<Cfg>(warp_m, lane, r);
    float top = -INFINITY;
#pragma unroll
    for (int w = 0; w < Cfg::kWarpsN; ++w) top = fmaxf(top, s_m[w * kBM + row]);
    // This warp's weight in the merged row; 0 when it saw no key of the row.
    const float weight = row_max[r] == -INFINITY ? 0.f : exp2f(row_max[r] - top);
    float* o_row = s_o + (warp_n * kBM + row) * Cfg::kOStride;
    if constexpr (Cfg::kKeyMajor && Cfg::kFp8) {
      // Rows g and g+8 of O^T's dim tile dm are dims (d/8) g + 2 dm and + 1 (the fp8 V order
      // of attend_tile_key_major): this lane's d/8 contiguous dims of its row r.
      float* dst = o_row + (Cfg::kHeadDim / 8) * (lane >> 2);
#pragma unroll
      for (int i = 0; i < Cfg::kHeadDim / 8; i += 4) {
        *reinterpret_cast<float4*>(dst + i) =
            make_float4(acc_o[i / 2][r] * weight, acc_o[i / 2][r + 2] * weight,
                        acc_o[i / 2 + 1][r] * weight, acc_o[i / 2 + 1][r + 2] * weight);
      }
    } else if constexpr (Cfg::kKeyMajor) {
      // Rows g and g+8 of O^T's dim tile dm are dims 16 dm + g and + 8.
      float* dst = o_row + (lane >> 2);
#pragma unroll
      for (int dm = 0; dm < Cfg::kDTiles; ++dm) {
        dst[16 * dm] = acc_o[dm][r] * weight;
        dst[16 * dm + 8] = acc_o[dm][r + 2] * weight;
      }
    } else if constexpr (Cfg::kFp8) {
      // Column c of O tile dn is dim (d/8) c + dn (the fp8 V order): this lane's columns 2t and
      // 2t+1 are dims (d/4) t .. (d/4) t + d/4 - 1, the first d/8 from accumulator element
      // 2r of each tile, the next d/8 from element 2r+1.
      constexpr int kHalf = Cfg::kHeadDim / 8;
      float* dst = o_row + (Cfg::kHeadDim / 4) * (lane & 3);
#pragma unroll
      for (int i = 0; i < 2 * kHalf; i += 4) {
        const int e = 2 * r + i / kHalf;
        const int dn = i % kHalf;
        *reinterpret_cast<float4*>(dst + i) =
            make_float4(acc_o[dn][e] * weight, acc_o[dn + 1][e] * weight,
                        acc_o[dn + 2][e] * weight, acc_o[dn + 3][e] * weight);
      }
    } else {
      float* dst = o_row + 2 * (lane & 3);
#pragma unroll
      for (int dn = 0; dn < Cfg::kDTiles; ++dn) {
        *reinterpret_cast<float2*>(dst + dn * 8) =
            make_float2(acc_o[dn][2 * r] * weight, acc_o[dn][2 * r + 1] * weight);
      }
    }
  }
  __syncthreads();

  const float v_scale = Cfg::kFp8 ? *p.v_scale : 1.f;
  // One live split writes the result itself; several write partials for the last to merge.
  const bool partial = live_splits > 1;
  constexpr int kQuads = Cfg::kHeadDim / 4;  // 4 output values per thread and step
#pragma unroll
  for (int i = 0; i < (kBM * kQuads + Cfg::kThreads - 1) / Cfg::kThreads; ++i) {
    const int idx = i * Cfg::kThreads + tid;
    const int row = idx / kQuads;
    const int col = (idx % kQuads) * 4;
    if (row >= rows_here) continue;
    float top = -INFINITY;
#pragma unroll
    for (int w = 0; w < Cfg::kWarpsN; ++w) top = fmaxf(top, s_m[w * kBM + row]);
    float total = 0.f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < Cfg::kWarpsN; ++w) {
      const float m = s_m[w * kBM + row];
      if (m != -INFINITY) total += s_l[w * kBM + row] * exp2f(m - top);
      const float4 part =
          *reinterpret_cast<const float4*>(s_o + (w * kBM + row) * Cfg::kOStride + col);
      o.x += part.x;
      o.y += part.y;
      o.z += part.z;
      o.w += part.w;
    }
    // total == 0 only for a row that saw no key: zeros and lse = -inf.
    const float inv = total > 0.f ? v_scale / total : 0.f;
    const float lse = total > 0.f ? (top + __log2f(total)) * kLn2 : -INFINITY;
    const int packed = r0 + row;
    const int pos = packed / group;
    const int head = kv_head * group + (packed - pos * group);
    if (partial) {
      // The fold never reads the partial output of a row that saw no key (lse = -inf):
      // empty splits, common when the split count was planned for the cache's capacity, store
      // only their lse.
      if (total > 0.f) {
        float* dst = p.out_part + split * p.part_split_stride + b * p.part_batch_stride +
                     pos * p.part_row_stride + head * p.part_head_stride + col;
        *reinterpret_cast<float4*>(dst) =
            make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
      }
      if (col == 0) {
        p.lse_part[split * p.lse_part_split_stride + b * p.lse_part_batch_stride +
                   head * p.lse_part_head_stride + pos] = lse;
      }
    } else {
      T* dst = static_cast<T*>(p.out) + b * p.o_batch_stride + pos * p.o_row_stride +
               head * p.o_head_stride + col;
      uint2 packed2;
      packed2.x = pack2<T>(o.x * inv, o.y * inv);
      packed2.y = pack2<T>(o.z * inv, o.w * inv);
      *reinterpret_cast<uint2*>(dst) = packed2;
      if (col == 0) p.lse[b * p.lse_batch_stride + head * p.lse_head_stride + pos] = lse;
    }
  }
  if (partial) {
    fold_splits_if_last<Cfg>(p, b, kv_head, m_block, live_splits, r0, rows_here, group);
  }
}

// ------------------------------------------------------------------------------------------
// Launch
// ------------------------------------------------------------------------------------------

template <class Cfg>
void launch_decode_attention(const DecodeParams& p, cudaStream_t stream) {
  opt_in_dynamic_smem<decode_attention_kernel<Cfg>>(Cfg::kSmemBytes, [] {
    return "flash_attn_with_kvcache: head_dim " + std::to_string(Cfg::kHeadDim);
  });
  const int64_t rows = static_cast<int64_t>(p.heads_q / p.heads_kv) * p.seqlen_q;
  const int64_t m_blocks = (rows + Cfg::kBlockM - 1) / Cfg::kBlockM;
  const dim3 grid(static_cast<unsigned>(m_blocks * p.num_splits), p.heads_kv, p.batch);
  launch_with_pdl(decode_attention_kernel<Cfg>, grid, Cfg::kThreads, Cfg::kSmemBytes, stream,
                  "decode_attention_kernel", p);
}

// The decode layout (key-major or row-major) with its wide tiles where they differ from its
// narrow ones.
template <typename T, int kHeadDim, bool kFp8, bool kKeyMajor>
void run_decode_layout(const DecodeParams& p, cudaStream_t stream) {
  if constexpr (decode_block_n(kHeadDim, kFp8, true) != decode_block_n(kHeadDim, kFp8, false)) {
    if (p.wide_tiles) {
      launch_decode_attention<DecodeConfig<T, kHeadDim, 1, kFp8, true, kKeyMajor>>(p, stream);
      return;
    }
  }
  launch_decode_attention<DecodeConfig<T, kHeadDim, 1, kFp8, false, kKeyMajor>>(p, stream);
}

// Instantiates the warp layouts for one head dim, q dtype and cache kind.
template <typename T, int kHeadDim, bool kFp8>
void run_decode(const DecodeParams& p, cudaStream_t stream) {
  const int packed_rows = p.heads_q / p.heads_kv * p.seqlen_q;
  if constexpr (!kFp8 || kHeadDim % 64 == 0) {
    if (packed_rows <= kKeyMajorRows) {
      run_decode_layout<T, kHeadDim, kFp8, true>(p, stream);
      return;
    }
  }
  if (decode_warps_m(packed_rows) == 1) {
    run_decode_layout<T, kHeadDim, kFp8, false>(p, stream);
  } else {
    launch_decode_attention<DecodeConfig<T, kHeadDim, kWarps, kFp8>>(p, stream);
  }
}

template <int kHeadDim>
void run_decode_hdim(const DecodeParams& p, int dtype, bool fp8, cudaStream_t stream) {
  EMBER_DISPATCH_HALF_TYPES(dtype, "flash_attn_with_kvcache", [&] {
    if (fp8) {
      run_decode<scalar_t, kHeadDim, true>(p, stream);
    } else {
      run_decode<scalar_t, kHeadDim, false>(p, stream);
    }
  });
}

}  // namespace decode
}  // namespace ember
