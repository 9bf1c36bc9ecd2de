// Shared pieces of the fused CPU attention kernels (attention_fwd.cpp, attention_bwd.cpp, varlen.cpp):
// the problem description (Params), the visibility geometry, the tile plans, the math on tiles and the
// forward's and backward's steps on one (query tile, key tile) pair.
//
// The kernels never form an (Lq, Lk) buffer: they walk tiles of at most (BLOCK_Q, BLOCK_K) scores,
// keep an online softmax per query row, and recompute the probabilities from lse in the backward.
// Matrix products on tiles go through BLAS (the sgemm_/dgemm_ of the MKL that libtorch_cpu links,
// looked up weakly, with a plain-loop fallback); elementwise work (exp, row max, scaling) is in
// loops the compiler vectorises, cloned for AVX2+FMA and the baseline ISA.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastattn::cpu {

// ---------------------------------------------------------------------------------------------
// Problem description: sizes, strides (in elements) and the optional inputs, type-erased.
// ---------------------------------------------------------------------------------------------

inline int64_t ceil_div_i64(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class MaskKind { kNone, kBool, kFloat, kDouble, kBFloat16, kHalf };

// A CSR-like list of a BlockMask, expanded to (B, Hq, n) counts and (B, Hq, n, m) indices
// (zero strides on broadcast dims).
struct BlockList {
  const int32_t* num = nullptr;
  const int32_t* idx = nullptr;
  int64_t num_sb = 0, num_sh = 0, num_sr = 0;
  int64_t idx_sb = 0, idx_sh = 0, idx_sr = 0, idx_sc = 0;

  bool present() const { return num != nullptr; }
  int32_t count(int64_t b, int64_t h, int64_t r) const { return num[b * num_sb + h * num_sh + r * num_sr]; }
  int32_t at(int64_t b, int64_t h, int64_t r, int64_t c) const {
    return idx[b * idx_sb + h * idx_sh + r * idx_sr + c * idx_sc];
  }
};

struct Params {
  int64_t B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, D = 0, Dv = 0, group = 1;
  // q/out/dout/dq (B, Hq, Lq, *) and k/v/dk/dv (B, Hkv, Lk, *): batch, head, row strides.
  int64_t q_sb = 0, q_sh = 0, q_sr = 0;
  int64_t k_sb = 0, k_sh = 0, k_sr = 0;
  int64_t v_sb = 0, v_sh = 0, v_sr = 0;
  double scale = 1.0;
  double softcap = 0.0;
  // Dropout: keep (b, h, i, j) iff dropout_bits(...) >= dropout_threshold; kept probabilities are
  // multiplied by 1 / (1 - p). dropout_threshold == 0 means no dropout.
  uint32_t dropout_threshold = 0;
  uint32_t dropout_key = 0;
  double dropout_scale = 1.0;
  bool has_left = false, has_right = false;
  int64_t window_left = 0, window_right = 0;  // clamped to +-(Lq + Lk + 1): same visibility, no overflow
  const int32_t* key_lengths = nullptr;
  int64_t key_lengths_s = 0;
  const int32_t* query_lengths = nullptr;
  int64_t query_lengths_s = 0;
  MaskKind mask_kind = MaskKind::kNone;
  const void* mask = nullptr;
  int64_t mask_sb = 0, mask_sh = 0, mask_sq = 0, mask_sk = 0;
  const float* alibi = nullptr;
  int64_t alibi_sb = 0, alibi_sh = 0;
  // A BlockMask's per-tile element masks (instead of `mask`): partial tile (b, h, qb, kb) reads
  // partial_masks[tile_ids[b, h, qb, kb]], a (block_q, block_k) bool block; -1 = no element mask.
  const bool* partial_masks = nullptr;
  const int32_t* tile_ids = nullptr;
  int64_t tid_sb = 0, tid_sh = 0, tid_sq = 0, tid_sk = 0;
  // BlockMask lists (block_size_q/k > 0 when present).
  int64_t block_q = 0, block_k = 0;
  BlockList kv, kv_full, qt, qt_full;

  bool has_block_mask() const { return kv.present() || kv_full.present(); }
};

// Per-batch geometry: the offset that aligns query row i with key i + offset, and the lengths.
struct BatchGeometry {
  int64_t qlen, klen, offset;
};

inline BatchGeometry batch_geometry(const Params& p, int64_t b) {
  int64_t klen = p.key_lengths ? p.key_lengths[b * p.key_lengths_s] : p.Lk;
  int64_t qlen = p.query_lengths ? p.query_lengths[b * p.query_lengths_s] : p.Lq;
  return {qlen, klen, klen - qlen};
}

// The keys row i may see form one interval [lo, hi] (window band intersected with [0, klen));
// lo > hi when the row sees nothing (also for padded rows i >= qlen).
struct KeyRange {
  int64_t lo, hi;
};

inline KeyRange row_key_range(const Params& p, const BatchGeometry& g, int64_t i) {
  if (i >= g.qlen) return {1, 0};
  int64_t lo = p.has_left ? std::max<int64_t>(0, i + g.offset - p.window_left) : 0;
  int64_t hi = p.has_right ? std::min<int64_t>(g.klen - 1, i + g.offset + p.window_right) : g.klen - 1;
  return {lo, hi};
}

// Rows [first, last] (possibly empty) that may see some key of [k0, k1), from the band alone.
inline KeyRange rows_seeing_keys(const Params& p, const BatchGeometry& g, int64_t k0, int64_t k1) {
  k1 = std::min(k1, g.klen);
  if (k0 >= k1) return {1, 0};
  int64_t first = p.has_right ? std::max<int64_t>(0, k0 - g.offset - p.window_right) : 0;
  int64_t last = p.has_left ? std::min<int64_t>(g.qlen - 1, k1 - 1 - g.offset + p.window_left) : g.qlen - 1;
  return {first, last};
}

// ---------------------------------------------------------------------------------------------
// Dropout: a counter-based pattern, a pure function of (seed, b, h, i, j), so the backward
// regenerates what the forward drew. fastattn/backends/cpu.py (dropout_keep_mask) mirrors it.
// ---------------------------------------------------------------------------------------------

// The bits of `from` read as a To (std::bit_cast, which is C++20; torch before 2.14 builds C++17).
template <typename To, typename From>
inline To bit_copy(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_copy: sizes differ");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// A 32-bit integer hash (xorshift-multiply, multipliers below 2^31 so Python can mirror it in int64).
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x2c1b3c6dU;
  x ^= x >> 16;
  return x;
}

inline uint32_t dropout_key_from_seed(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return hash32(static_cast<uint32_t>(s) ^ hash32(static_cast<uint32_t>(s >> 32)));
}

// Sets p's dropout fields for probability dropout_p (in [0, 1)) and seed; dropout_p == 0 leaves them off.
inline void set_dropout(Params& p, double dropout_p, int64_t seed) {
  if (dropout_p <= 0) return;
  // Keep iff 24 random bits >= threshold: P(keep) = 1 - threshold / 2^24 (p to within 2^-24).
  p.dropout_threshold = std::max<uint32_t>(1, static_cast<uint32_t>(dropout_p * 16777216.0));
  p.dropout_key = dropout_key_from_seed(seed);
  p.dropout_scale = 1.0 / (1.0 - dropout_p);
}

// Sets the Params fields every op shares (all but the batch and the strides): sizes from s, scale, softcap,
// dropout, and the window. |i + offset - j| <= Lq + Lk, so clamping the window there changes no visibility and
// avoids overflow.
inline void set_shape_and_options(Params& p, const AttentionShape& s, double scale, double softcap, double dropout_p,
                                  int64_t seed, std::optional<int64_t> window_left,
                                  std::optional<int64_t> window_right) {
  p.Hq = s.heads_q, p.Hkv = s.heads_kv, p.Lq = s.seqlen_q, p.Lk = s.seqlen_k;
  p.D = s.head_dim, p.Dv = s.head_dim_v, p.group = s.heads_q / s.heads_kv;
  p.scale = scale;
  p.softcap = softcap;
  set_dropout(p, dropout_p, seed);
  const int64_t bound = s.seqlen_q + s.seqlen_k + 1;
  p.has_left = window_left.has_value();
  p.has_right = window_right.has_value();
  p.window_left = p.has_left ? std::clamp<int64_t>(*window_left, -bound, bound) : 0;
  p.window_right = p.has_right ? std::clamp<int64_t>(*window_right, -bound, bound) : 0;
}

// Writes keep / (1 - p) (or 0) for rows [q0, q0 + rows) and keys [k0, k0 + n) of (b, h) into f (row stride n).
template <typename acc_t>
void dropout_factors(const Params& p, int64_t b, int64_t h, int64_t q0, int64_t rows, int64_t k0, int64_t n,
                     acc_t* f) {
  const acc_t scale = static_cast<acc_t>(p.dropout_scale);
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t row_key = hash32(p.dropout_key ^ static_cast<uint32_t>((b * p.Hq + h) * p.Lq + q0 + r));
    acc_t* fr = f + r * n;
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t bits = hash32(row_key + static_cast<uint32_t>(k0 + j) * 0x61c88647U);
      fr[j] = (bits >> 8) >= p.dropout_threshold ? scale : acc_t(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tile plans: which (query range, key range) pairs a kernel visits.
// ---------------------------------------------------------------------------------------------

struct Range {
  int64_t begin, end;
};

// Sorted block indices -> coalesced element ranges of at most max_len (runs of adjacent blocks merge).
inline void coalesce_blocks(std::vector<int32_t>& blocks, int64_t block, int64_t limit, int64_t max_len,
                            std::vector<Range>& out) {
  out.clear();
  std::sort(blocks.begin(), blocks.end());
  blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());  // a tile listed twice is visited once
  for (int32_t blk : blocks) {
    int64_t b0 = blk * block, b1 = std::min<int64_t>(limit, (blk + 1) * block);
    if (b0 >= b1) continue;
    if (!out.empty() && out.back().end == b0 && b1 - out.back().begin <= max_len) {
      out.back().end = b1;
    } else {
      out.push_back({b0, b1});
    }
  }
}

// Splits [begin, end) into pieces of at most len.
inline void split_range(int64_t begin, int64_t end, int64_t len, std::vector<Range>& out) {
  out.clear();
  for (int64_t s = begin; s < end; s += len) out.push_back({s, std::min(end, s + len)});
}

// Forward: the key ranges query rows [q0, q1) of (b, h) visit. Without a BlockMask, the band of
// the rows in tiles of block_k; with one, the listed key blocks of query block q0 / block_q.
inline void forward_key_tiles(const Params& p, const BatchGeometry& g, int64_t b, int64_t h, int64_t q0, int64_t q1,
                              int64_t block_k, std::vector<int32_t>& scratch, std::vector<Range>& out) {
  out.clear();
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1;
  for (int64_t i = q0; i < q1; ++i) {
    KeyRange r = row_key_range(p, g, i);
    if (r.lo > r.hi) continue;
    lo = std::min(lo, r.lo);
    hi = std::max(hi, r.hi);
  }
  if (hi < lo) return;
  if (!p.has_block_mask()) {
    split_range(lo, hi + 1, block_k, out);
    return;
  }
  int64_t qb = q0 / p.block_q;
  scratch.clear();
  for (const BlockList* list : {&p.kv, &p.kv_full}) {
    if (!list->present()) continue;
    int32_t n = list->count(b, h, qb);
    for (int32_t c = 0; c < n; ++c) scratch.push_back(list->at(b, h, qb, c));
  }
  std::vector<Range> blocks;
  coalesce_blocks(scratch, p.block_k, p.Lk, std::max(block_k, p.block_k), blocks);
  for (const Range& r : blocks) {
    int64_t b0 = std::max(r.begin, lo), b1 = std::min(r.end, hi + 1);
    if (b0 < b1) out.push_back({b0, b1});
  }
}

// Backward: the key tiles of (b, kv-head) -- the band's keys in tiles of block_k, or the BlockMask's
// key blocks. The same for every query head of a GQA group, so the tiles do not depend on h.
inline void backward_key_tiles(const Params& p, int64_t block_k, std::vector<Range>& out) {
  if (!p.has_block_mask()) {
    split_range(0, p.Lk, block_k, out);
  } else {
    split_range(0, p.Lk, p.block_k, out);
  }
}

// Backward: the query ranges of (b, h) that see key tile [k0, k1).
inline void backward_query_tiles(const Params& p, const BatchGeometry& g, int64_t b, int64_t h, int64_t k0, int64_t k1,
                                 int64_t block_q, std::vector<int32_t>& scratch, std::vector<Range>& out) {
  out.clear();
  KeyRange rows = rows_seeing_keys(p, g, k0, k1);
  if (rows.lo > rows.hi) return;
  if (!p.has_block_mask()) {
    split_range(rows.lo, rows.hi + 1, block_q, out);
    return;
  }
  int64_t kb = k0 / p.block_k;
  scratch.clear();
  for (const BlockList* list : {&p.qt, &p.qt_full}) {
    if (!list->present()) continue;
    int32_t n = list->count(b, h, kb);
    for (int32_t c = 0; c < n; ++c) scratch.push_back(list->at(b, h, kb, c));
  }
  std::vector<Range> blocks;
  coalesce_blocks(scratch, p.block_q, p.Lq, std::max(block_q, p.block_q), blocks);
  for (const Range& r : blocks) {
    int64_t r0 = std::max(r.begin, rows.lo), r1 = std::min(r.end, rows.hi + 1);
    if (r0 < r1) out.push_back({r0, r1});
  }
}

// ---------------------------------------------------------------------------------------------
// Tile math.
// ---------------------------------------------------------------------------------------------

enum class Trans { kNo, kYes };

// Row-major C (M, N) = alpha * op(A) op(B) + beta * C, with op(A) (M, K) and op(B) (K, N);
// lda/ldb/ldc are row strides. float and double only (other dtypes are converted to float tiles).
void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

// x[j] = exp(x[j] - shift) for j < n (0 where x[j] is -inf); returns the sum.
float exp_shift_sum(float* x, int64_t n, float shift);
double exp_shift_sum(double* x, int64_t n, double shift);
// x[j] = exp(x[j] - shift) for j < n (0 where x[j] is -inf).
void exp_shift(float* x, int64_t n, float shift);
void exp_shift(double* x, int64_t n, double shift);
// max_j x[j] (-inf for n == 0 or all -inf).
float row_max(const float* x, int64_t n);
double row_max(const double* x, int64_t n);

// The accumulation type: float for float/bfloat16/half, double for double.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// A (rows, cols) tile of a strided matrix as acc_t: the memory itself when scalar_t is acc_t,
// else a converted copy in `scratch` (row stride cols). Returns the pointer; *ld receives its row stride.
template <typename scalar_t, typename acc_t>
inline const acc_t* tile_as_acc(const scalar_t* base, int64_t rows, int64_t cols, int64_t row_stride, acc_t* scratch,
                                int64_t* ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    *ld = row_stride;
    return base;
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* src = base + r * row_stride;
      acc_t* dst = scratch + r * cols;
      for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<acc_t>(src[c]);
    }
    *ld = cols;
    return scratch;
  }
}

