// FlashAttention-2 forward, head_dim 64: tile choice and instantiation (fp16, bf16).
//
// 128 x 64 tiles, 4 warps of 32 Q rows each, Q fragments held in registers (32 of them).
// 32 rows per warp let every K/V fragment read from shared memory feed two MMAs; with O and S
// at 64 floats each per thread there is room for Q, which saves re-reading it per K tile.
// Shared memory: Q 16 KB + 2 stages x (K 8 KB + V 8 KB) = 48 KB.
#include "attention/flash_fwd_kernel.cuh"

namespace ember {

void run_flash_fwd_hdim64(const FlashFwdParams& p, int dtype, cudaStream_t stream) {
  EMBER_DISPATCH_HALF_TYPES(dtype, "flash_attn", [&] {
    flash::launch_flash_fwd<flash::FwdConfig<scalar_t, 64, 128, 64, 4, true>>(p, stream);
  });
}

}  // namespace ember
