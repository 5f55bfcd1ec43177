// flash_attn_fwd: checks the launch-level arguments and dispatches on the head dim.
#include <stdexcept>
#include <string>

#include "attention/flash_fwd.h"
#include "common/common.h"

namespace ember {

void flash_attn_fwd(const FlashFwdParams& p, int dtype, std::intptr_t stream) {
  // Python validates shapes and values; these guard the kernel's own assumptions.
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) {
    throw std::invalid_argument("ember: flash_attn: heads_q (" + std::to_string(p.heads_q) +
                                ") must be a multiple of heads_kv (" +
                                std::to_string(p.heads_kv) + ")");
  }
  // Heads and sequences index grid.y and grid.z.
  if (p.heads_q > 65535 || p.batch > 65535) {
    throw std::invalid_argument("ember: flash_attn: at most 65535 heads and 65535 sequences");
  }
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) {
    throw std::invalid_argument("ember: flash_attn: cu_seqlens_q and cu_seqlens_k go together");
  }
  const cudaStream_t s = as_stream(stream);
  switch (p.head_dim) {
    case 64: run_flash_fwd_hdim64(p, dtype, s); break;
    case 96: run_flash_fwd_hdim96(p, dtype, s); break;
    case 128: run_flash_fwd_hdim128(p, dtype, s); break;
    case 256: run_flash_fwd_hdim256(p, dtype, s); break;
    default:
      throw std::invalid_argument("ember: flash_attn: head_dim must be 64, 96, 128 or 256, got " +
                                  std::to_string(p.head_dim));
  }
}

}  // namespace ember