// Score + additive mask entry, where an entry of -inf hides the key by selection (a NaN score from a
// non-finite hidden key must not survive as NaN + -inf).
template <typename acc_t>
inline acc_t add_bias(acc_t s, acc_t bias) {
  return bias == -std::numeric_limits<acc_t>::infinity() ? bias : s + bias;
}

// True when a visible score of the row is NaN or +inf (a non-finite input the row sees): the
// contract makes such a row NaN rather than letting the online softmax silently drop it.
template <typename acc_t>
inline bool row_has_nonfinite(const acc_t* s, int64_t n) {
  bool bad = false;
  for (int64_t j = 0; j < n; ++j) bad |= !(s[j] < std::numeric_limits<acc_t>::infinity());
  return bad;
}

// True when every entry of a (rows, cols) tile (row stride ld) is finite.
template <typename acc_t>
inline bool tile_finite(const acc_t* x, int64_t rows, int64_t cols, int64_t ld) {
  bool ok = true;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) ok &= std::isfinite(x[r * ld + c]);
  return ok;
}

// A key (K or V) tile of n rows x cols (row stride ld) with its non-finite entries set to 0, copied to
// out (row stride cols). A product with it cannot carry the NaN/Inf of a key to a row that does not see
// the key (0 * NaN = NaN): the rows that do see it are NaN by selection (add_pv_nonfinite; the
// backward's NaN rows). Only called for tiles that hold a non-finite value.
template <typename acc_t>
inline const acc_t* finite_or_zero(const acc_t* x, int64_t n, int64_t cols, int64_t ld, acc_t* out) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < cols; ++c) out[j * cols + c] = std::isfinite(x[j * ld + c]) ? x[j * ld + c] : acc_t(0);
  return out;
}

