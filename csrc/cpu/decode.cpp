// Decode attention on the CPU: a few query rows per sequence against a key/value cache, read in
// place -- contiguous (B_cache, L_max, Hkv, D) or paged (num_pages, page_size, Hkv, D) through a
// block table -- with no gather and no (Lq, Lk) buffer. The CPU implementation of the op
// fastattn::decode_attention (schema in csrc/bindings.cpp, Python side in fastattn/kvcache.py).
//
// Decoding is bound by memory traffic: every cached key and value is used by a handful of query
// rows. So a task owns one sequence b and one slice of its keys (split-KV), and walks that slice
// key block by key block, reading each key/value row once for every query row that uses it: all
// Hq / Hkv query heads of a GQA group, and all Lq query positions. A key block of the cache,
// (n, Hkv, D), is contiguous in the usual layout, so a task streams memory front to back.
//
//   task (b, split):  keys [s0, s1) of sequence b                 # all heads, all query rows
//     for each key block [k0, k0 + n):
//       S[r, j]  = (scale q_r) . k_j           # r = (h, i): query head h, query position i; [rows, n]
//       S        = softcap, ALiBi, band        # hidden scores -> -inf
//       m, l     = online max / sum of exp(S - m) per row
//       acc[r]  += sum_j exp(S[r, j] - m_r) v_j                   # [rows, Dv]
//     partial (m, l, acc) of the split -> scratch
//   combine (b, r): out = sum_s acc_s e^(m_s - M) / (sum_s l_s e^(m_s - M) + e^(sink - M)), lse = M + log(...)
//
// The new keys/values are first written at cache_seqlens[b] + t. Query i of sequence b then sits
// at position L_b - Lq + i (L_b = cache_seqlens[b] + Lnew: bottom-right aligned),
// so it sees keys j <= L_b - Lq + i under causal (window: the band around that position). Keys at
// or past L_b are never read, nor are block-table entries of pages past L_b.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/attention_cpu.h"

#include <atomic>
#include <cstring>

namespace fastattn::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

// An int32 or int64 index tensor of up to two dims, read as int64.
struct Index {
  const void* data = nullptr;
  bool wide = false;
  int64_t s0 = 0, s1 = 0;

  int64_t at(int64_t i, int64_t j = 0) const {
    const int64_t o = i * s0 + j * s1;
    return wide ? static_cast<const int64_t*>(data)[o] : static_cast<const int32_t*>(data)[o];
  }
};

Index make_index(const at::Tensor& t) {
  Index x;
  x.data = t.const_data_ptr();
  x.wide = t.scalar_type() == at::kLong;
  x.s0 = t.stride(0);
  x.s1 = t.dim() > 1 ? t.stride(1) : 0;
  return x;
}

struct DecodeParams {
  int64_t B = 0, Lq = 0, Hq = 0, Hkv = 0, D = 0, Dv = 0, group = 1;
  int64_t rows = 0;  // Hq * Lq query rows per sequence, row r = h * Lq + i
  int64_t q_sb = 0, q_sl = 0, q_sh = 0;
  int64_t k_s0 = 0, k_s1 = 0, k_sh = 0, v_s0 = 0, v_s1 = 0, v_sh = 0;
  int64_t page_size = 0;  // 0: contiguous cache
  Index seqlens, block_table, batch_idx;  // keys per sequence before the append; pages; cache rows
  int64_t Lnew = 0;                       // keys appended per sequence
  bool has_batch_idx = false;
  const float* alibi = nullptr;  // (B, Hq)
  int64_t alibi_sb = 0, alibi_sh = 0;
  const float* sinks = nullptr;  // (Hq,)
  int64_t sinks_s = 0;
  double scale = 1.0, softcap = 0.0;
  bool has_left = false, has_right = false;
  int64_t window_left = 0, window_right = 0;
  int64_t num_splits = 1;
  int64_t block_k = 32;  // keys per block (64 read 3-8% slower, 16 and 48 no faster)

  // Keys of sequence b after the append.
  int64_t klen(int64_t b) const { return seqlens.at(b) + Lnew; }
  // Element offset of cache position `pos` of sequence b (head 0), in a cache with strides (s0, s1).
  int64_t cache_offset(int64_t b, int64_t pos, int64_t s0, int64_t s1) const {
    if (page_size > 0) return block_table.at(b, pos / page_size) * s0 + (pos % page_size) * s1;
    return (has_batch_idx ? batch_idx.at(b) : b) * s0 + pos * s1;
  }
  // Keys query i of a sequence with klen keys may see: [lo, hi] (empty when lo > hi).
  KeyRange key_range(int64_t klen, int64_t i) const {
    const int64_t pos = klen - Lq + i;
    const int64_t lo = has_left ? std::max<int64_t>(0, pos - window_left) : 0;
    const int64_t hi = has_right ? std::min<int64_t>(klen - 1, pos + window_right) : klen - 1;
    return {lo, hi};
  }
};

template <typename acc_t>
inline __attribute__((always_inline)) acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

