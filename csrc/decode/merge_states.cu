// Merging attention states by their log-sum-exp: the split-KV combine of
// flash_attn_with_kvcache and the public merge_attn_states share one kernel.
//
// States (o_s, lse_s) of the same query row over disjoint key sets merge into the attention over
// their union: lse = log(sum_s exp(lse_s)) and o = sum_s exp(lse_s - lse) * o_s. A state with
// lse = -inf saw no key and weighs nothing; a row whose states are all empty comes out as zeros
// with lse = -inf.
//
// Traffic: every state read once and the result written once, (S + 1) * head_dim values per row:
// memory-bound, and small next to the K/V reads of the attention it finishes. One warp per row;
// lane l handles columns l, l + 32, ..., so each load instruction of a warp covers a contiguous
// run of the row whatever the tensor's alignment.
#include <stdexcept>
#include <string>

#include "common/common.h"
#include "decode/decode_attention.h"

namespace ember {
namespace {

constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The kernel's two sources of states.
struct SplitStates {  // float32 partials of the split-KV attention, one state per split
  StateRows<const float> first;
  int64_t o_split_stride, lse_split_stride;
  int count;
  __device__ __forceinline__ int size() const { return count; }
  __device__ __forceinline__ StateRows<const float> state(int s) const {
    StateRows<const float> r = first;
    r.o += s * o_split_stride;
    r.lse += s * lse_split_stride;
    return r;
  }
};

template <typename T>
struct PairStates {  // merge_attn_states' two inputs
  StateRows<const T> a, b;
  __device__ __forceinline__ int size() const { return 2; }
  __device__ __forceinline__ StateRows<const T> state(int s) const { return s == 0 ? a : b; }
};

template <typename TIn, typename TOut, int kHeadDim, class States>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    merge_states_kernel(const States states, const StateRows<TOut> out, int positions, int heads,
                        int64_t rows) {
  constexpr int kPerLane = kHeadDim / 32;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  // Rows run over (batch, position, head), head fastest: consecutive warps write consecutive
  // heads of one position.
  const int head = static_cast<int>(row % heads);
  const int64_t rest = row / heads;
  const int pos = static_cast<int>(rest % positions);
  const int64_t b = rest / positions;

  // Each state's load is a round trip to L2 (the split partials were just written); a loop that
  // waits for one state before asking for the next pays that latency once per state, which at
  // 32 splits cost more than the whole K/V stream of a 4k-key decode. So the loads are issued
  // in batches: first the lse of 32 states per warp load (lane l reads state s0 + l) for the
  // common maximum, then kBatch states' rows at a time, all in flight together.
  const int count = states.size();
  float top = -INFINITY;
  for (int s0 = 0; s0 < count; s0 += 32) {
    const int s = s0 + lane;
    if (s < count) {
      const StateRows<const TIn> st = states.state(s);
      top = fmaxf(top, st.lse[b * st.lse_batch_stride + head * st.lse_head_stride + pos]);
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));

  // About 32 row values per lane in flight per batch.
  constexpr int kBatch = kPerLane >= 32 ? 1 : 32 / kPerLane;
  float sum = 0.f;  // sum of exp(lse_s - top)
  float acc[kPerLane] = {};
  for (int s0 = 0; s0 < count; s0 += kBatch) {
    float lse[kBatch];
    float v[kBatch][kPerLane];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      lse[u] = -INFINITY;  // past the last state: no weight
      if (s0 + u < count) {
        const StateRows<const TIn> st = states.state(s0 + u);
        lse[u] = st.lse[b * st.lse_batch_stride + head * st.lse_head_stride + pos];
        const TIn* o =
            st.o + b * st.o_batch_stride + pos * st.o_row_stride + head * st.o_head_stride;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) v[u][i] = to_float(o[lane + 32 * i]);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      // An empty state (lse = -inf) weighs nothing and its o is not read into the sum (it may
      // hold anything). top is finite whenever some state is not empty.
      if (lse[u] != -INFINITY) {
        const float weight = __expf(lse[u] - top);
        sum += weight;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) acc[i] = fmaf(weight, v[u][i], acc[i]);
      }
    }
  }

