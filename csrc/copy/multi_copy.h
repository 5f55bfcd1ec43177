#pragma once
#include <cstdint>

namespace ember {

// One copy of multi_copy: `rows` rows of `row_bytes` bytes, rows `dst_pitch` / `src_pitch`
// bytes apart. A pointer is device memory or pinned host memory (flagged *_on_host).
struct CopyRegion {
  void* dst;
  const void* src;
  int64_t rows, row_bytes, dst_pitch, src_pitch;
  bool dst_on_host, src_on_host;
};

constexpr int kMaxCopyRegions = 8;

struct MultiCopyParams {
  CopyRegion regions[kMaxCopyRegions];
  int count;  // 1..kMaxCopyRegions
};

// Every region's bytes copied by one kernel; regions must not overlap one another's
// destinations or a destination and a source.
void multi_copy(MultiCopyParams p, std::intptr_t stream);

}  // namespace ember