// acc (rows x Dv) += P V for a V tile (n x Dv, row stride ldv) holding a non-finite value, by selection:
// the product runs on V without its non-finite entries, and a row that sees key j (seen[r * n + j], taken
// from the scores before the softmax, so a probability that underflows to 0 still counts) gets NaN in
// the columns where V[j] is non-finite. A hidden NaN/Inf value thus reaches no row, whichever other rows
// of the tile see it; a visible one makes exactly those columns NaN, as in the reference.
template <typename acc_t>
inline void add_pv_nonfinite(const acc_t* P, const char* seen, int64_t rows, int64_t n, const acc_t* V, int64_t ldv,
                             int64_t Dv, acc_t* v_clean, acc_t* acc) {
  gemm(Trans::kNo, Trans::kNo, rows, Dv, n, acc_t(1), P, n, finite_or_zero(V, n, Dv, ldv, v_clean), Dv, acc_t(1), acc,
       Dv);
  for (int64_t j = 0; j < n; ++j) {
    if (tile_finite(V + j * ldv, 1, Dv, ldv)) continue;
    for (int64_t r = 0; r < rows; ++r) {
      if (!seen[r * n + j]) continue;
      for (int64_t c = 0; c < Dv; ++c)
        if (!std::isfinite(V[j * ldv + c])) acc[r * Dv + c] = std::numeric_limits<acc_t>::quiet_NaN();
    }
  }
}

