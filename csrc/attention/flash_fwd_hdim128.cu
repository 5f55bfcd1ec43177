// FlashAttention-2 forward, head_dim 128: tile choice and instantiation (fp16, bf16).
//
// 128 x 48 tiles, 4 warps of 32 Q rows each; Q fragments re-read from shared memory per K tile.
// 32 rows per warp halve the shared-memory bytes per MMA compared with 16 (each K/V fragment
// feeds two MMAs). The O accumulator alone is 128 floats per thread: FlashAttention-2's 128 x 64
// (S = 64 floats) needs a few more than 255 registers and spills (here too, 40 bytes), while
// 48-key tiles (S = 48 floats) fit in 255 with no spill. Shared memory: Q 32 KB + 2 stages x
// (K 12 KB + V 12 KB) = 80 KB, so two CTAs fit an H100 SM (two on an A100 as well).
#include "attention/flash_fwd_kernel.cuh"

namespace ember {

void run_flash_fwd_hdim128(const FlashFwdParams& p, int dtype, cudaStream_t stream) {
  EMBER_DISPATCH_HALF_TYPES(dtype, "flash_attn", [&] {
    flash::launch_flash_fwd<flash::FwdConfig<scalar_t, 128, 128, 48, 4, false>>(p, stream);
  });
}

}  // namespace ember
