// Row-major GEMM on raw pointers for the CPU kernels. Calls the Fortran BLAS that torch's CPU
// library links (MKL or OpenBLAS export sgemm_/dgemm_) without dispatcher overhead, so tiles of a
// few dozen rows are cheap; falls back to at::addmm_out where the symbols are absent.
#pragma once
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <climits>
#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace peft_kernels::cpu {

template <typename T>
inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                         const T* alpha, const T* a, const int* lda, const T* b, const int* ldb,
                         const T* beta, T* c, const int* ldc);
template <>
inline void fortran_gemm<float>(const char* ta, const char* tb, const int* m, const int* n,
                                const int* k, const float* alpha, const float* a, const int* lda,
                                const float* b, const int* ldb, const float* beta, float* c,
                                const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <>
inline void fortran_gemm<double>(const char* ta, const char* tb, const int* m, const int* n,
                                 const int* k, const double* alpha, const double* a,
                                 const int* lda, const double* b, const int* ldb,
                                 const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <typename T>
inline bool have_fortran_gemm() {
  if constexpr (std::is_same_v<T, float>) {
    return sgemm_ != nullptr;
  } else {
    return dgemm_ != nullptr;
  }
}

// C[M, N] = alpha * op(A) op(B) + beta * C, all row-major with leading dimensions lda/ldb/ldc;
// op(A) is [M, K] (A stored [K, M] when trans_a), op(B) is [K, N] (B stored [N, K] when trans_b).
// beta == 0 ignores C's previous contents.
template <typename T>
void gemm_rowmajor(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha,
                   const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const bool fits_int = M < INT_MAX && N < INT_MAX && K < INT_MAX && lda < INT_MAX &&
                        ldb < INT_MAX && ldc < INT_MAX;
  if (K > 0 && fits_int && have_fortran_gemm<T>()) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap operands, keep flags.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    fortran_gemm<T>(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  at::Tensor a = trans_a ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t()
                         : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = trans_b ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                         : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  if (beta == T(0)) c.zero_();  // BLAS semantics: beta == 0 must not read (possibly NaN) C
  at::addmm_out(c, c, a, b, beta == T(0) ? T(1) : beta, alpha);
}

}  // namespace peft_kernels::cpu
