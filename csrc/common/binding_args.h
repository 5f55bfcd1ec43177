// Helpers shared by the csrc/<family>/bindings_*.cpp files: Python passes device pointers as
// integers and strides (in elements) as tuples.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace ember {

template <typename T>
inline T* ptr_arg(std::intptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline int64_t stride_arg(const pybind11::tuple& strides, int i) {
  return strides[i].cast<int64_t>();
}

}  // namespace ember
