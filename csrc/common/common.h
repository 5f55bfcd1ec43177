// Shared helpers for ember's CUDA kernels: dtype codes (kept in sync with
// python/ember/ops/_ext.py), error checking and dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace ember {

// Dtype codes passed from Python as integers. Must match DTYPE_CODES in _ext.py.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat8E4M3 = 3 };

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("ember: ") + what + ": " + cudaGetErrorString(err));
  }
}

// Call after every launch: reports bad launch configurations at the call site.
inline void check_launch(const char* kernel_name) {
  check_cuda(cudaGetLastError(), kernel_name);
}

// A grid dimension of `count` blocks; CUDA's x dimension holds at most 2^31 - 1, and a silent
// truncation would skip work.
inline unsigned grid_x(int64_t count, const char* op) {
  if (count > 0x7fffffff) {
    throw std::invalid_argument(std::string("ember: ") + op + ": " + std::to_string(count) +
                                " blocks exceed the grid limit of 2^31 - 1");
  }
  return static_cast<unsigned>(count);
}

// The current device's index.
inline int current_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// The current device's compute capability major version, looked up once per device (of the
// first 64).
inline int current_device_cc_major() {
  static int major_of[64] = {};  // 0: not looked up yet
  const int device = current_device();
  if (device < 64 && major_of[device] != 0) return major_of[device];
  int major = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
             "cudaDeviceGetAttribute");
  if (device < 64) major_of[device] = major;
  return major;
}

// Opts Kernel in to `bytes` of dynamic shared memory, which past 48 KB is needed per kernel and
// device; done once for each (Kernel, device) of the first 64. If the device allows less, throws
// std::invalid_argument: "ember: <describe()> needs <bytes> bytes of shared memory per block;
// this GPU allows <limit>" (describe() is only called then).
template <auto Kernel, typename Describe>
void opt_in_dynamic_smem(int bytes, Describe&& describe) {
  if (bytes <= 48 * 1024) return;
  static std::atomic<uint64_t> configured{0};
  const int device = current_device();
  const uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
  if (bit != 0 && (configured.load(std::memory_order_relaxed) & bit)) return;
  int limit = 0;
  check_cuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");
  if (bytes > limit) {
    throw std::invalid_argument("ember: " + std::string(describe()) + " needs " +
                                std::to_string(bytes) +
                                " bytes of shared memory per block; this GPU allows " +
                                std::to_string(limit));
  }
  check_cuda(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
             "cudaFuncSetAttribute");
  configured.fetch_or(bit, std::memory_order_relaxed);
}

inline cudaStream_t as_stream(std::intptr_t stream) {
  return reinterpret_cast<cudaStream_t>(stream);
}

[[noreturn]] inline void unsupported_dtype(const char* op, int code) {
  throw std::invalid_argument(std::string("ember: ") + op + ": unsupported dtype code " +
                              std::to_string(code));
}

// Calls f(std::true_type{}) or f(std::false_type{}): turns a runtime flag into a template
// argument (`decltype(flag)::value` inside f), so that each kernel variant is compiled apart.
template <typename F>
inline void dispatch_bool(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace ember

// Expands BODY with `scalar_t` bound to the 16-bit float type of CODE.
#define EMBER_DISPATCH_HALF_TYPES(CODE, OP_NAME, ...)                    \
  [&] {                                                                  \
    switch (static_cast<::ember::DType>(CODE)) {                         \
      case ::ember::DType::kFloat16: {                                   \
        using scalar_t = __half;                                         \
        return __VA_ARGS__();                                            \
      }                                                                  \
      case ::ember::DType::kBFloat16: {                                  \
        using scalar_t = __nv_bfloat16;                                  \
        return __VA_ARGS__();                                            \
      }                                                                  \
      default:                                                           \
        ::ember::unsupported_dtype(OP_NAME, CODE);                       \
    }                                                                    \
  }()

// Expands BODY with `scalar_t` bound to float or to the 16-bit float type of CODE.
#define EMBER_DISPATCH_FLOAT_TYPES(CODE, OP_NAME, ...)                   \
  [&] {                                                                  \
    if (static_cast<::ember::DType>(CODE) == ::ember::DType::kFloat32) { \
      using scalar_t = float;                                            \
      return __VA_ARGS__();                                              \
    }                                                                    \
    return EMBER_DISPATCH_HALF_TYPES(CODE, OP_NAME, __VA_ARGS__);        \
  }()