// out[r * ldo] = a_r . b for the 4 rows a_r = a + r * lda: b is loaded once for the four. With
// pf0 and/or pf1 (rows of n elements of the cache), their cache lines are requested (into L2) along the way.
template <typename acc_t, typename T = acc_t>
inline __attribute__((always_inline)) void dot4(const acc_t* a, int64_t lda, const acc_t* b, int64_t n, acc_t* out,
                                                int64_t ldo, const T* pf0 = nullptr, const T* pf1 = nullptr) {
  for (int64_t c = 0; c < n * int64_t(sizeof(T)); c += 64) {
    if (pf0) __builtin_prefetch(reinterpret_cast<const char*>(pf0) + c, 0, 2);
    if (pf1) __builtin_prefetch(reinterpret_cast<const char*>(pf1) + c, 0, 2);
  }
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  const acc_t *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t c = 0; c < n; ++c) {
    s0 += a0[c] * b[c];
    s1 += a1[c] * b[c];
    s2 += a2[c] * b[c];
    s3 += a3[c] * b[c];
  }
  out[0] = s0, out[ldo] = s1, out[2 * ldo] = s2, out[3 * ldo] = s3;
}

// Requests bytes [from, to) of each non-null row rows[j], j < n, into L2 ahead of use, one request
// per cache line: the rows then wait in L2 (not L1) without holding a line-fill buffer's slot for long.
inline __attribute__((always_inline)) void prefetch_rows(const char* const* rows, int64_t n, int64_t from,
                                                         int64_t to) {
  for (int64_t j = 0; j < n; ++j)
    if (rows[j])
      for (int64_t o = from; o < to; o += 64) __builtin_prefetch(rows[j] + o, 0, 2);
}
inline __attribute__((always_inline)) void prefetch_row(const void* row, int64_t bytes) {
  const char* r = static_cast<const char*>(row);
  prefetch_rows(&r, 1, 0, bytes);
}

template <typename acc_t>
inline __attribute__((always_inline)) void axpy(acc_t* y, acc_t a, const acc_t* x, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) y[c] += a * x[c];
}

// acc (rows, Dv) += P (rows, n; row stride ldp) V, V given as n row pointers. Tiles of 4 rows x 16
// columns stay in registers across the keys, so acc is loaded and stored once per block. With
// `next` (n cache rows of Dv elements of `elem` bytes, null entries skipped), their lines are
// requested along the way: the value rows of the task's next key block.
template <typename acc_t>
inline __attribute__((always_inline)) void pv_block(const acc_t* P, int64_t ldp, int64_t rows, const acc_t* const* V,
                                                    int64_t n, acc_t* acc, int64_t Dv,
                                                    const char* const* next = nullptr, int64_t elem = 0) {
  if (next) prefetch_rows(next, n, 0, Dv * elem);
  constexpr int64_t kRows = 4, kCols = 16;
  int64_t r0 = 0;
  for (; r0 + kRows <= rows; r0 += kRows) {
    int64_t c0 = 0;
    for (; c0 + kCols <= Dv; c0 += kCols) {
      acc_t a[kRows][kCols];
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t c = 0; c < kCols; ++c) a[r][c] = acc[(r0 + r) * Dv + c0 + c];
      for (int64_t j = 0; j < n; ++j) {
        const acc_t* vr = V[j] + c0;
        const acc_t p0 = P[r0 * ldp + j], p1 = P[(r0 + 1) * ldp + j], p2 = P[(r0 + 2) * ldp + j],
                    p3 = P[(r0 + 3) * ldp + j];
#pragma omp simd
        for (int64_t c = 0; c < kCols; ++c) {
          a[0][c] += p0 * vr[c];
          a[1][c] += p1 * vr[c];
          a[2][c] += p2 * vr[c];
          a[3][c] += p3 * vr[c];
        }
      }
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t c = 0; c < kCols; ++c) acc[(r0 + r) * Dv + c0 + c] = a[r][c];
    }
    for (int64_t r = r0; r < r0 + kRows; ++r)  // columns past the last full tile
      for (int64_t j = 0; j < n; ++j)
        for (int64_t c = c0; c < Dv; ++c) acc[r * Dv + c] += P[r * ldp + j] * V[j][c];
  }
  for (int64_t r = r0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) axpy(acc + r * Dv, P[r * ldp + j], V[j], Dv);
}

// float versions on GCC/Clang vector types of 16 lanes: the functions above stay scalar in GCC's
// hands, these compile to 16-wide FMAs in the AVX-512 clone, pairs of 8-wide ones in the AVX2 clone
// (and SSE quarters in the base one).
typedef float fv __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline __attribute__((always_inline)) fv loadv(const float* x) {
  fv v;
  std::memcpy(&v, x, sizeof(v));
  return v;
}
inline __attribute__((always_inline)) void storev(float* x, fv v) { std::memcpy(x, &v, sizeof(v)); }
inline __attribute__((always_inline)) float hsum(fv v) {
  float t = 0;
  for (int64_t c = 0; c < kLanes; ++c) t += v[c];
  return t;
}