// One online-softmax step over a tile of scores S (rows x n, row stride ld, default n; after
// transform_scores or the decode kernel's masking), in place: S becomes P = exp(S - m_new), the
// running max m and sum l advance, and acc (rows x Dv) is rescaled.
// A row with a non-finite visible score is marked in bad and uses nothing more (its P is 0).
template <typename acc_t>
inline void online_softmax_step(acc_t* S, int64_t rows, int64_t n, acc_t* m, acc_t* l, char* bad, acc_t* acc,
                                int64_t Dv, int64_t ld = 0) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  if (ld == 0) ld = n;
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* s = S + r * ld;
    if (bad[r] || row_has_nonfinite(s, n)) {  // the row will be NaN; it uses nothing more
      bad[r] = 1;
      std::fill(s, s + n, acc_t(0));
      continue;
    }
    const acc_t m_new = std::max(m[r], row_max(s, n));
    if (m_new == neg_inf) {  // nothing visible in this row yet: P = 0
      std::fill(s, s + n, acc_t(0));
      continue;
    }
    const acc_t sum = exp_shift_sum(s, n, m_new);
    const acc_t correction = m[r] == neg_inf ? acc_t(0) : std::exp(m[r] - m_new);
    l[r] = l[r] * correction + sum;
    m[r] = m_new;
    if (correction != acc_t(1)) {
      acc_t* a = acc + r * Dv;
      for (int64_t c = 0; c < Dv; ++c) a[c] *= correction;
    }
  }
}

// seen[e] = S[e] is not -inf, for the rows x n scores of a tile after transform_scores: which keys each row sees.
template <typename acc_t>
inline void seen_keys(const acc_t* S, int64_t count, char* seen) {
  for (int64_t e = 0; e < count; ++e) seen[e] = S[e] != -std::numeric_limits<acc_t>::infinity();
}

