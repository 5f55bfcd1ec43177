// Python bindings of the GEMM family (see csrc/bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include "common/binding_args.h"
#include "gemm/skinny_gemm.h"

namespace py = pybind11;
using std::intptr_t;

namespace ember {

void bind_gemm(py::module_& m) {
  m.def(
      "skinny_gemm",
      [](intptr_t x, intptr_t weight, intptr_t bias, intptr_t y, int64_t rows, int64_t n,
         int64_t k, int64_t x_row_stride, bool silu_and_mul, bool static_weight, int num_sms,
         int dtype, intptr_t stream) {
        SkinnyGemmParams p{};
        p.x = ptr_arg<const void>(x);
        p.weight = ptr_arg<const void>(weight);
        p.bias = ptr_arg<const void>(bias);
        p.y = ptr_arg<void>(y);
        p.m = rows;
        p.n = n;
        p.k = k;
        p.x_row_stride = x_row_stride;
        p.silu_and_mul = silu_and_mul;
        p.static_weight = static_weight;
        skinny_gemm(p, num_sms, dtype, stream);
      },
      "y = x @ weight^T (+ bias) for 1..16 rows of x, bias 0 for none (raw pointers; use "
      "ember.ops.skinny_linear)");
}

}  // namespace ember
