// merge_attn_states: the fold of two attention states by their log-sum-exp (merge_row.cuh),
// one warp per (token, head) row.
#include <stdexcept>
#include <string>

#include "common/common.h"
#include "decode/decode_attention.h"
#include "decode/merge_row.cuh"

namespace ember {
namespace {

using merge::PairStates;

constexpr int kWarpsPerBlock = 4;

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    merge_states_kernel(const PairStates<T> states, const StateRows<T> out, int positions,
                        int heads, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  // Rows run over (batch, position, head), head fastest: consecutive warps write consecutive
  // heads of one position.
  const int head = static_cast<int>(row % heads);
  const int64_t rest = row / heads;
  const int pos = static_cast<int>(rest % positions);
  merge::merge_row<T, T, kHeadDim>(states, out, rest / positions, pos, head, threadIdx.x & 31);
}

template <typename T>
void launch_merge(const PairStates<T>& states, const StateRows<T>& out, int batch, int positions,
                  int heads, int head_dim, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(batch) * positions * heads;
  if (rows == 0) return;
  const dim3 grid(grid_x((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, "merge_attn_states"));
  constexpr int kThreads = kWarpsPerBlock * 32;
  const auto launch = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(states, out, positions, heads, rows);
  };
  switch (head_dim) {
    case 64: launch(merge_states_kernel<T, 64>); break;
    case 96: launch(merge_states_kernel<T, 96>); break;
    case 128: launch(merge_states_kernel<T, 128>); break;
    case 256: launch(merge_states_kernel<T, 256>); break;
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
    launch_merge<scalar_t>(states, typed<scalar_t>(out), batch, positions, heads, head_dim,
                           as_stream(stream));
  });
}

}  // namespace ember