// Applies softcap, ALiBi, the additive or bool attn_mask and the key-range band to a score tile
// S (rows [q0, q1), keys [k0, k1), row stride ld): masked scores become -inf. With softcap, the
// factor 1 - tanh^2 of each score is written to dtanh (same layout) when dtanh is non-null.
template <typename acc_t>
void transform_scores(const Params& p, const BatchGeometry& g, int64_t b, int64_t h, int64_t q0, int64_t q1, int64_t k0,
                      int64_t k1, acc_t* S, int64_t ld, acc_t* dtanh) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t n = k1 - k0;
  const acc_t slope = p.alibi ? static_cast<acc_t>(p.alibi[b * p.alibi_sb + h * p.alibi_sh]) : acc_t(0);
  for (int64_t i = q0; i < q1; ++i) {
    acc_t* s = S + (i - q0) * ld;
    if (p.softcap > 0) {
      const acc_t cap = static_cast<acc_t>(p.softcap), inv = acc_t(1) / cap;
      acc_t* dt = dtanh ? dtanh + (i - q0) * ld : nullptr;
      for (int64_t j = 0; j < n; ++j) {
        acc_t t = std::tanh(s[j] * inv);
        s[j] = cap * t;
        if (dt) dt[j] = acc_t(1) - t * t;
      }
    }
    if (p.alibi) {
      const int64_t diag = i + g.offset - k0;
      for (int64_t j = 0; j < n; ++j) s[j] -= slope * static_cast<acc_t>(std::abs(diag - j));
    }
    if (p.mask_kind != MaskKind::kNone) {
      const int64_t base = b * p.mask_sb + h * p.mask_sh + i * p.mask_sq + k0 * p.mask_sk;
      const int64_t sk = p.mask_sk;
      switch (p.mask_kind) {
        case MaskKind::kBool: {
          const bool* m = static_cast<const bool*>(p.mask) + base;
          for (int64_t j = 0; j < n; ++j) s[j] = m[j * sk] ? s[j] : neg_inf;
          break;
        }
        case MaskKind::kFloat: {
          const float* m = static_cast<const float*>(p.mask) + base;
          for (int64_t j = 0; j < n; ++j) s[j] = add_bias(s[j], static_cast<acc_t>(m[j * sk]));
          break;
        }
        case MaskKind::kDouble: {
          const double* m = static_cast<const double*>(p.mask) + base;
          for (int64_t j = 0; j < n; ++j) s[j] = add_bias(s[j], static_cast<acc_t>(m[j * sk]));
          break;
        }
        case MaskKind::kBFloat16: {
          const at::BFloat16* m = static_cast<const at::BFloat16*>(p.mask) + base;
          for (int64_t j = 0; j < n; ++j) s[j] = add_bias(s[j], static_cast<acc_t>(static_cast<float>(m[j * sk])));
          break;
        }
        case MaskKind::kHalf: {
          const at::Half* m = static_cast<const at::Half*>(p.mask) + base;
          for (int64_t j = 0; j < n; ++j) s[j] = add_bias(s[j], static_cast<acc_t>(static_cast<float>(m[j * sk])));
          break;
        }
        case MaskKind::kNone:
          break;
      }
    }
    if (p.partial_masks) {
      // Key block by key block: the element mask of partial tiles, none on the others.
      const int64_t qb = i / p.block_q, row = i - qb * p.block_q;
      const int32_t* ids = p.tile_ids + b * p.tid_sb + h * p.tid_sh + qb * p.tid_sq;
      for (int64_t j0 = 0; j0 < n;) {
        const int64_t kb = (k0 + j0) / p.block_k;
        const int64_t j1 = std::min(n, (kb + 1) * p.block_k - k0);
        const int32_t id = ids[kb * p.tid_sk];
        if (id >= 0) {
          const bool* m = p.partial_masks + (id * p.block_q + row) * p.block_k + (k0 + j0 - kb * p.block_k);
          for (int64_t j = j0; j < j1; ++j) s[j] = m[j - j0] ? s[j] : neg_inf;
        }
        j0 = j1;
      }
    }
    KeyRange r = row_key_range(p, g, i);
    int64_t lo = std::clamp<int64_t>(r.lo - k0, 0, n), hi = std::clamp<int64_t>(r.hi + 1 - k0, 0, n);
    if (lo >= hi) {
      std::fill(s, s + n, neg_inf);
    } else {
      std::fill(s, s + lo, neg_inf);
      std::fill(s + hi, s + n, neg_inf);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The forward's tile step (attention_fwd.cpp, varlen.cpp; the backward's recomputation of out).
// ---------------------------------------------------------------------------------------------

// One thread's buffers for the forward's tiles of at most (tile_q, tile_k), with a query tile's state:
// the unnormalised output acc and the online softmax's running max m, sum l and bad rows.
template <typename scalar_t, typename acc_t>
struct ForwardScratch {
  int64_t Dv;
  std::vector<acc_t> S, acc, m, l;  // [tile_q, tile_k]: scores, then P; [tile_q, Dv]; [tile_q], [tile_q]
  std::vector<acc_t> drop;          // [tile_q, tile_k]: dropout factors (dropout only)
  std::vector<acc_t> v_clean;       // [tile_k, Dv]: a V tile without its non-finite entries (such tiles only)
  std::vector<char> seen;           // [tile_q, tile_k]: the keys each row sees (tiles with a non-finite V only)
  std::vector<char> bad;            // [tile_q]: rows with a non-finite visible score: NaN out and lse
  std::vector<acc_t> q_buf, k_buf, v_buf;  // converted tiles (bfloat16/half inputs only)
  std::vector<int32_t> list_scratch;       // for forward_key_tiles
  std::vector<Range> key_tiles;

  ForwardScratch(const Params& p, int64_t tile_q, int64_t tile_k)
      : Dv(p.Dv),
        S(tile_q * tile_k),
        acc(tile_q * p.Dv),
        m(tile_q),
        l(tile_q),
        drop(p.dropout_threshold ? tile_q * tile_k : 0),
        v_clean(tile_k * p.Dv),
        seen(tile_q * tile_k),
        bad(tile_q) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      q_buf.resize(tile_q * p.D);
      k_buf.resize(tile_k * p.D);
      v_buf.resize(tile_k * p.Dv);
    }
  }

  // Clears the state for a query tile of `rows` rows.
  void start(int64_t rows) {
    std::fill(m.begin(), m.begin() + rows, -std::numeric_limits<acc_t>::infinity());
    std::fill(l.begin(), l.begin() + rows, acc_t(0));
    std::fill(acc.begin(), acc.begin() + rows * Dv, acc_t(0));
    std::fill(bad.begin(), bad.begin() + rows, 0);
  }

  // The online softmax step (forward_tile_step's `probabilities` in the forward kernels).
  void online_softmax(acc_t* scores, int64_t rows, int64_t n) {
    online_softmax_step(scores, rows, n, m.data(), l.data(), bad.data(), acc.data(), Dv);
  }

  // out = acc / l (row stride o_sr) and lse = m + log l of the tile's rows: 0 and -inf for a row that
  // saw nothing, NaN for a bad row.
  template <typename out_t, typename lse_t>
  void finish(int64_t rows, out_t* o, int64_t o_sr, lse_t* lse) const {
    for (int64_t r = 0; r < rows; ++r) {
      const bool seen_any = l[r] > acc_t(0);
      const acc_t inv = seen_any ? acc_t(1) / l[r] : acc_t(0);
      const acc_t* a = acc.data() + r * Dv;
      for (int64_t c = 0; c < Dv; ++c) o[r * o_sr + c] = static_cast<out_t>(a[c] * inv);
      lse[r] = seen_any ? static_cast<lse_t>(m[r] + std::log(l[r])) : -std::numeric_limits<lse_t>::infinity();
      if (bad[r]) {
        for (int64_t c = 0; c < Dv; ++c) o[r * o_sr + c] = static_cast<out_t>(std::numeric_limits<float>::quiet_NaN());
        lse[r] = std::numeric_limits<lse_t>::quiet_NaN();
      }
    }
  }
};

