#pragma once
#include <cstdint>

namespace ember {

// Asks the L2 cache for the first `prefix_bytes` of each of `rows` rows starting at `base`,
// `pitch` bytes apart, and returns without waiting for them: a hint, with no result. Under
// programmatic dependent launch it is issued while the kernel before it still runs. base and
// pitch are multiples of 16 bytes; prefix_bytes is a positive multiple of 16, at most the pitch
// when rows > 1.
void prefetch_l2(const void* base, int64_t rows, int64_t pitch, int64_t prefix_bytes,
                 std::intptr_t stream);

}  // namespace ember
