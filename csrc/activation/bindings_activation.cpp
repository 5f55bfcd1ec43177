// Python bindings of the activation family (see csrc/bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include "activation/activation.h"
#include "common/binding_args.h"

namespace py = pybind11;
using std::intptr_t;

namespace ember {

void bind_activation(py::module_& m) {
  m.def(
      "silu_and_mul",
      [](intptr_t x, intptr_t out, int64_t rows, int64_t inner, int64_t x_row_stride, int dtype,
         intptr_t stream) {
        SiluAndMulParams p{};
        p.x = ptr_arg<const void>(x);
        p.out = ptr_arg<void>(out);
        p.rows = rows;
        p.inner = inner;
        p.x_row_stride = x_row_stride;
        silu_and_mul(p, dtype, stream);
      },
      "silu(gate) * up of [rows, 2 * inner] into a dense out (raw pointers; use "
      "ember.ops.silu_and_mul)");
}

}  // namespace ember
