// Hopper's bulk copy engine (cp.async.bulk, the non-tensor form of TMA) and the shared-memory
// mbarriers that count its bytes: one thread moves a contiguous run of global memory into
// shared memory with a single instruction, and consumers wait on the barrier's phase.
//
// Sizes and addresses of a bulk copy are multiples of 16 bytes. A barrier phase completes when
// its one expected arrival (the issuing thread's arrive.expect_tx) has happened and every byte
// it announced has landed; use k of a barrier waits on parity k & 1.
//
// Only sm_90 and later have these instructions; on older targets the functions trap, and hosts
// must not launch kernels that use them there (current_device_cc_major() >= 9).
#pragma once

#include <cstdint>

namespace ember {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define EMBER_SM90_ASM(...) asm volatile(__VA_ARGS__)
#else
#define EMBER_SM90_ASM(...) __trap()
#endif

// One arrival per phase; call from one thread, then fence_barrier_init() and a block barrier.
__device__ __forceinline__ void mbarrier_init(uint32_t bar) {
  EMBER_SM90_ASM("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
}

// Makes initialised barriers visible to the bulk copy engine (the async proxy).
__device__ __forceinline__ void fence_barrier_init() {
  EMBER_SM90_ASM("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  EMBER_SM90_ASM(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// An L2 policy for data read exactly once: evicted first, so it does not push out what others
// reuse (activations, the KV cache).
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy = 0;
  EMBER_SM90_ASM("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

// Announces `bytes` on the barrier and copies them from global `src` to shared `dst`.
__device__ __forceinline__ void bulk_copy_to_shared(uint32_t dst, const void* src,
                                                    uint32_t bytes, uint32_t bar,
                                                    uint64_t policy) {
  EMBER_SM90_ASM("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
  EMBER_SM90_ASM(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint "
      "[%0], [%1], %2, [%3], %4;" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar), "l"(policy)
      : "memory");
}

#undef EMBER_SM90_ASM

}  // namespace ember
