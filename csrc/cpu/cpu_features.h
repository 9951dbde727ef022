// Run-time choice of the AVX2 + FMA clones: the extension is compiled for baseline x86-64, and the
// hot loops are compiled a second time with __attribute__((target("avx2,fma"))).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PK_X86_AVX2 1

namespace peft_kernels::cpu {

inline bool have_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

}  // namespace peft_kernels::cpu
#endif
