// Python bindings of the copy family (see csrc/bindings.cpp for the conventions).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <vector>

#include "common/binding_args.h"
#include "copy/multi_copy.h"
#include "copy/prefetch_l2.h"

namespace py = pybind11;
using std::intptr_t;

namespace ember {

void bind_copy(py::module_& m) {
  m.def(
      "multi_copy",
      [](const std::vector<std::vector<int64_t>>& regions, intptr_t stream) {
        // Each region: dst, src, rows, row_bytes, dst_pitch, src_pitch (bytes), dst_on_host,
        // src_on_host.
        MultiCopyParams p{};
        if (regions.size() > static_cast<size_t>(kMaxCopyRegions)) {
          throw std::invalid_argument("ember: multi_copy: too many regions for one launch");
        }
        for (const auto& r : regions) {
          if (r.size() != 8) throw std::invalid_argument("ember: multi_copy: bad region");
          p.regions[p.count++] = CopyRegion{ptr_arg<void>(r[0]), ptr_arg<const void>(r[1]),
                                            r[2], r[3], r[4], r[5], r[6] != 0, r[7] != 0};
        }
        multi_copy(p, stream);
      },
      "copy regions [(dst, src, rows, row_bytes, dst_pitch, src_pitch, dst_on_host, "
      "src_on_host)] in one kernel (raw pointers; use ember.ops.multi_copy)");
  m.def(
      "prefetch_l2",
      [](intptr_t base, int64_t rows, int64_t pitch, int64_t prefix_bytes, intptr_t stream) {
        prefetch_l2(ptr_arg<const void>(base), rows, pitch, prefix_bytes, stream);
      },
      "request the first prefix_bytes of each row into L2 (raw pointers; use "
      "ember.ops.prefetch_l2)");
}

}  // namespace ember