// Key tile [k0, k1) of query rows [q0, q1) of (b, h) in the forward: Q (rows x D, row stride ldq)
// loaded, k and v pointing at key k0 (row strides p.k_sr, p.v_sr):
//
//   S = transform(scale Q K^T)         # [rows, n]
//   probabilities(S, rows, n)          # in place: the online softmax step, or the backward's P from lse
//   w.acc += (S * dropout factors) V   # [rows, Dv]; dropped with the pattern of `dropout`
//
// A V tile holding NaN/Inf reaches exactly the rows that see those keys (add_pv_nonfinite).
template <typename scalar_t, typename acc_t, typename Probabilities>
void forward_tile_step(const Params& p, const Params& dropout, const BatchGeometry& g, int64_t b, int64_t h,
                       int64_t q0, int64_t q1, int64_t k0, int64_t k1, const acc_t* Q, int64_t ldq, const scalar_t* k,
                       const scalar_t* v, const Probabilities& probabilities, ForwardScratch<scalar_t, acc_t>& w) {
  const int64_t D = p.D, Dv = p.Dv, rows = q1 - q0, n = k1 - k0;
  acc_t* S = w.S.data();
  int64_t ldk, ldv;
  const acc_t* K = tile_as_acc<scalar_t, acc_t>(k, n, D, p.k_sr, w.k_buf.data(), &ldk);
  gemm(Trans::kNo, Trans::kYes, rows, n, D, static_cast<acc_t>(p.scale), Q, ldq, K, ldk, acc_t(0), S, n);
  transform_scores<acc_t>(p, g, b, h, q0, q1, k0, k1, S, n, nullptr);
  const acc_t* V = tile_as_acc<scalar_t, acc_t>(v, n, Dv, p.v_sr, w.v_buf.data(), &ldv);
  const bool v_finite = tile_finite(V, n, Dv, ldv);
  if (!v_finite) seen_keys(S, rows * n, w.seen.data());
  probabilities(S, rows, n);
  if (p.dropout_threshold) {  // the online softmax's l keeps the undropped sum; only P V sees the dropout
    acc_t* drop = w.drop.data();
    dropout_factors<acc_t>(dropout, b, h, q0, rows, k0, n, drop);
    for (int64_t e = 0; e < rows * n; ++e) S[e] *= drop[e];
  }
  if (v_finite) {
    gemm(Trans::kNo, Trans::kNo, rows, Dv, n, acc_t(1), S, n, V, ldv, acc_t(1), w.acc.data(), Dv);
  } else {
    add_pv_nonfinite(S, w.seen.data(), rows, n, V, ldv, Dv, w.v_clean.data(), w.acc.data());
  }
}

// Query rows [q0, q1) of (b, h) over every key tile they see (forward_key_tiles, tiles of tile_k): the
// state cleared, then forward_tile_step per tile. q points at row q0 (row stride p.q_sr), k and v at
// key 0 of the rows' key head (row strides p.k_sr, p.v_sr). The state is left in w for w.finish.
template <typename scalar_t, typename acc_t, typename Probabilities>
void forward_rows(const Params& p, const Params& dropout, const BatchGeometry& g, int64_t b, int64_t h, int64_t q0,
                  int64_t q1, int64_t tile_k, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                  const Probabilities& probabilities, ForwardScratch<scalar_t, acc_t>& w) {
  w.start(q1 - q0);
  forward_key_tiles(p, g, b, h, q0, q1, tile_k, w.list_scratch, w.key_tiles);
  if (w.key_tiles.empty()) return;
  int64_t ldq;
  const acc_t* Q = tile_as_acc<scalar_t, acc_t>(q, q1 - q0, p.D, p.q_sr, w.q_buf.data(), &ldq);
  for (const Range& kr : w.key_tiles)
    forward_tile_step(p, dropout, g, b, h, q0, q1, kr.begin, kr.end, Q, ldq, k + kr.begin * p.k_sr,
                      v + kr.begin * p.v_sr, probabilities, w);
}

// rowsum(dO * O) of one row (Dv values) for delta: O is o_rec, out recomputed in acc_t (null: none),
// where out is its rounding (every value within one ulp of scalar_t), else out as given (a NaN, or the
// merged output of a context-parallel call; see attention_bwd.cpp's recompute_out_dot_dout).
template <typename scalar_t, typename acc_t>
inline acc_t out_dot_dout(const scalar_t* o, const acc_t* o_rec, const scalar_t* d, int64_t Dv) {
  const acc_t ulp = static_cast<acc_t>(static_cast<float>(std::numeric_limits<scalar_t>::epsilon()));
  const acc_t tiny = static_cast<acc_t>(static_cast<float>(std::numeric_limits<scalar_t>::denorm_min()));
  bool rounded = o_rec != nullptr;
  for (int64_t c = 0; rounded && c < Dv; ++c)
    rounded = std::abs(static_cast<acc_t>(o[c]) - o_rec[c]) <= ulp * std::abs(o_rec[c]) + tiny;
  acc_t sum = 0;
  for (int64_t c = 0; c < Dv; ++c) sum += (rounded ? o_rec[c] : static_cast<acc_t>(o[c])) * static_cast<acc_t>(d[c]);
  return sum;
}

// ---------------------------------------------------------------------------------------------
// The backward's tile step (attention_bwd.cpp, varlen.cpp).
// ---------------------------------------------------------------------------------------------

