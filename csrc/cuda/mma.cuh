// Warp-level tensor-core helpers for the attention kernels: mma.sync m16n8k16 (sm_80+), the
// ldmatrix loads that build its fragments from shared memory, and cp.async tile copies.
//
// Fragment layout of mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 (group) and t = lane % 4 (thread in group):
//
//   A (16 x 16, row-major), 4 x b32, each two elements of consecutive columns:
//     a[0]: row g,     cols 2t, 2t+1        a[2]: row g,     cols 2t+8, 2t+9
//     a[1]: row g + 8, cols 2t, 2t+1        a[3]: row g + 8, cols 2t+8, 2t+9
//   B (16 x 8, k x n), 2 x b32, each two elements of consecutive k:
//     b[0]: k 2t, 2t+1,   col g             b[1]: k 2t+8, 2t+9, col g
//   C/D (16 x 8) float32, 4 floats:
//     c[0], c[1]: row g,     cols 2t, 2t+1  c[2], c[3]: row g + 8, cols 2t, 2t+1
//
// The element with the lower index sits in the lower 16 bits of a b32 register.
// Shared-memory tiles are row-major with a row stride of D + 8 elements: the 16-byte pad moves
// consecutive rows 4 banks apart, so the 8 row addresses of each 8 x 8 matrix an ldmatrix reads
// (16 bytes each) fall in 8 distinct bank quadruples: no conflicts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace fastattn {
namespace cuda {

template <typename T>
struct MmaTraits;

template <>
struct MmaTraits<__half> {
  static constexpr uint32_t kExponent = 0x7c00u;  // all ones: Inf or NaN
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <>
struct MmaTraits<__nv_bfloat16> {
  static constexpr uint32_t kExponent = 0x7f80u;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// The A fragment of the 16 x 16 block made of accumulator tiles c[2kk] and c[2kk + 1]
// (columns 16kk .. 16kk+15 of a 16-row accumulator), rounded to T.
// Nonzero when either of two packed 16-bit values is NaN/Inf.
template <typename T>
__device__ __forceinline__ uint32_t nonfinite_mask(uint32_t x) {
  constexpr uint32_t kExp = MmaTraits<T>::kExponent;
  return static_cast<uint32_t>((x & kExp) == kExp) | static_cast<uint32_t>(((x >> 16) & kExp) == kExp);
}

// Two packed 16-bit values with each NaN/Inf replaced by +0 (integer ops only; slow paths only).
template <typename T>
__device__ __forceinline__ uint32_t zero_nonfinite_pair(uint32_t x) {
  constexpr uint32_t kExp = MmaTraits<T>::kExponent;
  const uint32_t lo = (x & kExp) == kExp ? 0u : 0x0000ffffu;
  const uint32_t hi = ((x >> 16) & kExp) == kExp ? 0u : 0xffff0000u;
  return x & (lo | hi);
}

template <typename T>
__device__ __forceinline__ void accumulator_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
  a[0] = MmaTraits<T>::pack(c0[0], c0[1]);
  a[1] = MmaTraits<T>::pack(c0[2], c0[3]);
  a[2] = MmaTraits<T>::pack(c1[0], c1[1]);
  a[3] = MmaTraits<T>::pack(c1[2], c1[3]);
}

// ------------------------------------------------------------------------------------------------
// ldmatrix and cp.async (sm_80+): the pipelined kernels' fragment loads and global-to-shared copies.

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8 x 8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8, and register i
// receives matrix i in the mma fragment layout (thread (g, t) holds row g, elements 2t and 2t + 1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}

// As ldmatrix_x4, each matrix transposed: thread (g, t) holds column g, rows 2t and 2t + 1.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}

// 16 bytes global -> shared without a register round trip; `valid == false` writes 16 zero bytes
// and reads nothing (src-size 0), so rows past a logical length are never read.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}

// 4 bytes global -> shared (one float of a row statistic), zero-filled when `valid` is false.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// A counter in global memory shared by CTAs (the deterministic backward's dQ order): an acquire
// load (later reads of this thread see what the releasing CTA wrote before its release) and a
// release add.
__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void red_release_gpu_add(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// Fragments of row-major shared tiles with row stride `ld` (elements), by ldmatrix:
// the A fragment of the 16 x 16 block at (row0, col0);
template <typename T>
__device__ __forceinline__ void ldsm_a(uint32_t a[4], const T* s, int ld, int row0, int col0, int lane) {
  ldmatrix_x4(a, s + (row0 + lane % 16) * ld + col0 + (lane / 16) * 8);
}

// the A fragment of the 16 x 16 block at (row0, col0) when the tile holds A transposed,
// A[m][k] = s[col0 + k][row0 + m] (dS in dS K, stored key-major as dS^T);
template <typename T>
__device__ __forceinline__ void ldsm_a_trans(uint32_t a[4], const T* s, int ld, int row0, int col0, int lane) {
  ldmatrix_x4_trans(a, s + (col0 + (lane / 16) * 8 + lane % 8) * ld + row0 + ((lane / 8) % 2) * 8);
}

// the B fragments (k x n = 16 x 8) of n-tiles n0 (b[0..1]) and n0 + 8 (b[2..3]) when the tile holds
// B transposed, B[k][n] = s[n0 + n][k0 + k] (K in Q K^T: rows are n, k is contiguous);
template <typename T>
__device__ __forceinline__ void ldsm_b_pair(uint32_t b[4], const T* s, int ld, int n0, int k0, int lane) {
  ldmatrix_x4(b, s + (n0 + (lane / 16) * 8 + lane % 8) * ld + k0 + ((lane / 8) % 2) * 8);
}

// the same when the tile holds B itself, B[k][n] = s[k0 + k][n0 + n] (V in P V: n is contiguous).
template <typename T>
__device__ __forceinline__ void ldsm_b_pair_trans(uint32_t b[4], const T* s, int ld, int k0, int n0, int lane) {
  ldmatrix_x4_trans(b, s + (k0 + ((lane / 8) % 2) * 8 + lane % 8) * ld + n0 + (lane / 16) * 8);
}

// Copies tiles of ROWS rows of a (rows, D) global matrix with row stride `row_stride` (elements)
// into shared tiles with row stride D + 8, with cp.async. Each thread copies the same 16-byte
// column chunk of every (THREADS / (D / 8))-th row; its addresses are set up once, so a tile costs
// one 64-bit multiply and a few adds. Rows at or past `num_rows` become zero without being read.
// Rows must be 16-byte aligned (checked on the host).
template <typename T, int ROWS, int D, int THREADS>
struct TileCopier {
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kRowsPerPass = THREADS / kChunks;
  static_assert(THREADS % kChunks == 0 && ROWS % kRowsPerPass == 0, "every thread copies whole passes");
  const T* base;        // the matrix at (this thread's first row, its chunk)
  int64_t row_stride;   // elements
  int first_row, smem_offset;

  __device__ __forceinline__ TileCopier(const T* g, int64_t stride, int tid) : row_stride(stride) {
    first_row = tid / kChunks;
    const int col = (tid % kChunks) * 8;
    base = g + first_row * stride + col;
    smem_offset = first_row * (D + 8) + col;
  }

  __device__ __forceinline__ void issue(T* s, int row0, int num_rows) const {
    const T* src = base + (int64_t)row0 * row_stride;
    const int64_t pass_stride = kRowsPerPass * row_stride;
#pragma unroll
    for (int pass = 0; pass < ROWS / kRowsPerPass; ++pass) {
      const bool valid = row0 + first_row + pass * kRowsPerPass < num_rows;
      // An invalid row's address is formed but never read (src-size 0), as CUTLASS's zfill copies do.
      cp_async_16(s + smem_offset + pass * kRowsPerPass * (D + 8), src + pass * pass_stride, valid);
    }
  }
};

}  // namespace cuda
}  // namespace fastattn