// The four horizontal sums of a, b, c, d at once: halves folded pairwise with shuffles (a few
// permutes for all four instead of a lane-by-lane sum each).
typedef int32_t iv __attribute__((vector_size(64)));
inline __attribute__((always_inline)) void hsum4(fv a, fv b, fv c, fv d, float* out) {
#if defined(__clang__)  // clang spells vector shuffles differently; lane sums there
  out[0] = hsum(a), out[1] = hsum(b), out[2] = hsum(c), out[3] = hsum(d);
#else
  const iv lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const iv hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const fv ab = __builtin_shuffle(a, b, lo8) + __builtin_shuffle(a, b, hi8);  // [a 8 | b 8]
  const fv cd = __builtin_shuffle(c, d, lo8) + __builtin_shuffle(c, d, hi8);  // [c 8 | d 8]
  const iv lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const iv hi4 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const fv x = __builtin_shuffle(ab, cd, lo4) + __builtin_shuffle(ab, cd, hi4);  // [a 4 | b 4 | c 4 | d 4]
  const iv lo2 = {0, 1, 4, 5, 8, 9, 12, 13, 0, 1, 4, 5, 8, 9, 12, 13};
  const iv hi2 = {2, 3, 6, 7, 10, 11, 14, 15, 2, 3, 6, 7, 10, 11, 14, 15};
  const fv y = __builtin_shuffle(x, lo2) + __builtin_shuffle(x, hi2);  // [a 2 | b 2 | c 2 | d 2 | ...]
  const iv lo1 = {0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6};
  const iv hi1 = {1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7};
  const fv z = __builtin_shuffle(y, lo1) + __builtin_shuffle(y, hi1);  // [a | b | c | d | ...]
  out[0] = z[0], out[1] = z[1], out[2] = z[2], out[3] = z[3];
#endif
}

inline __attribute__((always_inline)) float dot(const float* a, const float* b, int64_t n) {
  fv s = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) s += loadv(a + c) * loadv(b + c);
  float t = hsum(s);
  for (; c < n; ++c) t += a[c] * b[c];
  return t;
}

// The requests of pf0 and pf1 ride in the loop, one of each per 16 elements (a 64-byte line of
// float rows, half of one of bfloat16 ones): no loop of their own.
template <typename T = float>
inline __attribute__((always_inline)) void dot4(const float* a, int64_t lda, const float* b, int64_t n, float* out,
                                                int64_t ldo, const T* pf0 = nullptr, const T* pf1 = nullptr) {
  fv s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    if (pf0) __builtin_prefetch(pf0 + c, 0, 2);
    if (pf1) __builtin_prefetch(pf1 + c, 0, 2);
    const fv x = loadv(b + c);
    s0 += loadv(a + c) * x;
    s1 += loadv(a + lda + c) * x;
    s2 += loadv(a + 2 * lda + c) * x;
    s3 += loadv(a + 3 * lda + c) * x;
  }
  float t[4];
  hsum4(s0, s1, s2, s3, t);
  for (; c < n; ++c)
    for (int r = 0; r < 4; ++r) t[r] += a[r * lda + c] * b[c];
  for (int r = 0; r < 4; ++r) out[r * ldo] = t[r];
}

inline __attribute__((always_inline)) void axpy(float* y, float a, const float* x, int64_t n) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) storev(y + c, loadv(y + c) + a * loadv(x + c));
  for (; c < n; ++c) y[c] += a * x[c];
}

// The requests of `next` ride in the first row tile's loop, two per (column tile, key): the lines of
// the column tile's bytes; the columns past the last tile (or all, with fewer than 4 rows) before.
inline __attribute__((always_inline)) void pv_block(const float* P, int64_t ldp, int64_t rows, const float* const* V,
                                                    int64_t n, float* acc, int64_t Dv, const char* const* next = nullptr,
                                                    int64_t elem = 0) {
  constexpr int64_t kCols = 2 * kLanes;
  if (next) prefetch_rows(next, n, rows >= 4 ? Dv / kCols * kCols * elem : 0, Dv * elem);
  int64_t r0 = 0;
  for (; r0 + 4 <= rows; r0 += 4) {
    int64_t c0 = 0;
    for (; c0 + kCols <= Dv; c0 += kCols) {
      float* o = acc + r0 * Dv + c0;
      fv a00 = loadv(o), a01 = loadv(o + kLanes), a10 = loadv(o + Dv), a11 = loadv(o + Dv + kLanes);
      fv a20 = loadv(o + 2 * Dv), a21 = loadv(o + 2 * Dv + kLanes), a30 = loadv(o + 3 * Dv),
         a31 = loadv(o + 3 * Dv + kLanes);
      for (int64_t j = 0; j < n; ++j) {
        if (next && r0 == 0 && next[j]) {
          __builtin_prefetch(next[j] + c0 * elem, 0, 2);
          __builtin_prefetch(next[j] + (c0 + kLanes) * elem, 0, 2);
        }
        const fv v0 = loadv(V[j] + c0), v1 = loadv(V[j] + c0 + kLanes);
        const float p0 = P[r0 * ldp + j], p1 = P[(r0 + 1) * ldp + j], p2 = P[(r0 + 2) * ldp + j],
                    p3 = P[(r0 + 3) * ldp + j];
        a00 += p0 * v0, a01 += p0 * v1, a10 += p1 * v0, a11 += p1 * v1;
        a20 += p2 * v0, a21 += p2 * v1, a30 += p3 * v0, a31 += p3 * v1;
      }
      storev(o, a00), storev(o + kLanes, a01), storev(o + Dv, a10), storev(o + Dv + kLanes, a11);
      storev(o + 2 * Dv, a20), storev(o + 2 * Dv + kLanes, a21), storev(o + 3 * Dv, a30),
          storev(o + 3 * Dv + kLanes, a31);
    }
    for (int64_t r = r0; r < r0 + 4; ++r)  // columns past the last full tile
      for (int64_t j = 0; j < n; ++j) axpy(acc + r * Dv + c0, P[r * ldp + j], V[j] + c0, Dv - c0);
  }
  for (int64_t r = r0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) axpy(acc + r * Dv, P[r * ldp + j], V[j], Dv);
}

