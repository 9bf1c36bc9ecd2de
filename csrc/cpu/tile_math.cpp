// Matrix products and elementwise loops on tiles (declared in attention_cpu.h).
#include "cpu/attention_cpu.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define FASTATTN_X86 1
#endif

#include <cstring>

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
  const float scale = bit_copy<float>(static_cast<int32_t>((n + 127) << 23));  // 2^n from its exponent bits
  return x < -87.0f ? 0.0f : y * scale;
}

#ifdef FASTATTN_X86
// AVX2+FMA versions of the float loops, chosen at run time when the CPU has them (the extension is
// built for the baseline ISA; GCC does not vectorise the exp polynomial's rounding on its own).
__attribute__((target("avx2,fma"))) inline __m256 exp8_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 zero = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);  // also true for -inf
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 fn = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_add_epi32(_mm256_cvtps_epi32(fn), _mm256_set1_epi32(127));
  const __m256 pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(n, 23));
  return _mm256_andnot_ps(zero, _mm256_mul_ps(y, pow2));
}

__attribute__((target("avx2,fma"))) float exp_shift_sum_avx2(float* x, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), s));
    _mm256_storeu_ps(x + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; j < n; ++j) {
    x[j] = exp_nonpositive(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

__attribute__((target("avx2,fma"))) void exp_shift_avx2(float* x, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), s)));
  for (; j < n; ++j) x[j] = exp_nonpositive(x[j] - shift);
}

__attribute__((target("avx2,fma"))) float row_max_avx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float best = lanes[0];
  for (int l = 1; l < 8; ++l) best = std::max(best, lanes[l]);
  for (; j < n; ++j) best = std::max(best, x[j]);
  return best;
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
constexpr bool kHasAvx2 = false;
float exp_shift_sum_avx2(float*, int64_t, float) { return 0; }
void exp_shift_avx2(float*, int64_t, float) {}
float row_max_avx2(const float*, int64_t) { return 0; }
#endif

}  // namespace

void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_impl<float>(sgemm_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  gemm_impl<double>(dgemm_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

float exp_shift_sum(float* x, int64_t n, float shift) {
  if (kHasAvx2) return exp_shift_sum_avx2(x, n, shift);
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = exp_nonpositive(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

void exp_shift(float* x, int64_t n, float shift) {
  if (kHasAvx2) return exp_shift_avx2(x, n, shift);
  for (int64_t j = 0; j < n; ++j) x[j] = exp_nonpositive(x[j] - shift);
}

float row_max(const float* x, int64_t n) {
  if (kHasAvx2) return row_max_avx2(x, n);
  float m = -std::numeric_limits<float>::infinity();
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
