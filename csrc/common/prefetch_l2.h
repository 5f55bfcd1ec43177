// Requests into L2 of the leading bytes of a constant matrix's rows, made by a kernel for a later
// kernel that streams the matrix (see csrc/copy/prefetch_l2.cu for why): what to request, and
// its host-side check. The device side is common/prefetch_l2.cuh.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ember {

// The rows a kernel asks L2 for: the first `bytes` of each of `rows` rows, `pitch` bytes apart.
// base, pitch and bytes are multiples of 16; rows == 0 asks for nothing.
struct L2PrefetchRows {
  const void* base;
  int64_t rows, pitch;
  uint32_t bytes;
};

// The request, checked on the host: std::invalid_argument naming `op` unless base and pitch are
// multiples of 16 bytes and bytes is a positive multiple of 16 within a row.
inline L2PrefetchRows l2_prefetch_rows(const char* op, const void* base, int64_t rows,
                                       int64_t pitch, int64_t bytes) {
  if (reinterpret_cast<std::uintptr_t>(base) % 16 != 0 || pitch % 16 != 0) {
    throw std::invalid_argument(std::string("ember: ") + op +
                                ": the prefetched rows must start on 16-byte boundaries");
  }
  if (bytes <= 0 || bytes % 16 != 0 || bytes >= (int64_t{1} << 31) ||
      (rows > 1 && bytes > pitch)) {
    throw std::invalid_argument(std::string("ember: ") + op +
                                ": the prefetched bytes per row must be a positive multiple of "
                                "16 within a row, got " + std::to_string(bytes));
  }
  return {base, rows < 0 ? 0 : rows, pitch, static_cast<uint32_t>(bytes)};
}

}  // namespace ember