  const bool seen = sum > 0.f;
  const float inv = seen ? 1.f / sum : 0.f;
  TOut* dst = out.o + b * out.o_batch_stride + pos * out.o_row_stride + head * out.o_head_stride;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) dst[lane + 32 * i] = from_float<TOut>(acc[i] * inv);
  if (lane == 0) {
    out.lse[b * out.lse_batch_stride + head * out.lse_head_stride + pos] =
        seen ? top + __logf(sum) : -INFINITY;
  }
}

template <typename TIn, typename TOut, class States>
void launch_merge(const States& states, const StateRows<TOut>& out, int batch, int positions,
                  int heads, int head_dim, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(batch) * positions * heads;
  if (rows == 0) return;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) throw std::invalid_argument("ember: merge_attn_states: too many rows");
  const dim3 grid(static_cast<unsigned>(blocks));
  constexpr int kThreads = kWarpsPerBlock * 32;
  const auto launch = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(states, out, positions, heads, rows);
  };
  switch (head_dim) {
    case 64: launch(merge_states_kernel<TIn, TOut, 64, States>); break;
    case 96: launch(merge_states_kernel<TIn, TOut, 96, States>); break;
    case 128: launch(merge_states_kernel<TIn, TOut, 128, States>); break;
    case 256: launch(merge_states_kernel<TIn, TOut, 256, States>); break;
    default:
      throw std::invalid_argument(
          "ember: merge_attn_states: head_dim must be 64, 96, 128 or 256, got " +
          std::to_string(head_dim));
  }
  check_launch("merge_states_kernel");
}

template <typename T>
StateRows<const T> typed(const StateRows<const void>& r) {
  return {static_cast<const T*>(r.o), r.lse, r.o_batch_stride, r.o_row_stride, r.o_head_stride,
          r.lse_batch_stride, r.lse_head_stride};
}

template <typename T>
StateRows<T> typed(const StateRows<void>& r) {
  return {static_cast<T*>(r.o), r.lse, r.o_batch_stride, r.o_row_stride, r.o_head_stride,
          r.lse_batch_stride, r.lse_head_stride};
}

}  // namespace

void merge_attn_states(const StateRows<const void>& a, const StateRows<const void>& b,
                       const StateRows<void>& out, int batch, int positions, int heads,
                       int head_dim, int dtype, std::intptr_t stream) {
  EMBER_DISPATCH_HALF_TYPES(dtype, "merge_attn_states", [&] {
    const PairStates<scalar_t> states{typed<scalar_t>(a), typed<scalar_t>(b)};
    launch_merge<scalar_t, scalar_t>(states, typed<scalar_t>(out), batch, positions, heads,
                                     head_dim, as_stream(stream));
  });
}

void combine_splits(const DecodeParams& p, int dtype, cudaStream_t stream) {
  const SplitStates states{{p.out_part, p.lse_part, p.part_batch_stride, p.part_row_stride,
                            p.part_head_stride, p.lse_part_batch_stride,
                            p.lse_part_head_stride},
                           p.part_split_stride,
                           p.lse_part_split_stride,
                           p.num_splits};
  const StateRows<void> out{p.out, p.lse, p.o_batch_stride, p.o_row_stride, p.o_head_stride,
                            p.lse_batch_stride, p.lse_head_stride};
  EMBER_DISPATCH_HALF_TYPES(dtype, "flash_attn_with_kvcache", [&] {
    launch_merge<float, scalar_t>(states, typed<scalar_t>(out), p.batch, p.seqlen_q, p.heads_q,
                                  p.head_dim, stream);
  });
}

}  // namespace ember