// A cache row as acc_t: the memory itself, or a converted copy in buf.
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) const acc_t* row_as_acc(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16> && std::is_same_v<acc_t, float>) {
    // bfloat16 is the top half of a float: widen the bits (vectorises, unlike the element conversion).
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    uint32_t* out = reinterpret_cast<uint32_t*>(buf);
    for (int64_t c = 0; c < n; ++c) out[c] = static_cast<uint32_t>(bits[c]) << 16;
    return buf;
  } else {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) buf[c] = static_cast<acc_t>(src[c]);
    return buf;
  }
}

// Split s of the keys [lo, hi] sequence b's queries see: [s0, s1), in pieces of a multiple of 16.
inline Range split_keys(const DecodeParams& p, int64_t b, int64_t s) {
  const int64_t klen = p.klen(b);
  const KeyRange first = p.key_range(klen, 0), last = p.key_range(klen, p.Lq - 1);
  const int64_t lo = first.lo, hi = last.hi;
  if (klen <= 0 || hi < lo) return {0, 0};
  const int64_t chunk = ceil_div_i64(ceil_div_i64(hi + 1 - lo, p.num_splits), 16) * 16;
  const int64_t s0 = std::min(hi + 1, lo + s * chunk);
  return {s0, std::min(hi + 1, s0 + chunk)};
}

// How many key rows ahead of use the score loop requests the keys (the hardware prefetchers
// lose the stream at every page, about one row of a (L, Hkv, D) cache).
constexpr int64_t kKeysAhead = 8;

// A task's working buffers, one set per thread, kept between tasks and calls (grown when needed).
template <typename acc_t>
struct TaskScratch {
  std::vector<acc_t> Q, S, kbuf, vblock;
  std::vector<const acc_t*> vrows;
  std::vector<const char*> vnext;
  std::vector<int64_t> koff, voff;  // offsets: the block's key rows (and kKeysAhead more), value rows (and the next block's)
  std::vector<char> bad;
  std::vector<KeyRange> band;
};

template <typename acc_t>
TaskScratch<acc_t>& task_scratch(const DecodeParams& p) {
  thread_local TaskScratch<acc_t> t;
  const int64_t R = p.rows, BK = p.block_k;
  t.Q.resize(R * p.D), t.S.resize(R * BK), t.kbuf.resize(p.D), t.vblock.resize(BK * p.Dv);
  t.vrows.resize(BK), t.koff.resize(BK + kKeysAhead), t.voff.resize(2 * BK), t.vnext.resize(BK);
  t.bad.resize(R), t.band.resize(p.Lq);
  return t;
}

