// Matrix products and elementwise loops on tiles (declared in attention_cpu.h).
#include "cpu/attention_cpu.h"

#include <bit>

// The Fortran BLAS of the MKL that libtorch_cpu links (exported there). Weak, so the extension
// still loads against a torch without them; the plain loops below then do the work.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fastattn::cpu {
namespace {

// Plain loops for C = alpha op(A) op(B) + beta C (row-major, any strides): the fallback when no
// BLAS is linked or a stride is one BLAS cannot express (an expanded, stride-0 tensor).
template <typename T>
void gemm_loops(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
                int64_t ldb, T beta, T* C, int64_t ldc) {
  std::vector<T> row(N);
  for (int64_t i = 0; i < M; ++i) {
    std::fill(row.begin(), row.end(), T(0));
    for (int64_t kk = 0; kk < K; ++kk) {
      const T a = ta == Trans::kNo ? A[i * lda + kk] : A[kk * lda + i];
      if (tb == Trans::kNo) {
        const T* b = B + kk * ldb;
        for (int64_t j = 0; j < N; ++j) row[j] += a * b[j];
      } else {
        for (int64_t j = 0; j < N; ++j) row[j] += a * B[j * ldb + kk];
      }
    }
    T* c = C + i * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] = alpha * row[j] + (beta == T(0) ? T(0) : beta * c[j]);
  }
}

// Row-major C (M, N) = op(A) op(B) is column-major C^T (N, M) = op(B)^T op(A)^T, and the column-major
// view of a row-major matrix is its transpose: so BLAS gets (B, A) with the same transpose flags.
template <typename T, typename Blas>
void gemm_impl(Blas blas, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
               const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  // BLAS wants each leading dimension >= the extent of the stored row; a single row may have any stride.
  const int64_t a_cols = ta == Trans::kNo ? K : M, a_rows = ta == Trans::kNo ? M : K;
  const int64_t b_cols = tb == Trans::kNo ? N : K, b_rows = tb == Trans::kNo ? K : N;
  if (a_rows == 1) lda = std::max(lda, a_cols);
  if (b_rows == 1) ldb = std::max(ldb, b_cols);
  const bool blas_ok = blas != nullptr && lda >= a_cols && ldb >= b_cols && ldc >= N &&
                       std::max({M, N, K, lda, ldb, ldc}) < (int64_t{1} << 31);
  if (!blas_ok) {
    gemm_loops(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  const char tA = ta == Trans::kNo ? 'N' : 'T', tB = tb == Trans::kNo ? 'N' : 'T';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  blas(&tB, &tA, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

// expf for x <= 0 (scores minus their row max or lse): Cody-Waite range reduction x = n ln2 + r and a
// degree-6 polynomial for exp(r) (Cephes' coefficients), 2^n from the exponent bits. Within 2 ulp.
// Plain arithmetic, so the loops that call it vectorise.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float t = xc * kLog2e;
  const int n = static_cast<int>(t + (t < 0.0f ? -0.5f : 0.5f));  // round to nearest
  const float fn = static_cast<float>(n);
  const float r = (xc - fn * kLn2Hi) - fn * kLn2Lo;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const float scale = std::bit_cast<float>(static_cast<int32_t>((n + 127) << 23));
  return x < -87.0f ? 0.0f : y * scale;
}

}  // namespace

void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_impl<float>(sgemm_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  gemm_impl<double>(dgemm_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// The float loops are cloned for AVX2+FMA (picked at load time when the CPU has it) and the baseline.
__attribute__((target_clones("arch=haswell", "default"))) float exp_shift_sum(float* x, int64_t n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_nonpositive(x[j] - shift);
    x[j] = e;
    sum += e;
  }
  return sum;
}

__attribute__((target_clones("arch=haswell", "default"))) void exp_shift(float* x, int64_t n, float shift) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = exp_nonpositive(x[j] - shift);
}

__attribute__((target_clones("arch=haswell", "default"))) float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

double exp_shift_sum(double* x, int64_t n, double shift) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

void exp_shift(double* x, int64_t n, double shift) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j] - shift);
}

double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

}  // namespace fastattn::cpu
