// Run-time choice of the SIMD clones: the extension is compiled for baseline x86-64, and the hot
// loops a second time with __attribute__((target("avx2,fma"))) (and a few with "avx512f").
// The environment variable PEFT_KERNELS_CPU_ISA=generic|avx2 caps the choice (read once per
// process), so every path can be tested and compared on one machine.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PK_X86_AVX2 1
#endif

namespace peft_kernels::cpu {

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kGeneric;
#ifdef PK_X86_AVX2
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      best = __builtin_cpu_supports("avx512f") ? Isa::kAvx512 : Isa::kAvx2;
    }
#endif
    const char* cap = std::getenv("PEFT_KERNELS_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "generic") == 0) return Isa::kGeneric;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && best == Isa::kAvx512) return Isa::kAvx2;
    return best;
  }();
  return isa;
}

inline const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

inline bool have_avx2_fma() { return cpu_isa() >= Isa::kAvx2; }
inline bool have_avx512() { return cpu_isa() >= Isa::kAvx512; }

}  // namespace peft_kernels::cpu