// Scores s[0, n) of a row -> probabilities exp(s - shift) in place: 0 for a row that sees nothing
// (unseen), NaN at the visible keys of a NaN row (shift NaN: a non-finite visible input).
template <typename acc_t>
inline void probabilities_from_shift(acc_t* s, int64_t n, acc_t shift, bool unseen) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  if (std::isnan(shift)) {
    for (int64_t j = 0; j < n; ++j) s[j] = s[j] == neg_inf ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
  } else if (unseen) {
    std::fill(s, s + n, acc_t(0));
  } else {
    exp_shift(s, n, shift);
  }
}

// A key tile of the backward as acc_t (BackwardScratch::load_keys).
template <typename acc_t>
struct BackwardKeyTile {
  int64_t k0, k1;
  const acc_t* K;     // [n, D], row stride ldk
  const acc_t* V;     // [n, Dv], row stride ldv
  const acc_t* K_dq;  // [n, D], row stride ldk_dq: K without its non-finite entries, for dQ = dS K
  int64_t ldk, ldv, ldk_dq;
};

// A query tile of the backward as acc_t (BackwardScratch::load_queries).
template <typename acc_t>
struct BackwardQueryTile {
  int64_t q0, q1;
  const acc_t* Q;   // [rows, D], row stride ldq
  const acc_t* dO;  // [rows, Dv], row stride lddo
  int64_t ldq, lddo;
};

// One thread's buffers for the backward's tiles of at most (tile_q, tile_k). A task loads a key tile
// (load_keys, which also clears its dK, dV), runs backward_tile_step for every query tile that sees
// it (load_queries), then writes the key tile's dK, dV (store_dk_dv).
template <typename scalar_t, typename acc_t>
struct BackwardScratch {
  int64_t D, Dv;
  std::vector<acc_t> S, dP, dT;        // [tile_q, tile_k]: scores, then P; dP, then dS; softcap's 1 - tanh^2
  std::vector<acc_t> drop, p_dropped;  // [tile_q, tile_k]: dropout factors and the dropped P (dropout only)
  std::vector<acc_t> dk_acc, dv_acc;   // [tile_k, D], [tile_k, Dv]: the key tile's dK, dV
  std::vector<acc_t> q_buf, do_buf, k_buf, v_buf;  // converted tiles (bfloat16/half inputs only)
  std::vector<acc_t> k_clean;                      // a K tile without its non-finite entries (such tiles only)
  std::vector<int32_t> list_scratch;               // for backward_query_tiles
  std::vector<Range> query_tiles;

  BackwardScratch(const Params& p, int64_t tile_q, int64_t tile_k)
      : D(p.D),
        Dv(p.Dv),
        S(tile_q * tile_k),
        dP(tile_q * tile_k),
        dT(p.softcap > 0 ? tile_q * tile_k : 0),
        drop(p.dropout_threshold ? tile_q * tile_k : 0),
        p_dropped(p.dropout_threshold ? tile_q * tile_k : 0),
        dk_acc(tile_k * p.D),
        dv_acc(tile_k * p.Dv),
        k_clean(tile_k * p.D) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      q_buf.resize(tile_q * D);
      do_buf.resize(tile_q * Dv);
      k_buf.resize(tile_k * D);
      v_buf.resize(tile_k * Dv);
    }
  }

  // Keys [k0, k1) from k and v (pointing at key k0, row strides k_sr, v_sr); clears dK, dV.
  BackwardKeyTile<acc_t> load_keys(int64_t k0, int64_t k1, const scalar_t* k, int64_t k_sr, const scalar_t* v,
                                   int64_t v_sr) {
    const int64_t n = k1 - k0;
    BackwardKeyTile<acc_t> t{k0, k1};
    t.K = tile_as_acc<scalar_t, acc_t>(k, n, D, k_sr, k_buf.data(), &t.ldk);
    t.V = tile_as_acc<scalar_t, acc_t>(v, n, Dv, v_sr, v_buf.data(), &t.ldv);
    // dQ = dS K must not carry a non-finite key to a row that does not see it (0 * NaN = NaN): it runs
    // on K without its non-finite entries; a row that sees one has NaN in P, so dS and dQ are NaN anyway.
    t.K_dq = t.K;
    t.ldk_dq = t.ldk;
    if (!tile_finite(t.K, n, D, t.ldk)) {
      t.K_dq = finite_or_zero(t.K, n, D, t.ldk, k_clean.data());
      t.ldk_dq = D;
    }
    std::fill(dk_acc.begin(), dk_acc.begin() + n * D, acc_t(0));
    std::fill(dv_acc.begin(), dv_acc.begin() + n * Dv, acc_t(0));
    return t;
  }

  // Query rows [q0, q1) from q and dout (pointing at row q0, row strides q_sr, do_sr).
  BackwardQueryTile<acc_t> load_queries(int64_t q0, int64_t q1, const scalar_t* q, int64_t q_sr,
                                        const scalar_t* dout, int64_t do_sr) {
    BackwardQueryTile<acc_t> t{q0, q1};
    t.Q = tile_as_acc<scalar_t, acc_t>(q, q1 - q0, D, q_sr, q_buf.data(), &t.ldq);
    t.dO = tile_as_acc<scalar_t, acc_t>(dout, q1 - q0, Dv, do_sr, do_buf.data(), &t.lddo);
    return t;
  }

  // dK, dV of the n keys of the tile into dk and dv (pointing at its first key; row, column strides).
  void store_dk_dv(int64_t n, scalar_t* dk, int64_t dk_sr, int64_t dk_sc, scalar_t* dv, int64_t dv_sr,
                   int64_t dv_sc) const {
    for (int64_t j = 0; j < n; ++j) {
      scalar_t* dkr = dk + j * dk_sr;
      scalar_t* dvr = dv + j * dv_sr;
      for (int64_t c = 0; c < D; ++c) dkr[c * dk_sc] = static_cast<scalar_t>(dk_acc[j * D + c]);
      for (int64_t c = 0; c < Dv; ++c) dvr[c * dv_sc] = static_cast<scalar_t>(dv_acc[j * Dv + c]);
    }
  }
};

