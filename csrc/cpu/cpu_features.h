// Run-time choice of the SIMD clones: the extension is compiled for baseline x86-64, and the hot
// loops a second time with __attribute__((target("avx2,fma"))) (and a few with "avx512f").
// The environment variable PEFT_KERNELS_CPU_ISA=generic|avx2|avx512 caps the choice (read once
// per process, any case; another value is reported and ignored), so every path can be tested
// and compared on one machine.
#pragma once

#include <cctype>
#include <cstdio>
#include <cstdlib>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PK_X86_AVX2 1
#endif

namespace peft_kernels::cpu {

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

inline bool equals_ignoring_case(const char* a, const char* b) {
  for (; *a != '\0' && *b != '\0'; ++a, ++b) {
    if (std::tolower(static_cast<unsigned char>(*a)) != *b) return false;
  }
  return *a == *b;
}

inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kGeneric;
#ifdef PK_X86_AVX2
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      best = __builtin_cpu_supports("avx512f") ? Isa::kAvx512 : Isa::kAvx2;
    }
#endif
    const char* cap = std::getenv("PEFT_KERNELS_CPU_ISA");
    if (cap == nullptr || *cap == '\0') return best;
    if (equals_ignoring_case(cap, "generic")) return Isa::kGeneric;
    if (equals_ignoring_case(cap, "avx2")) return best == Isa::kAvx512 ? Isa::kAvx2 : best;
    if (equals_ignoring_case(cap, "avx512")) return best;
    std::fprintf(stderr,
                 "peft_kernels: PEFT_KERNELS_CPU_ISA=%s is not one of generic, avx2, avx512; "
                 "ignored\n",
                 cap);
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
