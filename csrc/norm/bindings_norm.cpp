// Python bindings of the norm family (see csrc/bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include "common/binding_args.h"
#include "norm/norm.h"

namespace py = pybind11;
using std::intptr_t;

namespace ember {

void bind_norm(py::module_& m) {
  m.def(
      "rms_norm",
      [](intptr_t x, intptr_t weight, intptr_t out, int64_t rows, int64_t hidden,
         int64_t x_row_stride, double eps, int dtype, intptr_t stream) {
        RmsNormParams p{};
        p.x = ptr_arg<const void>(x);
        p.weight = ptr_arg<const void>(weight);
        p.out = ptr_arg<void>(out);
        p.rows = rows;
        p.hidden = hidden;
        p.x_row_stride = x_row_stride;
        p.eps = static_cast<float>(eps);
        rms_norm(p, dtype, stream);
      },
      "RMSNorm of [rows, hidden] into a dense out (raw pointers; use ember.ops.rms_norm)");

  m.def(
      "fused_add_rms_norm",
      [](intptr_t x, intptr_t residual, intptr_t weight, intptr_t out, intptr_t residual_out,
         int64_t rows, int64_t hidden, int64_t x_row_stride, int64_t residual_row_stride,
         double eps, int dtype, intptr_t stream) {
        RmsNormParams p{};
        p.x = ptr_arg<const void>(x);
        p.residual = ptr_arg<const void>(residual);
        p.weight = ptr_arg<const void>(weight);
        p.out = ptr_arg<void>(out);
        p.residual_out = ptr_arg<void>(residual_out);
        p.rows = rows;
        p.hidden = hidden;
        p.x_row_stride = x_row_stride;
        p.residual_row_stride = residual_row_stride;
        p.eps = static_cast<float>(eps);
        rms_norm(p, dtype, stream);
      },
      "residual_out = x + residual, out = RMSNorm(residual_out), both dense (raw pointers; "
      "use ember.ops.fused_add_rms_norm)");
}

}  // namespace ember
