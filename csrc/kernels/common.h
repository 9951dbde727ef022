// Plain types and math shared by the CPU (g++) and CUDA (nvcc) kernels.
// No torch headers here: nvcc compiles this on machines without a CUDA torch.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE inline
#endif

// Same definition as the CUDA runtime's, so launcher declarations need no CUDA header.
typedef struct CUstream_st* cudaStream_t;

namespace peft_kernels {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11): a counter-based generator, so a dropout mask is a pure
// function of (seed, row, column). Backward regenerates the forward's mask instead of storing it,
// and the CPU and CUDA kernels produce the same mask for the same seed.
struct Philox4 {
  uint32_t v[4];
};

HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                  uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kMul0, c0, hi0, lo0);
    philox_mulhilo(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Dropout on the adapter branch. Element (row, col) of the [N, in] input takes the 16-bit field
// f = col % 8 of philox(counter = (col / 8, row_lo, row_hi, 0), key = (seed_lo, seed_hi)),
// field f being bits [16 (f % 2), 16 (f % 2) + 16) of word f / 2, and is dropped iff
// field < threshold, threshold = round(p * 2^16) (at least 1 for p > 0): the drop probability is
// p to within 2^-17 (2^-16 below p = 2^-17). Sixteen bits per element halve the Philox work of
// 32 (the bits of 4096 rows of 1024 on one Zen 5 core: 1.35 -> 0.68 ms, with the mask applied
// 1.59 -> 0.86 ms); integer comparison keeps CPU and GPU bit-identical. peft_kernels/reference.py holds an independent numpy transcription.
struct DropoutParams {
  const int64_t* seed = nullptr;  // one int64 on the kernel's device (read in-kernel: no host sync)
  uint32_t threshold = 0;         // 0 means no dropout
  double scale = 1.0;             // 1 / (1 - p)
  bool enabled() const { return threshold != 0; }
};

constexpr int kDropoutFieldsPerCall = 8;  // 16-bit fields of one Philox4x32 call

HOST_DEVICE uint32_t dropout_threshold_for(double p) {
  if (!(p > 0.0)) return 0;
  const uint32_t t = static_cast<uint32_t>(p * 65536.0 + 0.5);
  return t == 0 ? 1u : t;
}

HOST_DEVICE Philox4 dropout_bits(int64_t seed, int64_t row, int64_t col8) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t r = static_cast<uint64_t>(row);
  return philox4x32_10(static_cast<uint32_t>(col8), static_cast<uint32_t>(r),
                       static_cast<uint32_t>(r >> 32), 0u, static_cast<uint32_t>(s),
                       static_cast<uint32_t>(s >> 32));
}

// Field f in [0, 8) of a call's bits.
HOST_DEVICE uint32_t dropout_field(const Philox4& bits, int f) {
  return (bits.v[f >> 1] >> (16 * (f & 1))) & 0xFFFFu;
}

HOST_DEVICE bool dropout_keep(uint32_t field, uint32_t threshold) { return field >= threshold; }

}  // namespace peft_kernels
