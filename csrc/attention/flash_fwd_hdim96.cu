// FlashAttention-2 forward, head_dim 96: tile choice and instantiation (fp16, bf16).
//
// 128 x 64 tiles, 4 warps of 32 Q rows each; Q fragments re-read from shared memory per K tile
// (O 96 + S 64 floats per thread leave no room for 48 Q registers). Shared memory:
// Q 24 KB + 2 stages x (K 12 KB + V 12 KB) = 72 KB.
#include "attention/flash_fwd_kernel.cuh"

namespace ember {

void run_flash_fwd_hdim96(const FlashFwdParams& p, int dtype, cudaStream_t stream) {
  EMBER_DISPATCH_HALF_TYPES(dtype, "flash_attn", [&] {
    flash::launch_flash_fwd<flash::FwdConfig<scalar_t, 96, 128, 64, 4, false>>(p, stream);
  });
}

}  // namespace ember