// One task: the partial softmax state of split s of sequence b for all its query rows, written to
// m, l (rows,) and acc (rows, Dv) directly; l = NaN marks a row that saw a non-finite score.
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
inline __attribute__((always_inline)) void decode_task(const DecodeParams& p, const scalar_t* q, const scalar_t* k,
                                                       const scalar_t* v, int64_t b, int64_t s, acc_t* m, acc_t* l,
                                                       acc_t* acc) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t R = p.rows, D = p.D, Dv = p.Dv, BK = p.block_k, rows_per_kv = p.group * p.Lq;
  TaskScratch<acc_t>& t = task_scratch<acc_t>(p);
  acc_t *Q = t.Q.data(), *S = t.S.data();
  std::fill(m, m + R, neg_inf);
  std::fill(l, l + R, acc_t(0));
  std::fill(acc, acc + R * Dv, acc_t(0));
  std::fill(t.bad.begin(), t.bad.end(), 0);

  const int64_t klen = p.klen(b);
  const Range keys = split_keys(p, b, s);
  if (keys.end <= keys.begin) return;
  for (int64_t i = 0; i < p.Lq; ++i) t.band[i] = p.key_range(klen, i);
  const acc_t scale = static_cast<acc_t>(p.scale);
  for (int64_t h = 0; h < p.Hq; ++h)
    for (int64_t i = 0; i < p.Lq; ++i) {
      const scalar_t* src = q + b * p.q_sb + i * p.q_sl + h * p.q_sh;
      acc_t* dst = Q + (h * p.Lq + i) * D;
      for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<acc_t>(src[c]) * scale;
    }
  const int64_t k_bytes = D * sizeof(scalar_t), v_bytes = Dv * sizeof(scalar_t);

  for (int64_t k0 = keys.begin; k0 < keys.end; k0 += BK) {
    const int64_t n = std::min(BK, keys.end - k0), ahead = std::min(n + kKeysAhead, keys.end - k0);
    // The value rows of the task's first block are requested with its keys; those of each later
    // block during the P V of the block before (the keys' requests then have the line-fill buffers
    // to themselves, and P V's arithmetic overlaps memory traffic).
    const bool first = k0 == keys.begin;
    const int64_t nn = std::clamp<int64_t>(keys.end - k0 - BK, 0, BK);  // keys of the next block
    for (int64_t j = 0; j < n; ++j) t.voff[j] = p.cache_offset(b, k0 + j, p.v_s0, p.v_s1);
    for (int64_t j = 0; j < nn; ++j) t.voff[BK + j] = p.cache_offset(b, k0 + BK + j, p.v_s0, p.v_s1);
    for (int64_t j = 0; j < ahead; ++j) t.koff[j] = p.cache_offset(b, k0 + j, p.k_s0, p.k_s1);
    // S = (scale Q) K^T, each key row read once for the rows of its GQA group (keys in memory
    // order, requested kKeysAhead rows ahead; in a task's first block, its value rows too).
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t hk = 0; hk < p.Hkv; ++hk) {
        const scalar_t* kpf = k + t.koff[std::min(j + kKeysAhead, ahead - 1)] + hk * p.k_sh;
        const scalar_t* vpf = first ? v + t.voff[j] + hk * p.v_sh : nullptr;
        const acc_t* kr = row_as_acc<scalar_t, acc_t>(k + t.koff[j] + hk * p.k_sh, D, t.kbuf.data());
        int64_t r = hk * rows_per_kv;
        if (D == Dv && rows_per_kv >= 4) {  // the requests ride in the first dot4's loop
          dot4(Q + r * D, D, kr, D, S + r * BK + j, BK, kpf, vpf);
          r += 4;
        } else {
          if (vpf) prefetch_row(vpf, v_bytes);
          prefetch_row(kpf, k_bytes);
        }
        for (; r + 4 <= (hk + 1) * rows_per_kv; r += 4) dot4(Q + r * D, D, kr, D, S + r * BK + j, BK);
        for (; r < (hk + 1) * rows_per_kv; ++r) S[r * BK + j] = dot(Q + r * D, kr, D);
      }
    }
    // Transform and mask the scores (hidden ones -> -inf), then fold the block into each row's
    // online softmax: S becomes P, acc is rescaled.
    for (int64_t r = 0; r < R; ++r) {
      acc_t* sr = S + r * BK;
      const int64_t h = r / p.Lq, i = r % p.Lq;
      if (p.softcap > 0) {
        const acc_t cap = static_cast<acc_t>(p.softcap), inv = acc_t(1) / cap;
        for (int64_t j = 0; j < n; ++j) sr[j] = cap * std::tanh(sr[j] * inv);
      }
      if (p.alibi) {
        const acc_t slope = static_cast<acc_t>(p.alibi[b * p.alibi_sb + h * p.alibi_sh]);
        const int64_t diag = klen - p.Lq + i - k0;
        for (int64_t j = 0; j < n; ++j) sr[j] -= slope * static_cast<acc_t>(std::abs(diag - j));
      }
      const int64_t lo = std::clamp<int64_t>(t.band[i].lo - k0, 0, n);
      const int64_t hi = std::max(lo, std::clamp<int64_t>(t.band[i].hi + 1 - k0, 0, n));
      std::fill(sr, sr + lo, neg_inf);
      std::fill(sr + hi, sr + n, neg_inf);
    }
    online_softmax_step(S, R, n, m, l, t.bad.data(), acc, Dv, BK);
    // acc += P V, each value row read once, in memory order: kPvKeys keys at a time, all heads of
    // each (a forward walk the hardware prefetchers follow; head by head over the whole block would
    // jump Hkv * Dv elements per row). When every row sees the whole block, register tiles of 4 rows
    // x 32 columns accumulate over the keys; otherwise (block at a band edge) a zero probability must
    // never touch acc (0 * NaN from a hidden value), so rows go key by key.
    bool full = true;
    for (int64_t i = 0; i < p.Lq; ++i) full &= t.band[i].lo <= k0 && t.band[i].hi >= k0 + n - 1;
    constexpr int64_t kPvKeys = 8;
    for (int64_t j0 = 0; j0 < n; j0 += kPvKeys) {
      const int64_t c = std::min(kPvKeys, n - j0);
      for (int64_t hk = 0; hk < p.Hkv; ++hk) {
        for (int64_t j = j0; j < j0 + c; ++j) {
          t.vrows[j] = row_as_acc<scalar_t, acc_t>(v + t.voff[j] + hk * p.v_sh, Dv, t.vblock.data() + j * Dv);
          t.vnext[j] = j < nn ? reinterpret_cast<const char*>(v + t.voff[BK + j] + hk * p.v_sh) : nullptr;
        }
        const int64_t r0 = hk * rows_per_kv;
        if (full) {
          pv_block(S + r0 * BK + j0, BK, rows_per_kv, t.vrows.data() + j0, c, acc + r0 * Dv, Dv,
                   nn > 0 ? t.vnext.data() + j0 : nullptr, int64_t(sizeof(scalar_t)));
          continue;
        }
        if (nn > 0) prefetch_rows(t.vnext.data() + j0, c, 0, v_bytes);
        for (int64_t r = r0; r < r0 + rows_per_kv; ++r)
          for (int64_t j = j0; j < j0 + c; ++j) {
            const acc_t pr = S[r * BK + j];
            if (pr != acc_t(0)) axpy(acc + r * Dv, pr, t.vrows[j], Dv);
          }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    if (t.bad[r]) l[r] = std::numeric_limits<acc_t>::quiet_NaN();
}

template <typename scalar_t, typename acc_t>
void decode_tasks_base(const DecodeParams& p, const scalar_t* q, const scalar_t* k, const scalar_t* v, int64_t b,
                       int64_t s, acc_t* m, acc_t* l, acc_t* acc) {
  decode_task<scalar_t>(p, q, k, v, b, s, m, l, acc);
}

#if defined(__x86_64__)
// The same task compiled for AVX2 + FMA (the dot products and row updates vectorise 8 wide),
// chosen at run time; the extension itself is built for the baseline ISA.
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void decode_tasks_avx2(const DecodeParams& p, const scalar_t* q, const scalar_t* k,
                                                           const scalar_t* v, int64_t b, int64_t s, acc_t* m, acc_t* l,
                                                           acc_t* acc) {
  decode_task<scalar_t>(p, q, k, v, b, s, m, l, acc);
}
// And for AVX-512 (16 wide), where the CPU has it.
template <typename scalar_t, typename acc_t>
__attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma"))) void decode_tasks_avx512(
    const DecodeParams& p, const scalar_t* q, const scalar_t* k, const scalar_t* v, int64_t b, int64_t s, acc_t* m,
    acc_t* l, acc_t* acc) {
  decode_task<scalar_t>(p, q, k, v, b, s, m, l, acc);
}
const bool kDecodeAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
const bool kDecodeAvx512 = kDecodeAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                           __builtin_cpu_supports("avx512bw");
#endif

