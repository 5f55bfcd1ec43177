// ember._C: the pybind11 module. Each op family registers its own functions from a
// bind_<family>() in its folder, so families never edit each other's files.
//
// Every binding takes device pointers, sizes, strides (in elements), dtype codes and the CUDA
// stream as integers; python/ember/ops validates tensors before calling in. Nothing here
// links libtorch.
#include <pybind11/pybind11.h>

namespace ember {
void bind_kvcache(pybind11::module_& m);
void bind_attention(pybind11::module_& m);
void bind_decode(pybind11::module_& m);
void bind_norm(pybind11::module_& m);
void bind_rotary(pybind11::module_& m);
void bind_activation(pybind11::module_& m);
void bind_gemm(pybind11::module_& m);
void bind_copy(pybind11::module_& m);
}  // namespace ember

PYBIND11_MODULE(_C, m) {
  m.doc() = "ember CUDA kernels (raw-pointer bindings; use ember.ops instead)";
  ember::bind_kvcache(m);
  ember::bind_attention(m);
  ember::bind_decode(m);
  ember::bind_norm(m);
  ember::bind_rotary(m);
  ember::bind_activation(m);
  ember::bind_gemm(m);
  ember::bind_copy(m);
}