// The backward of one (query tile, key tile) pair of (b, h), for the forward's P (dropped with the
// pattern of `dropout`; a kernel's own p, or a sequence's, varlen.cpp):
//
//   P  = probabilities(transform(scale Q K^T))    # [rows, n]
//   dV += P_dropped^T dO                          # [n, Dv]
//   dP = (dO V^T) * dropout factors               # [rows, n]
//   dS = P * (dP - delta), 0 where P = 0          # [rows, n]; on_ds(dS) sees it (the mask gradient)
//   dX = dS * (1 - tanh^2) with softcap, else dS
//   dK += scale dX^T Q  # [n, D];  dQ += scale dX K  # [rows, D]
//
// probabilities(i, s, n) turns the scores s[0, n) of query row i into P in place; delta[i] is row i's
// rowsum(dO * O) - dlse and dq row i's dQ accumulator (row stride D), both indexed from row 0.
template <typename scalar_t, typename acc_t, typename Probabilities, typename OnDs>
void backward_tile_step(const Params& p, const Params& dropout, const BatchGeometry& g, int64_t b, int64_t h,
                        const BackwardKeyTile<acc_t>& kt, const BackwardQueryTile<acc_t>& qt, const acc_t* delta,
                        const Probabilities& probabilities, const OnDs& on_ds, BackwardScratch<scalar_t, acc_t>& w,
                        acc_t* dq) {
  const int64_t D = p.D, Dv = p.Dv, q0 = qt.q0, rows = qt.q1 - qt.q0, k0 = kt.k0, n = kt.k1 - kt.k0;
  acc_t* S = w.S.data();
  acc_t* dP = w.dP.data();
  acc_t* dT = w.dT.data();
  acc_t* drop = w.drop.data();
  // P = exp(S - lse)  # [rows, n]
  gemm(Trans::kNo, Trans::kYes, rows, n, D, static_cast<acc_t>(p.scale), qt.Q, qt.ldq, kt.K, kt.ldk, acc_t(0), S, n);
  transform_scores<acc_t>(p, g, b, h, q0, qt.q1, k0, kt.k1, S, n, p.softcap > 0 ? dT : nullptr);
  for (int64_t r = 0; r < rows; ++r) probabilities(q0 + r, S + r * n, n);
  const acc_t* P_for_dv = S;
  if (p.dropout_threshold) {
    acc_t* p_dropped = w.p_dropped.data();
    dropout_factors<acc_t>(dropout, b, h, q0, rows, k0, n, drop);
    for (int64_t e = 0; e < rows * n; ++e) p_dropped[e] = S[e] * drop[e];
    P_for_dv = p_dropped;
  }
  // dV += P_dropped^T dO  # [n, Dv]
  gemm(Trans::kYes, Trans::kNo, n, Dv, rows, acc_t(1), P_for_dv, n, qt.dO, qt.lddo, acc_t(1), w.dv_acc.data(), Dv);
  // dP = (dO V^T) * dropout factors  # [rows, n]
  gemm(Trans::kNo, Trans::kYes, rows, n, Dv, acc_t(1), qt.dO, qt.lddo, kt.V, kt.ldv, acc_t(0), dP, n);
  if (p.dropout_threshold) {
    for (int64_t e = 0; e < rows * n; ++e) dP[e] *= drop[e];
  }
  // dS = P * (dP - delta), in place of dP
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t row_delta = delta[q0 + r];
    const acc_t* pr = S + r * n;
    acc_t* ds = dP + r * n;
    // A selection, not a product: P = 0 (a hidden key) gives 0 even where dP is NaN.
    for (int64_t j = 0; j < n; ++j) ds[j] = pr[j] == acc_t(0) ? acc_t(0) : pr[j] * (ds[j] - row_delta);
  }
  on_ds(static_cast<const acc_t*>(dP));
  if (p.softcap > 0) {  // the softcap chain rule, a selection again: dT is NaN on hidden keys holding NaN
    for (int64_t e = 0; e < rows * n; ++e) dP[e] = dP[e] == acc_t(0) ? acc_t(0) : dP[e] * dT[e];
  }
  // dK += scale dS^T Q  # [n, D];  dQ += scale dS K  # [rows, D]
  gemm(Trans::kYes, Trans::kNo, n, D, rows, static_cast<acc_t>(p.scale), dP, n, qt.Q, qt.ldq, acc_t(1),
       w.dk_acc.data(), D);
  gemm(Trans::kNo, Trans::kNo, rows, D, n, static_cast<acc_t>(p.scale), dP, n, kt.K_dq, kt.ldk_dq, acc_t(1),
       dq + q0 * D, D);
}

// Kernel entry points (attention_fwd.cpp, attention_bwd.cpp): dtype dispatch over float, double,
// bfloat16 and half. Tile sizes apply without a BlockMask (with one, its block sizes set the tiles).
void attention_forward_dispatch(const Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                at::Tensor& out, at::Tensor& lse, int64_t block_q, int64_t block_k);
// dlse (B, Hq, Lq) float32, the gradient w.r.t. lse, may be null.
void attention_backward_dispatch(const Params& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor* dlse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                                 at::Tensor* dbias, int64_t block_q, int64_t block_k);

}  // namespace fastattn::cpu