template <typename scalar_t>
void decode_forward(const DecodeParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    at::Tensor& out, at::Tensor& lse) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t R = p.rows, Dv = p.Dv, S = p.num_splits;
  // Partial states of every (sequence, split): m, l (B, S, rows) and acc (B, S, rows, Dv), in a
  // buffer of the calling thread kept between calls (the workers write it while the caller waits).
  thread_local std::vector<acc_t> part;
  part.resize(p.B * S * R * (Dv + 2));
  acc_t* part_m = part.data();
  acc_t* part_l = part_m + p.B * S * R;
  acc_t* part_acc = part_l + p.B * S * R;
  const scalar_t* qd = q.const_data_ptr<scalar_t>();
  const scalar_t* kd = k.const_data_ptr<scalar_t>();
  const scalar_t* vd = v.const_data_ptr<scalar_t>();

  // Threads take tasks from a shared counter rather than a fixed share each: a thread that loses
  // its core for a while (a busy machine) then delays only the task it holds.
  const int64_t num_tasks = p.B * S;
  std::atomic<int64_t> next_task{0};
  auto run_tasks = [&](int64_t, int64_t) {
    for (int64_t t = next_task++; t < num_tasks; t = next_task++) {
      const int64_t b = t / S, s = t % S;
      acc_t* m = part_m + t * R;
      acc_t* l = part_l + t * R;
      acc_t* acc = part_acc + t * R * Dv;
#if defined(__x86_64__)
      if (kDecodeAvx512) {
        decode_tasks_avx512<scalar_t, acc_t>(p, qd, kd, vd, b, s, m, l, acc);
        continue;
      }
      if (kDecodeAvx2) {
        decode_tasks_avx2<scalar_t, acc_t>(p, qd, kd, vd, b, s, m, l, acc);
        continue;
      }
#endif
      decode_tasks_base<scalar_t, acc_t>(p, qd, kd, vd, b, s, m, l, acc);
    }
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  if (workers > 1) {
    at::parallel_for(0, workers, 1, run_tasks);
  } else {
    run_tasks(0, 1);  // no thread team for one worker
  }

  // Combine the splits (and the sink) per (sequence, row): out (B, Lq, Hq, Dv), lse (B, Hq, Lq).
  // Cheap next to the tasks (S * rows * Dv reads): a decode step's few rows run on the calling
  // thread (no thread team below the grain), large batches on all threads.
  scalar_t* od = out.mutable_data_ptr<scalar_t>();
  float* lsed = lse.mutable_data_ptr<float>();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN(), inf = std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, p.B * R, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / R, r = t % R, h = r / p.Lq, i = r % p.Lq;
      const acc_t sink = p.sinks ? static_cast<acc_t>(p.sinks[h * p.sinks_s]) : -inf;
      acc_t M = sink;
      bool bad = false;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t e = (b * S + s) * R + r;
        bad |= std::isnan(part_l[e]);
        if (part_l[e] > 0) M = std::max(M, part_m[e]);
      }
      acc_t L = M == -inf ? acc_t(0) : std::exp(sink - M);
      // The first split with weight writes o (the row's slot of split 0, reused), the others add to it.
      acc_t* o = part_acc + (b * S * R + r) * Dv;
      bool first = true;
      for (int64_t s = 0; s < S && !bad; ++s) {
        const int64_t e = (b * S + s) * R + r;
        if (!(part_l[e] > 0)) continue;
        const acc_t w = std::exp(part_m[e] - M);
        const acc_t* a = part_acc + e * Dv;
        L += part_l[e] * w;
        if (first) {
          for (int64_t c = 0; c < Dv; ++c) o[c] = w * a[c];
        } else {
          axpy(o, w, a, Dv);
        }
        first = false;
      }
      scalar_t* dst = od + ((b * p.Lq + i) * p.Hq + h) * Dv;
      const acc_t inv = L > 0 ? acc_t(1) / L : acc_t(0);
      for (int64_t c = 0; c < Dv; ++c) dst[c] = static_cast<scalar_t>(bad ? nan : first ? acc_t(0) : o[c] * inv);
      lsed[(b * p.Hq + h) * p.Lq + i] = static_cast<float>(bad ? nan : (L > 0 ? M + std::log(L) : -inf));
    }
  });
}

void check_index_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
                   " must be an int32 or int64 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor here, got ", t.device());
}

// Writes the new keys and values (B, Lnew, Hkv, *) at positions cache_seqlens[b] + t of each sequence.
template <typename scalar_t>
void append_rows(const DecodeParams& p, const at::Tensor& src, at::Tensor& cache, int64_t dim) {
  const scalar_t* x = src.const_data_ptr<scalar_t>();
  scalar_t* c = cache.mutable_data_ptr<scalar_t>();
  const int64_t s0 = cache.stride(0), s1 = cache.stride(1), sh = cache.stride(2);
  at::parallel_for(0, p.B * p.Lnew, 16, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t b = e / p.Lnew, t = e % p.Lnew;
      const int64_t off = p.cache_offset(b, p.seqlens.at(b) + t, s0, s1);
      for (int64_t hk = 0; hk < p.Hkv; ++hk) {
        const scalar_t* from = x + b * src.stride(0) + t * src.stride(1) + hk * src.stride(2);
        std::copy(from, from + dim, c + off + hk * sh);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cpu(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                                                        const OptTensor& k, const OptTensor& v,
                                                        const at::Tensor& cache_seqlens, const OptTensor& block_table,
                                                        const OptTensor& cache_batch_idx, const OptTensor& alibi_slopes,
                                                        const OptTensor& sinks, double scale,
                                                        std::optional<int64_t> window_left,
                                                        std::optional<int64_t> window_right, double softcap,
                                                        int64_t num_splits) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be 4-D (B, Lq, Hq, D), got ", q.dim(), "-D");
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && v_cache.dim() == 4, "k_cache and v_cache must be 4-D, got ", k_cache.dim(),
                    "-D and ", v_cache.dim(), "-D");
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q must be a CPU tensor for the CPU kernel, got ", q.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "q must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_TYPE(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
                   "k_cache and v_cache must have q's dtype ", dtype);
  check_same_device(k_cache, q, "k_cache");
  check_same_device(v_cache, q, "v_cache");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k_cache, "k_cache");
  check_last_dim_contiguous(v_cache, "v_cache");
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t n_rows = k_cache.size(0), row_len = k_cache.size(1), Hkv = k_cache.size(2), Dv = v_cache.size(3);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "k_cache must have q's head_dim ", D, ", got ", k_cache.size(3));
  TORCH_CHECK_VALUE(v_cache.size(0) == n_rows && v_cache.size(1) == row_len && v_cache.size(2) == Hkv,
                    "v_cache must match k_cache in its first three dims, got ", v_cache.sizes(), " and ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "q's number of heads (", Hq, ") must be a multiple of the cache's (",
                    Hkv, ")");
  TORCH_CHECK_VALUE(D > 0 && Lq > 0, "q must have a non-zero head_dim and Lq, got shape ", q.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, "softcap must be finite and >= 0, got ", softcap);
  TORCH_CHECK_VALUE(k.has_value() == v.has_value(), "k and v must be given together or both be None");
  const int64_t Lnew = k.has_value() ? k->size(1) : 0;
  if (k.has_value()) {
    for (const auto& [t, name, dim] : {std::tuple{&*k, "k", D}, std::tuple{&*v, "v", Dv}}) {
      TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) == B && t->size(1) == Lnew && t->size(2) == Hkv &&
                            t->size(3) == dim,
                        name, " must have shape (", B, ", ", Lnew, ", ", Hkv, ", ", dim, "), got ", t->sizes());
      TORCH_CHECK_TYPE(t->scalar_type() == dtype, name, " must have q's dtype ", dtype, ", got ", t->scalar_type());
      check_same_device(*t, q, name);
    }
  }

  check_index_tensor(cache_seqlens, "cache_seqlens");
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, "cache_seqlens must have shape (", B,
                    ",), got ", cache_seqlens.sizes());
  DecodeParams p;
  p.B = B, p.Lq = Lq, p.Hq = Hq, p.Hkv = Hkv, p.D = D, p.Dv = Dv, p.group = Hq / Hkv, p.rows = Hq * Lq;
  p.q_sb = q.stride(0), p.q_sl = q.stride(1), p.q_sh = q.stride(2);
  p.k_s0 = k_cache.stride(0), p.k_s1 = k_cache.stride(1), p.k_sh = k_cache.stride(2);
  p.v_s0 = v_cache.stride(0), p.v_s1 = v_cache.stride(1), p.v_sh = v_cache.stride(2);
  p.seqlens = make_index(cache_seqlens);
  p.Lnew = Lnew;
  int64_t capacity = row_len;
  if (block_table.has_value()) {
    TORCH_CHECK_VALUE(!cache_batch_idx.has_value(), "cache_batch_idx applies to a contiguous cache; with block_table, "
                      "map sequences to pages through block_table instead");
    check_index_tensor(*block_table, "block_table");
    TORCH_CHECK_VALUE(block_table->dim() == 2 && block_table->size(0) == B, "block_table must have shape (", B,
                      ", max_pages), got ", block_table->sizes());
    TORCH_CHECK_VALUE(row_len > 0 && row_len % 16 == 0, "the page size (k_cache.shape[1]) must be a positive multiple "
                      "of 16, got ", row_len);
    p.page_size = row_len;
    p.block_table = make_index(*block_table);
    capacity = block_table->size(1) * row_len;
  } else if (cache_batch_idx.has_value()) {
    check_index_tensor(*cache_batch_idx, "cache_batch_idx");
    TORCH_CHECK_VALUE(cache_batch_idx->dim() == 1 && cache_batch_idx->size(0) == B, "cache_batch_idx must have shape (",
                      B, ",), got ", cache_batch_idx->sizes());
    p.has_batch_idx = true;
    p.batch_idx = make_index(*cache_batch_idx);
  } else {
    TORCH_CHECK_VALUE(n_rows == B, "k_cache has ", n_rows, " rows but q has batch ", B,
                      "; pass cache_batch_idx to pick rows");
  }
  // Every index the kernel will follow, checked before anything is written or read.
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t old = p.seqlens.at(b), len = old + Lnew;
    TORCH_CHECK_VALUE(old >= 0 && len <= capacity, "cache_seqlens + Lnew must lie in [", Lnew, ", ", capacity,
                      "] (the cache holds ", capacity, " positions per sequence), got cache_seqlens[", b, "] = ", old,
                      " with Lnew = ", Lnew);
    max_len = std::max(max_len, len);
    if (p.page_size > 0) {
      for (int64_t pg = 0; pg * p.page_size < len; ++pg) {
        const int64_t page = p.block_table.at(b, pg);
        TORCH_CHECK_VALUE(page >= 0 && page < n_rows, "block_table[", b, ", ", pg, "] = ", page,
                          " is not a page of k_cache (it has ", n_rows, " pages: valid entries lie in [0, ", n_rows, "))");
      }
    } else if (p.has_batch_idx) {
      const int64_t row = p.batch_idx.at(b);
      TORCH_CHECK_VALUE(row >= 0 && row < n_rows, "cache_batch_idx must lie in [0, ", n_rows, "), got cache_batch_idx[",
                        b, "] = ", row);
    }
  }
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", a.scalar_type());
    TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == B && a.size(1) == Hq, "alibi_slopes must have shape (", B, ", ", Hq,
                      "), got ", a.sizes());
    check_same_device(a, q, "alibi_slopes");
    p.alibi = a.const_data_ptr<float>();
    p.alibi_sb = a.stride(0), p.alibi_sh = a.stride(1);
  }
  if (sinks.has_value()) {
    const at::Tensor& t = *sinks;
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "sinks must be float32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == Hq, "sinks must have shape (", Hq, ",), got ", t.sizes());
    check_same_device(t, q, "sinks");
    p.sinks = t.const_data_ptr<float>();
    p.sinks_s = t.stride(0);
  }
  p.scale = scale, p.softcap = softcap;
  const int64_t bound = Lq + capacity + 1;  // a wider window changes no visibility
  p.has_left = window_left.has_value(), p.has_right = window_right.has_value();
  p.window_left = p.has_left ? std::clamp<int64_t>(*window_left, -bound, bound) : 0;
  p.window_right = p.has_right ? std::clamp<int64_t>(*window_right, -bound, bound) : 0;
  // Split-KV: enough tasks for about eight per thread when the batch alone has too few (taken
  // dynamically, see decode_forward), each split at least 256 keys; num_splits > 0 fixes the count.
  if (num_splits > 0) {
    p.num_splits = num_splits;
  } else {
    const int64_t want = ceil_div_i64(8 * at::get_num_threads(), std::max<int64_t>(B, 1));
    p.num_splits = std::clamp<int64_t>(std::min(want, ceil_div_i64(max_len, 256)), 1, 64);
  }

  at::Tensor out = at::empty({B, Lq, Hq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  if (B == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fastattn_decode_attention_cpu", [&] {
    if (Lnew > 0) {
      append_rows<scalar_t>(p, *k, k_cache, D);
      append_rows<scalar_t>(p, *v, v_cache, Dv);
    }
    decode_forward<scalar_t>(p, q, k_cache, v_cache, out, lse);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace fastattn::cpu
