// Tensor-core attention kernels (mma.sync m16n8k16, sm_80+): the forward, and the backward (delta =
// rowsum(dO * O); one kernel per key block doing the five products, dQ added to a float32
// accumulator by atomics, or in the deterministic mode in a fixed key-block order). See
// docs/cuda-kernels.md.
//
// Each warp owns 16 rows of the tile it accumulates (query rows in the forward, key rows in the
// backward); the forward runs 8 warps (128 query rows), the backward 4.
// Scores, softmax statistics and accumulators are float32; the probabilities and dS are rounded to
// the input dtype for the second product, as flash-attention does.
#pragma once

#include <math_constants.h>
#include <stdint.h>

#include "block_lists.h"
#include "mma.cuh"

namespace fastattn {
namespace cuda {

// The tile bookkeeping (which key tiles a query tile visits, and which need element masks) is
// plain integer code, also compiled for the host: tests/cuda/schedule_check.cu runs it on the CPU.
#define FASTATTN_HOST_DEVICE __host__ __device__ __forceinline__

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kHalfMask = 2, kBFloat16Mask = 3, kFloatMask = 4 };

// Scores with an additive mask stay in natural units and are added as they are, with no floor: a
// mask at finfo(float32).min (Hugging Face's padding) gives scores near -3.4e38 that stay finite, and
// log2(e) multiplies s - m, never s (FwdTraits::kNaturalUnits). A row whose every visible score sits
// under such a mask then has |lse| = |m + log l| so large that float32 has lost log l (at 3.4e38 or
// 1e9), or rounds it coarsely (2^-7 at 1e5), so the backward cannot take P = exp(s - lse). Rows with
// |lse| > kHugeLse get their (m, 1 / l) recomputed by the forward kernel in a statistics mode
// (AttentionParams::row_shift), and the backward takes P' = exp(s - m) = l P with dO scaled by 1 / l
// (attention_bwd_delta_kernel), so that P' dO' and P' (dP' - delta') are the true products. Below
// the threshold, lse's rounding (at most 2^-14) is no more than float32's rounding of such scores.
constexpr float kHugeLse = 1024.f;

// Whether a row's lse needs the recomputed statistics (finite: a row that saw nothing has -inf and
// keeps it, a row that saw a NaN keeps its NaN).
__device__ __forceinline__ bool huge_lse(float lse) { return fabsf(lse) > kHugeLse && fabsf(lse) != CUDART_INF_F; }

struct AttentionParams {
  // pointers (T = the input dtype)
  const void* q = nullptr;   // (B, Hq, Lq, D)
  const void* k = nullptr;   // (B, Hkv, Lk, D)
  const void* v = nullptr;   // (B, Hkv, Lk, D)
  void* out = nullptr;       // (B, Hq, Lq, D): written by the forward, read by the delta kernel
  float* lse = nullptr;      // (B, Hq, Lq) contiguous, natural log
  const void* dout = nullptr;  // (B, Hq, Lq, D)
  float* delta = nullptr;    // (B, Hq, Lq) contiguous
  float* dq_accum = nullptr; // (B, Hq, Lq, D) contiguous float32: dQ, summed by the key-block kernel
  // (B, Hq, ceil(Lq / kBlockM)) int32, zeros: the deterministic mode's count of the dQ additions
  // done per query tile (the next key block in the order waits for its rank there), or null
  int* dq_semaphore = nullptr;
  // Deterministic mode with block lists: (B|1, Hq|1, nQB, nKB + 1) int32, entry [.., qb, kb] = the
  // number of key blocks before kb in query block qb's lists (dq_rank), or null
  const int* dq_rank_prefix = nullptr;
  int64_t dq_rank_prefix_stride[3] = {0, 0, 0};
  void* dk = nullptr;        // (B, Hq, Lk, D): one slice per query head (the host sums GQA groups)
  void* dv = nullptr;        // (B, Hq, Lk, D)
  float* dbias = nullptr;    // d(loss)/d(additive attn_mask) in the mask's broadcast shape, or null
  int64_t dbias_stride[4] = {0, 0, 0, 0};  // 0 on the dimensions the mask broadcasts
  bool dbias_reduced = false;              // some dimension is summed over (atomics)
  // strides in elements: batch, head, row (the last stride is 1)
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3], dout_stride[3], dk_stride[3], dv_stride[3];
  // sizes
  int batch, heads_q, heads_kv, group, seqlen_q, seqlen_k;
  // score transformations
  float scale, softcap, inv_softcap;
  bool has_window_left, has_window_right;
  int window_left, window_right;  // clamped to +-(Lq + Lk + 1) on the host
  const int* key_lengths = nullptr;    // (B,) or null
  const int* query_lengths = nullptr;  // (B,) or null
  const float* alibi = nullptr;        // (B, Hq) or null
  int64_t alibi_stride[2] = {0, 0};
  const void* mask = nullptr;  // (B, Hq, Lq, Lk) bool or additive float, any strides
  int mask_kind = kNoMask;
  int64_t mask_stride[4] = {0, 0, 0, 0};
  // block-sparse tile lists; block sizes are multiples of the kernel tiles (checked on the host)
  bool use_block_lists = false;
  int mask_block_q = 0, mask_block_k = 0;
  BlockLists kv_lists;  // per query block: key blocks (forward, dQ)
  BlockLists q_lists;   // per key block: query blocks (dK/dV)
  // Forward only: `out` and `lse` already hold another kernel's answer (the Hopper forward's); a
  // CTA whose rows of `out` are all finite returns at once, the others compute theirs again.
  bool redo_nonfinite = false;
  // The backward's row-statistics pass (the forward kernel with an additive mask; kHugeLse): `lse`
  // holds the forward's answer, read only; a CTA returns at once unless one of its rows has a huge
  // lse, and writes for those rows their max m to row_shift and 1 / l to row_factor, (B, Hq, Lq)
  // float32 contiguous (nothing else). Null otherwise.
  float* row_shift = nullptr;
  float* row_factor = nullptr;
  // Delta kernel: when set, dO times row_factor (per row) is rounded to T and written here,
  // (B, Hq, Lq, D) contiguous, and delta is taken from it (the backward then reads dO from here).
  void* dout_scaled = nullptr;
};

// What one (batch, query head) sees: valid lengths, the diagonal offset, its ALiBi slope and mask.
struct HeadContext {
  int qlen, klen, offset;
  float slope;
  const unsigned char* mask;  // at (b, hq), in bytes
};

FASTATTN_HOST_DEVICE HeadContext head_context(const AttentionParams& p, int b, int hq) {
  HeadContext c;
  c.qlen = p.query_lengths ? p.query_lengths[b] : p.seqlen_q;
  c.klen = p.key_lengths ? p.key_lengths[b] : p.seqlen_k;
  // The lengths were range-checked by the Python API; clamp anyway so a raw op call cannot read out of bounds.
  c.qlen = min(max(c.qlen, 0), p.seqlen_q);
  c.klen = min(max(c.klen, 0), p.seqlen_k);
  c.offset = c.klen - c.qlen;
  c.slope = p.alibi ? p.alibi[b * p.alibi_stride[0] + hq * p.alibi_stride[1]] : 0.f;
  c.mask = nullptr;
  if (p.mask_kind != kNoMask) {
    const int elem = p.mask_kind == kBoolMask ? 1 : (p.mask_kind == kFloatMask ? 4 : 2);
    c.mask = static_cast<const unsigned char*>(p.mask) + (b * p.mask_stride[0] + hq * p.mask_stride[1]) * elem;
  }
  return c;
}

// dbias has the attn_mask's own broadcast shape (stride 0 on the dimensions the mask broadcasts):
// pairs that share an element are summed with float atomics; a full-shape mask is written once.
__device__ __forceinline__ void write_dbias(const AttentionParams& p, int b, int h, int i, int j, float ds) {
  float* dst = p.dbias + b * p.dbias_stride[0] + h * p.dbias_stride[1] + (int64_t)i * p.dbias_stride[2] +
               (int64_t)j * p.dbias_stride[3];
  if (p.dbias_reduced) {
    atomicAdd(dst, ds);
  } else {
    *dst = ds;
  }
}

// The tiles a CTA visits: the visible band [lo, hi] (inclusive), optionally intersected with a
// BlockMask's lists (each mask block spans `sub` kernel tiles).
struct TileRange {
  int lo = 0, hi = -1;
  bool lists = false;
  const int* partial = nullptr;
  const int* full = nullptr;
  int partial_stride = 1, full_stride = 1;  // along one list (at most Lk / 64 entries)
  int num_partial = 0, num_full = 0, sub = 1;

  FASTATTN_HOST_DEVICE int count() const {
    if (hi < lo) return 0;
    return lists ? (num_partial + num_full) * sub : hi - lo + 1;
  }
  // The tile of step `it`, or -1 when that step is outside the band; `masked` tells whether the
  // element mask applies to it (always without lists; for the partial-list tiles with them).
  FASTATTN_HOST_DEVICE int tile(int it, bool* masked) const {
    *masked = true;
    if (!lists) return lo + it;
    const int e = it / sub;
    *masked = e < num_partial;
    const int block = e < num_partial ? partial[e * partial_stride] : full[(e - num_partial) * full_stride];
    const int tile = block * sub + it % sub;
    return (tile >= lo && tile <= hi) ? tile : -1;
  }
};

// Restricts `r` to the lists of block `row` of (b, h).
FASTATTN_HOST_DEVICE void apply_lists(TileRange& r, const BlockLists& l, int b, int h, int row, int sub) {
  r.lists = true;
  r.sub = sub;
  const int64_t n = b * l.num_stride[0] + h * l.num_stride[1] + row * l.num_stride[2];
  const int64_t fn = b * l.full_num_stride[0] + h * l.full_num_stride[1] + row * l.full_num_stride[2];
  r.num_partial = min(max(l.num[n], 0), l.cols);
  r.num_full = min(max(l.full_num[fn], 0), l.cols);
  r.partial = l.idx + b * l.idx_stride[0] + h * l.idx_stride[1] + row * l.idx_stride[2];
  r.full = l.full_idx + b * l.full_idx_stride[0] + h * l.full_idx_stride[1] + row * l.full_idx_stride[2];
  r.partial_stride = static_cast<int>(l.idx_stride[3]);
  r.full_stride = static_cast<int>(l.full_idx_stride[3]);
}

// Key tiles (of BN keys) seen by query rows [m0, m0 + BM) of head (b, hq).
template <int BM, int BN>
FASTATTN_HOST_DEVICE TileRange key_tiles(const AttentionParams& p, const HeadContext& c, int b, int hq, int m0) {
  TileRange r;
  const int row_hi = min(m0 + BM, c.qlen) - 1;
  if (row_hi < m0 || c.klen == 0) return r;
  int j_lo = 0, j_hi = c.klen - 1;
  if (p.has_window_left) j_lo = max(j_lo, m0 + c.offset - p.window_left);
  if (p.has_window_right) j_hi = min(j_hi, row_hi + c.offset + p.window_right);
  if (j_hi < j_lo) return r;
  r.lo = j_lo / BN;
  r.hi = j_hi / BN;
  if (p.use_block_lists) apply_lists(r, p.kv_lists, b, hq, m0 / p.mask_block_q, p.mask_block_k / BN);
  return r;
}

// Query tiles (of BM queries) that see keys [n0, n0 + BN) of head (b, hq).
template <int BM, int BN>
FASTATTN_HOST_DEVICE TileRange query_tiles(const AttentionParams& p, const HeadContext& c, int b, int hq,
                                                 int n0) {
  TileRange r;
  const int col_hi = min(n0 + BN, c.klen) - 1;
  if (col_hi < n0 || c.qlen == 0) return r;
  int i_lo = 0, i_hi = c.qlen - 1;
  if (p.has_window_right) i_lo = max(i_lo, n0 - c.offset - p.window_right);
  if (p.has_window_left) i_hi = min(i_hi, col_hi - c.offset + p.window_left);
  if (i_hi < i_lo) return r;
  r.lo = i_lo / BM;
  r.hi = i_hi / BM;
  if (p.use_block_lists) apply_lists(r, p.q_lists, b, hq, n0 / p.mask_block_k, p.mask_block_q / BM);
  return r;
}

// The deterministic backward adds the dQ of query tile [m0, m0 + BM) key block by key block, in
// increasing key-block order over the key blocks that visit the tile. The rank of key block
// `n_block` (which visits it) in that order is the number of such blocks before it: the key tiles
// of key_tiles() from the band's first tile on, counted through a BlockMask's lists by the host's
// prefix table (dq_rank_prefix) -- the same pairs the backward's query_tiles() walks from the
// other side (tests/cuda/schedule_check.cu checks both against a brute force). O(1): no list scan.
template <int BM, int BN>
FASTATTN_HOST_DEVICE int dq_rank(const AttentionParams& p, const HeadContext& c, int b, int hq, int m0, int n_block) {
  // key_tiles(m0).lo: the tile of the first key row m0 sees.
  const int lo = (p.has_window_left ? max(0, m0 + c.offset - p.window_left) : 0) / BN;
  if (!p.use_block_lists) return n_block - lo;
  const int sub = p.mask_block_k / BN;  // kernel tiles per mask block
  const int* prefix = p.dq_rank_prefix + b * p.dq_rank_prefix_stride[0] + hq * p.dq_rank_prefix_stride[1] +
                      (m0 / p.mask_block_q) * p.dq_rank_prefix_stride[2];
  // Listed kernel tiles before tile x: whole listed blocks before x's, and x's place in its own.
  auto listed_before = [&](int x) {
    const int block = x / sub;
    return prefix[block] * sub + (prefix[block + 1] - prefix[block]) * (x % sub);
  };
  return listed_before(n_block) - listed_before(lo);
}

template <bool V>
struct BoolConstant {
  static constexpr bool value = V;
};

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ------------------------------------------------------------------------------------------------
// Forward (FlashAttention-2 on sm_80: ldmatrix fragments, cp.async double buffering, Q in registers).
//
// The features a call uses are template flags, so a kernel carries no code for the others:
//   kWindow   causal or window: band checks on the tiles that cross the band's edges
//   kSoftcap  softcap * tanh(s / softcap)
//   kBias     ALiBi and/or an additive attn_mask (each behind a uniform runtime check)
// kBlockM = 128 query rows (8 warps x 16) is the shipped tile. A BlockMask whose blocks are not
// multiples of the tiles (64-row query blocks, or 64-key blocks at D = 64) cannot be served by them
// (a tile would straddle two blocks' lists); it runs the one 64 x 64 instantiation (4 warps) with
// every flag on, softcap behind a runtime check too.
template <int kHeadDim_, bool kWindow_, bool kSoftcap_, bool kBias_, int kBlockM_>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kWindow = kWindow_;
  static constexpr bool kSoftcap = kSoftcap_;
  static constexpr bool kBias = kBias_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr bool kGeneric = kBlockM == 64;  // every feature decided at run time
  // Key tile: 128 at D = 64 (twice the tensor-core work per tile for the same bookkeeping), 64 at
  // D = 128 (the float32 scores and output then fit in registers), 64 in the block-list kernel.
  static constexpr int kBlockN = (kHeadDim <= 64 && !kGeneric) ? 128 : 64;
  // Score units, chosen so that p = exp2(x * kf - m * kf) is one FFMA before the MUFU.EX2:
  // raw dot products (kf = scale * log2 e) without transformations; log2 units (kf = 1) after a
  // softcap; natural units with a bias, where p = exp2((x - m) * log2 e) instead, because an
  // additive mask at float32's minimum (-3.4e38) would overflow to -inf when multiplied first.
  static constexpr bool kNaturalUnits = kBias;
};

// Replaces a NaN/Inf element of a [rows, D] shared-memory tile (row stride D + 8) by 0 and sets
// bad[row] (a CTA-wide pass over the tile; the slow paths below only). Returns whether any was.
template <typename T, int kRows, int D, int kThreads>
__device__ __forceinline__ bool zero_nonfinite(T* tile, int* bad, int tid) {
  bool any = false;
  for (int x = tid; x < kRows * D; x += kThreads) {
    T* e = tile + (x / D) * (D + 8) + x % D;
    if (!isfinite(MmaTraits<T>::to_float(*e))) {
      *reinterpret_cast<unsigned short*>(e) = 0;
      atomicOr(bad + x / D, 1);
      any = true;
    }
  }
  return any;
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// One query tile's walk over its key tiles: first every tile that needs element masking (it
// crosses the band's edges or key_lengths, or an element mask applies), then every other one, so
// the hot loop over interior tiles has no per-element checks at all. Uniform across the CTA.
struct FwdStep {
  int entry;     // position in the walk: a key tile of the band, or a BlockMask list entry ...
  int sub;       // ... and the kernel tile within that mask block (lists only)
  int tile;      // key tile, -1 when none is left
  bool use_mask; // the element mask (attn_mask / BlockMask partial tile) applies
  bool masked;   // element-wise visibility is needed (boundary tile or use_mask)
};

FASTATTN_HOST_DEVICE int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The walk over the tiles of a TileRange shared by the forward (key tiles of a query tile) and the
// backward (query tiles of a key block): `init` of FwdSchedule / BwdSchedule sets the range and the
// interior tiles [inner_lo, inner_hi] whose every pair is visible.
struct TileWalk {
  TileRange range;
  int entries;
  int inner_lo, inner_hi;  // tiles every (query, key) pair of which is visible (no element checks)
  bool has_mask;

  FASTATTN_HOST_DEVICE void set_range(const AttentionParams& p, const TileRange& r) {
    range = r;
    entries = r.hi < r.lo ? 0 : (r.lists ? r.num_partial + r.num_full : r.hi - r.lo + 1);
    has_mask = p.mask_kind != kNoMask;
  }

  // Does tile `tile` need per-element visibility checks? (Two compares: the hot loop's only ones.)
  FASTATTN_HOST_DEVICE bool crosses_edges(const AttentionParams&, int tile) const {
    return tile < inner_lo || tile > inner_hi;
  }

  // The first position at or after (entry, sub) whose tile is visible and in pass `masked_pass`
  // (no division: the position advances one kernel tile at a time).
  FASTATTN_HOST_DEVICE FwdStep find(const AttentionParams& p, int entry, int sub, bool masked_pass) const {
    while (entry < entries) {
      int tile;
      bool use_mask;
      if (range.lists) {
        use_mask = entry < range.num_partial;
        const int* list = use_mask ? range.partial + entry * range.partial_stride
                                   : range.full + (entry - range.num_partial) * range.full_stride;
        const int block = *list;
        tile = block * range.sub + sub;
        if (tile < range.lo || tile > range.hi) tile = -1;
      } else {
        tile = range.lo + entry;
        use_mask = has_mask;
      }
      if (tile >= 0) {
        const bool masked = use_mask || crosses_edges(p, tile);
        if (masked == masked_pass) return {entry, sub, tile, use_mask, masked};
      }
      if (range.lists && ++sub < range.sub) continue;
      sub = 0;
      ++entry;
    }
    return {entries, 0, -1, false, false};
  }

  FASTATTN_HOST_DEVICE FwdStep after(const AttentionParams& p, const FwdStep& s, bool masked_pass) const {
    const bool same_block = range.lists && s.sub + 1 < range.sub;
    return find(p, same_block ? s.entry : s.entry + 1, same_block ? s.sub + 1 : 0, masked_pass);
  }

  FASTATTN_HOST_DEVICE FwdStep first(const AttentionParams& p) const {
    const FwdStep s = find(p, 0, 0, true);
    return s.tile >= 0 ? s : find(p, 0, 0, false);
  }

  // The step after `prev`: every masked tile, then every unmasked one. kMaskedPass: `prev` may be
  // a masked tile (in the unmasked pass it never is, which keeps that loop short).
  template <bool kMaskedPass>
  FASTATTN_HOST_DEVICE FwdStep next(const AttentionParams& p, const FwdStep& prev) const {
    if (prev.tile < 0) return prev;
    if (kMaskedPass && prev.masked) {
      const FwdStep s = after(p, prev, true);
      return s.tile >= 0 ? s : find(p, 0, 0, false);
    }
    return after(p, prev, false);
  }
};

// The double-buffered walk of a CTA's tiles, shared by the forward (key tiles) and the backward
// (query tiles): every masked tile, then every interior one. On entry `cur` has landed in stage
// `stage` and `nxt` is in flight to the other one (stage_size apart); after each tile, the stage it
// used is refilled with the tile after next (`load(stage, tile)`, one cp.async group per tile).
// `body(BoolConstant<masked>, step)` runs one tile from stage `stage`.
template <class Body, class Load>
__device__ __forceinline__ void pipelined_walk(const AttentionParams& p, const TileWalk& walk, FwdStep cur,
                                               FwdStep nxt, int& stage, int stage_size, Body&& body, Load&& load) {
  auto advance = [&](auto masked_pass) {
    const FwdStep after = walk.next<decltype(masked_pass)::value>(p, nxt);
    __syncthreads();  // every warp is done with `stage` (and, in the backward, with dX^T)
    if (after.tile >= 0) load(stage, after.tile);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    cur = nxt;
    nxt = after;
    stage ^= stage_size;
  };
  while (cur.tile >= 0 && cur.masked) {
    body(BoolConstant<true>{}, cur);
    advance(BoolConstant<true>{});
  }
  while (cur.tile >= 0) {
    body(BoolConstant<false>{}, cur);
    advance(BoolConstant<false>{});
  }
}

// The key tiles of query rows [m0, m0 + kBlockM).
template <class Tr>
struct FwdSchedule : TileWalk {
  FASTATTN_HOST_DEVICE void init(const AttentionParams& p, const HeadContext& c, int b, int hq, int m0) {
    constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN;
    set_range(p, key_tiles<BM, BN>(p, c, b, hq, m0));
    // A tile [n0, n0 + BN) is inside every row's band when it ends before key_lengths, before the
    // right edge of row m0 (the leftmost one), and starts after the left edge of row m0 + BM - 1.
    inner_lo = 0;
    inner_hi = c.klen / BN - 1;
    if constexpr (Tr::kWindow) {
      if (p.has_window_right) inner_hi = min(inner_hi, floor_div(m0 + c.offset + p.window_right + 1, BN) - 1);
      if (p.has_window_left) inner_lo = -floor_div(-(m0 + BM - 1 + c.offset - p.window_left), BN);
    }
  }
};

// The score of query i and key j from the dot product `acc`, in the kernel's units (FwdTraits),
// in the reference's order: scale, softcap, ALiBi, additive mask; -inf where (i, j) is not visible
// (checked only on masked tiles: kMaskTile). With softcap, `*th` receives tanh(scale * acc / softcap)
// (the backward's softcap derivative is 1 - th^2); it is left alone otherwise.
template <class Tr, bool kMaskTile>
__device__ __forceinline__ float fwd_score(const AttentionParams& p, const HeadContext& c, float acc, int i, int j,
                                           bool use_mask, float* th = nullptr) {
  float x = acc;
  if constexpr (Tr::kSoftcap) {
    const float cap = Tr::kNaturalUnits ? p.softcap : p.softcap * kLog2e;
    if (!Tr::kGeneric || p.softcap > 0.f) {
      const float t = tanhf(acc * (p.scale * p.inv_softcap));
      if (th != nullptr) *th = t;
      x = cap * t;
    } else {
      x = acc * p.scale;
    }
  } else if constexpr (Tr::kNaturalUnits) {
    x = acc * p.scale;
  }
  if constexpr (Tr::kBias) {
    if (p.alibi != nullptr) x -= c.slope * fabsf(static_cast<float>(i + c.offset - j));
  }
  if constexpr (kMaskTile) {
    // Rows past query_lengths (or past Lq in the last tile) must not read the mask out of bounds.
    bool visible = i < c.qlen && j < c.klen;
    if constexpr (Tr::kWindow) {
      if (p.has_window_left) visible = visible && j >= i + c.offset - p.window_left;
      if (p.has_window_right) visible = visible && j <= i + c.offset + p.window_right;
    }
    if (use_mask && visible) {
      const int64_t o = (int64_t)i * p.mask_stride[2] + (int64_t)j * p.mask_stride[3];
      if (p.mask_kind == kBoolMask) {
        visible = c.mask[o] != 0;
      } else if constexpr (Tr::kBias) {
        if (p.mask_kind == kHalfMask) {
          x += __half2float(reinterpret_cast<const __half*>(c.mask)[o]);
        } else if (p.mask_kind == kBFloat16Mask) {
          x += __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(c.mask)[o]);
        } else {
          x += reinterpret_cast<const float*>(c.mask)[o];
        }
      }
    }
    x = visible ? x : -CUDART_INF_F;  // a select: a NaN in a hidden score never gets through
  }
  return x;
}

// Grid (ceil(Lq / kBlockM), Hq, B); CTA = kBlockM query rows of one head, warp w owns rows
// [16w, 16w + 16). Shared memory: Q (kBlockM, D + 8), then two stages of K and V (kBlockN, D + 8).
// Pipeline: the copies of key tile n + 1 are in flight while tile n is multiplied (cp.async groups:
// one per tile, waited with wait_group 1); Q goes to registers once (ldmatrix) and stays there.
template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_fwd_kernel(const AttentionParams p) {
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, kLd = D + 8;
  static_assert(D % 16 == 0 && BN % 16 == 0, "tiles are multiples of the 16 x 16 mma step");
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // [BM, D]
  T* sK = sQ + BM * kLd;               // [2][BN, D]
  T* sV = sK + 2 * BN * kLd;           // [2][BN, D]

  const int m_block = blockIdx.x, hq = blockIdx.y, b = blockIdx.z;
  const int hk = hq / p.group;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int m0 = m_block * BM;
  const HeadContext c = head_context(p, b, hq);

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + hq * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];

  if (p.redo_nonfinite) {
    // Rows of `out` (16-byte chunks: rows are D contiguous elements, 16-byte aligned).
    const T* o = static_cast<const T*>(p.out) + b * p.out_stride[0] + hq * p.out_stride[1];
    uint32_t hits = 0;
    for (int x = tid; x < BM * (D / 8); x += Tr::kThreads) {
      const int i = m0 + x / (D / 8);
      if (i >= p.seqlen_q) break;
      const uint4 w = *reinterpret_cast<const uint4*>(o + (int64_t)i * p.out_stride[2] + (x % (D / 8)) * 8);
      hits |= nonfinite_mask<T>(w.x) | nonfinite_mask<T>(w.y) | nonfinite_mask<T>(w.z) | nonfinite_mask<T>(w.w);
    }
    if (!__syncthreads_or(hits != 0)) return;
  }
  const int64_t stats = ((int64_t)b * p.heads_q + hq) * p.seqlen_q;  // row 0 of (b, hq) in lse
  // The backward's row-statistics pass (AttentionParams::row_shift): only with an additive mask.
  const bool stats_only = Tr::kBias && p.row_shift != nullptr;
  if constexpr (Tr::kBias) {
    if (stats_only) {
      static_assert(BM <= Tr::kThreads, "one row per thread");
      const bool huge = tid < BM && m0 + tid < p.seqlen_q && huge_lse(p.lse[stats + m0 + tid]);
      if (!__syncthreads_or(huge)) return;
    }
  }

  FwdSchedule<Tr> sched;
  sched.init(p, c, b, hq, m0);

  // K and V rows at or past key_lengths are zero-filled, never read: a NaN in an unused cache
  // slot cannot reach P V (P = 0 there, and 0 * NaN would be NaN).
  const TileCopier<T, BN, D, Tr::kThreads> k_copier(k, p.k_stride[2], tid), v_copier(v, p.v_stride[2], tid);
  // Stage s of K / V starts at sK / sV + s * kStage; `stage` holds 0 or kStage and flips with one XOR.
  constexpr int kStage = BN * kLd;
  auto load_kv = [&](int stage, int tile) {
    k_copier.issue(sK + stage, tile * BN, c.klen);
    v_copier.issue(sV + stage, tile * BN, c.klen);
  };
  FwdStep cur = sched.first(p);
  FwdStep nxt = sched.template next<true>(p, cur);
  TileCopier<T, BM, D, Tr::kThreads>(q, p.q_stride[2], tid).issue(sQ, m0, c.qlen);
  if (cur.tile >= 0) load_kv(0, cur.tile);
  cp_async_commit();
  if (nxt.tile >= 0) load_kv(kStage, nxt.tile);
  cp_async_commit();
  cp_async_wait<1>();  // Q and the first tile
  __syncthreads();

  uint32_t qf[D / 16][4];  // A fragments of this warp's [16, D] rows of Q
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldsm_a(qf[kk], sQ, kLd, warp * 16, kk * 16, lane);

  float acc[D / 8][4];  // [16, D] of this warp's output rows
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F};  // rows g and g + 8, in the kernel's units
  float row_sum[2] = {0.f, 0.f};                      // this thread's share of the row sums
  const float kf = Tr::kNaturalUnits ? kLog2e : (Tr::kSoftcap ? 1.f : p.scale * kLog2e);
  int stage = 0;
  // This lane's ldmatrix addresses in stage 0: ldsm_b_pair's (K as B of Q K^T) and
  // ldsm_b_pair_trans's (V as B of P V) with the lane part computed once, outside the loop.
  const T* k_frag = sK + ((lane / 16) * 8 + lane % 8) * kLd + ((lane / 8) % 2) * 8;
  const T* v_frag = sV + (((lane / 8) % 2) * 8 + lane % 8) * kLd + (lane / 16) * 8;

  // One key tile: S = Q K^T, scores, online softmax, O += P V. kRedo (the selective pass below):
  // the row statistics are final (no rescaling), V's non-finite entries are 0 in shared memory and
  // bad_keys[j] says which keys held one: a row that sees such a key becomes NaN by selection.
  const int* bad_keys = reinterpret_cast<const int*>(sQ);  // [BN], in Q's space (Q is in registers)
  auto tile_body = [&](auto mask_tile, auto redo, const FwdStep& step) {
    constexpr bool kMaskTile = decltype(mask_tile)::value;
    constexpr bool kRedo = decltype(redo)::value;
    static_assert(kMaskTile || !kRedo, "the selective pass checks every pair");
    const T* k_s = k_frag + stage;
    const T* v_s = v_frag + stage;
    const int n0 = step.tile * BN;
    float s[BN / 8][4];  // [16, BN] scores of this warp's rows
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t bk[4];  // B fragments of key columns [16np, 16np + 16) x head dims [16kk, 16kk + 16)
        ldmatrix_x4(bk, k_s + np * 16 * kLd + kk * 16);
        MmaTraits<T>::mma(s[2 * np], qf[kk], bk);
        MmaTraits<T>::mma(s[2 * np + 1], qf[kk], bk + 2);
      }
    }
    float tile_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if constexpr (kMaskTile || Tr::kSoftcap || Tr::kBias || Tr::kNaturalUnits) {
          const int i = m0 + warp * 16 + g + (e / 2) * 8;
          const int j = n0 + nt * 8 + 2 * t + (e % 2);
          s[nt][e] = fwd_score<Tr, kMaskTile>(p, c, s[nt][e], i, j, step.use_mask);
        }
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[nt][e]);
      }
    }
    float m_use[2], neg_m[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if constexpr (kRedo) {
        m_use[r] = row_max[r] == -CUDART_INF_F ? 0.f : row_max[r];
        neg_m[r] = -m_use[r] * kf;
        continue;
      }
      const float new_max = fmaxf(row_max[r], quad_max(tile_max[r]));
      // A row that has seen nothing keeps a finite base, so no -inf - -inf appears.
      m_use[r] = new_max == -CUDART_INF_F ? 0.f : new_max;
      alpha[r] = fast_exp2((row_max[r] - m_use[r]) * kf);
      neg_m[r] = -m_use[r] * kf;
      row_max[r] = new_max;
      row_sum[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const float x = s[nt][e];
        s[nt][e] = Tr::kNaturalUnits ? fast_exp2((x - m_use[r]) * kLog2e) : fast_exp2(fmaf(x, kf, neg_m[r]));
        if constexpr (kRedo) {
          // A visible key is a score that is not -inf (a probability that underflows still counts).
          if (x != -CUDART_INF_F && bad_keys[nt * 8 + 2 * t + (e % 2)]) s[nt][e] = CUDART_NAN_F;
        } else {
          row_sum[r] += s[nt][e];
        }
      }
    }
#pragma unroll
    for (int nt = 0; nt < D / 8 && !kRedo; ++nt) {
      acc[nt][0] *= alpha[0];
      acc[nt][1] *= alpha[0];
      acc[nt][2] *= alpha[1];
      acc[nt][3] *= alpha[1];
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      accumulator_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t bv[4];  // B fragments of keys [16kk, 16kk + 16) x head dims [16np, 16np + 16)
        ldmatrix_x4_trans(bv, v_s + kk * 16 * kLd + np * 16);
        MmaTraits<T>::mma(acc[2 * np], a, bv);
        MmaTraits<T>::mma(acc[2 * np + 1], a, bv + 2);
      }
    }
  };
  pipelined_walk(
      p, sched, cur, nxt, stage, kStage,
      [&](auto mask_tile, const FwdStep& step) { tile_body(mask_tile, BoolConstant<false>{}, step); }, load_kv);

  // A NaN/Inf value hidden from some rows of a masked tile reaches them as 0 * NaN in P V, and then
  // their output is non-finite: only then (one sum per thread, one barrier per CTA) the CTA runs
  // its tiles again by selection, with the row statistics it has (they never involve V). Rows
  // that see a non-finite value are non-finite either way; they pay the second pass too.
  float finite_check = 0.f;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) finite_check += (acc[nt][0] + acc[nt][1]) + (acc[nt][2] + acc[nt][3]);
  if (__syncthreads_or(!isfinite(finite_check))) {
    int* bad = reinterpret_cast<int*>(sQ);
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    stage = 0;
    for (FwdStep step = sched.first(p); step.tile >= 0; step = sched.template next<true>(p, step)) {
      load_kv(0, step.tile);
      cp_async_commit();
      static_assert(BN <= Tr::kThreads, "one flag per thread");
      if (tid < BN) bad[tid] = 0;
      cp_async_wait<0>();
      __syncthreads();
      zero_nonfinite<T, BN, D, Tr::kThreads>(sV, bad, tid);
      __syncthreads();
      tile_body(BoolConstant<true>{}, BoolConstant<true>{}, step);
      __syncthreads();  // every warp is done with the tile before the next one lands
    }
  }

  T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + hq * p.out_stride[1];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);
    const int i = m0 + warp * 16 + g + r * 8;
    if (i >= p.seqlen_q) continue;
    // Rows past query_lengths and rows that see nothing return 0 and lse = -inf; a NaN sum (a
    // visible NaN score) is live: the row is NaN, never 0.
    const bool live = i < c.qlen && sum != 0.f;
    const float inv = live ? 1.f / sum : 0.f;
    if (stats_only) {
      // Natural units (kBias): m is the row max of the scores, and sum >= 1 (the max's own term).
      if (t == 0 && huge_lse(p.lse[stats + i])) {
        p.row_shift[stats + i] = row_max[r];
        p.row_factor[stats + i] = inv;
      }
      continue;
    }
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      *reinterpret_cast<uint32_t*>(out + (int64_t)i * p.out_stride[2] + nt * 8 + 2 * t) =
          MmaTraits<T>::pack(acc[nt][2 * r] * inv, acc[nt][2 * r + 1] * inv);
    }
    if (t == 0) {
      float lse = -CUDART_INF_F;
      if (live) {
        lse = Tr::kNaturalUnits ? row_max[r] + log2f(sum) * kLn2 : (row_max[r] * kf + log2f(sum)) * kLn2;
      }
      p.lse[stats + i] = lse;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward preprocessing: delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d], one warp per row;
// the same warp zeroes row i of the float32 dQ accumulator (no separate memset).
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_bwd_delta_kernel(const AttentionParams p, int head_dim) {
  const int64_t rows = (int64_t)p.batch * p.heads_q * p.seqlen_q;
  const int64_t row = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int i = static_cast<int>(row % p.seqlen_q);
  const int h = static_cast<int>((row / p.seqlen_q) % p.heads_q);
  const int b = static_cast<int>(row / ((int64_t)p.seqlen_q * p.heads_q));
  const T* o = static_cast<const T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
  const T* d = static_cast<const T*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] + i * p.dout_stride[2];
  // With row_factor (rows recomputed for a huge lse), dO' = dO / l rounded to T, and delta from dO'.
  T* scaled = p.dout_scaled ? static_cast<T*>(p.dout_scaled) + row * head_dim : nullptr;
  const float factor = scaled ? p.row_factor[row] : 1.f;
  float sum = 0.f;
  for (int x = lane; x < head_dim; x += 32) {
    float dx = MmaTraits<T>::to_float(d[x]);
    if (scaled) {
      const T rounded = MmaTraits<T>::from_float(dx * factor);
      scaled[x] = rounded;
      dx = MmaTraits<T>::to_float(rounded);
    }
    sum += MmaTraits<T>::to_float(o[x]) * dx;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) p.delta[row] = sum;
  for (int x = 4 * lane; x < head_dim; x += 128) {
    *reinterpret_cast<float4*>(p.dq_accum + row * head_dim + x) = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// Query rows per tile of the backward (BwdTraits::kBlockM; the host sizes the deterministic mode's
// counters with it): half as many in the deterministic kernel, whose dQ staging and ordering need
// the registers (with the full tile it spilled).
constexpr int bwd_block_m(int head_dim, bool deterministic) {
  return (head_dim <= 64 ? 64 : 32) / (deterministic ? 2 : 1);
}

// ------------------------------------------------------------------------------------------------
// Backward (FlashAttention-2 on sm_80): one CTA per key block of one query head, five products per
// query tile, dK and dV in registers across the whole query loop.
//
// Flags as in the forward (kWindow, kSoftcap, kBias: no code for a feature a call does not use),
// plus kDeterministic (torch.use_deterministic_algorithms): the fifth product, dQ, is added to the
// float32 accumulator in a fixed order instead of by atomics -- key block after key block, each
// waiting on a per-query-tile counter for its rank (dq_rank) and adding its tile with plain loads
// and stores. Bit-identical across runs, same products. The deterministic instantiation is generic
// (every feature decided at run time): one kernel per dtype and head dim.
template <int kHeadDim_, bool kWindow_, bool kSoftcap_, bool kBias_, bool kDeterministic_>
struct BwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kWindow = kWindow_;
  static constexpr bool kSoftcap = kSoftcap_;
  static constexpr bool kBias = kBias_;
  static constexpr bool kDeterministic = kDeterministic_;
  static constexpr bool kGeneric = kDeterministic;
  static_assert(!kDeterministic || (kWindow && kSoftcap && kBias), "the deterministic kernel is the generic one");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  // Keys per CTA: 16 per warp. Query tile: bwd_block_m (64 rows at D = 64, 32 at D = 128, where dK
  // and dV, 2 x 16 x 128 floats per warp or 128 registers a thread, leave room for 32-column scores).
  static constexpr int kBlockN = 16 * kWarps;
  static constexpr int kBlockM = bwd_block_m(kHeadDim, kDeterministic);
  static constexpr bool kNaturalUnits = kBias;  // the forward's rule (FwdTraits)
  // dQ = dS K is split over the warps: kBlockM / 16 row blocks, the head dims over the rest, in
  // chunks of 32 columns (16 accumulator registers live at a time).
  static constexpr int kDqRowWarps = kBlockM / 16;
  static constexpr int kDqCols = kHeadDim / (kWarps / kDqRowWarps);
  static constexpr int kDqChunk = 32;
  static_assert(kWarps % kDqRowWarps == 0 && kDqCols % kDqChunk == 0, "dQ tiles cover the warps exactly");
};

// Shared memory of a backward CTA: K and V (kBlockN, D + 8); two stages of Q and dO (kBlockM, D + 8);
// dX^T (kBlockN, kBlockM + 8); two stages of lse and delta (kBlockM floats); kDeterministic: the
// float32 dQ tile (kBlockM, D + 4) staged for its ordered add; one int per key (its K row held NaN/Inf).
template <typename T, class Tr>
constexpr int bwd_smem_bytes() {
  constexpr int kLd = Tr::kHeadDim + 8;
  constexpr int dq = Tr::kDeterministic ? Tr::kBlockM * (Tr::kHeadDim + 4) : 0;
  return (2 * Tr::kBlockN * kLd + 4 * Tr::kBlockM * kLd + Tr::kBlockN * (Tr::kBlockM + 8)) *
             static_cast<int>(sizeof(T)) +
         (4 * Tr::kBlockM + dq + Tr::kBlockN) * static_cast<int>(sizeof(float));
}

// The query tiles of key block [n0, n0 + kBlockN) of head (b, hq): masked tiles (crossing
// query_lengths or the band's edges, or under an element mask) first, then the interior ones.
template <class Tr>
struct BwdSchedule : TileWalk {
  FASTATTN_HOST_DEVICE void init(const AttentionParams& p, const HeadContext& c, int b, int hq, int n0) {
    constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN;
    set_range(p, query_tiles<BM, BN>(p, c, b, hq, n0));
    // Tile [m0, m0 + BM) is interior when it ends before query_lengths, the key block ends before
    // key_lengths, every key is right of row m0 + BM - 1's left edge and left of row m0's right edge.
    inner_lo = 0;
    inner_hi = n0 + BN <= c.klen ? c.qlen / BM - 1 : -1;
    if constexpr (Tr::kWindow) {
      if (p.has_window_left) inner_hi = min(inner_hi, floor_div(n0 - c.offset + p.window_left + 1, BM) - 1);
      if (p.has_window_right) inner_lo = -floor_div(-(n0 + BN - 1 - c.offset - p.window_right), BM);
    }
  }
};

// A row's lse in the units P = exp2(...) needs (log2 units, or natural with a bias); a row that saw
// nothing in the forward (lse = -inf) gets +inf, so every P of it is exp2(-inf) = 0, never NaN.
template <class Tr>
__device__ __forceinline__ float bwd_lse(float lse) {
  return lse == -CUDART_INF_F ? CUDART_INF_F : (Tr::kNaturalUnits ? lse : lse * kLog2e);
}

// Grid (ceil(Lk / kBlockN), Hq, B); CTA = kBlockN keys seen by one query head (GQA: the host sums
// the group's slices), warp w owns keys [16w, 16w + 16) and computes per query tile, transposed:
//   S^T = K Q^T, dP^T = V dO^T, P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta),
//   dV += P^T dO, dK += dX^T Q  (dX = scale * dS * softcap derivative, rounded to T),
//   dQ += dX K  (dX^T through shared memory; float atomics, or kDeterministic's ordered adds),
// and writes dS to dbias when asked. Pipeline: the copies of the next query tile's Q, dO, lse and
// delta (cp.async, one group per tile) are in flight while the current one is multiplied.
template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_bwd_kernel(const AttentionParams p) {
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, kLd = D + 8, kLdS = BM + 8;
  static_assert(D % 16 == 0 && BM % 16 == 0 && 2 * BM <= Tr::kThreads, "tile shapes");
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);  // [BN, D]
  T* sV = sK + BN * kLd;               // [BN, D]
  T* sQ = sV + BN * kLd;               // [2][BM, D]
  T* sdO = sQ + 2 * BM * kLd;          // [2][BM, D]
  T* sdS = sdO + 2 * BM * kLd;         // [BN, BM]: dX^T
  float* sLse = reinterpret_cast<float*>(sdS + BN * kLdS);  // [2][BM]
  float* sDelta = sLse + 2 * BM;                             // [2][BM]
  constexpr int kLdQ = D + 4;
  float* sdQ = sDelta + 2 * BM;  // [BM, D] float32: this tile's dQ (kDeterministic)

  const int n_block = blockIdx.x, hq = blockIdx.y, b = blockIdx.z;
  const int hk = hq / p.group;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int n0 = n_block * BN;
  const HeadContext c = head_context(p, b, hq);

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + hq * p.q_stride[1];
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride[0] + hq * p.dout_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const int64_t stats = ((int64_t)b * p.heads_q + hq) * p.seqlen_q;

  BwdSchedule<Tr> sched;
  sched.init(p, c, b, hq, n0);

  // Rows at or past key_lengths / query_lengths are zero-filled, never read (lse and delta too:
  // those rows' scores are -inf on their masked tiles, so P = 0 whatever lse holds).
  const TileCopier<T, BM, D, Tr::kThreads> q_copier(q, p.q_stride[2], tid), do_copier(dout, p.dout_stride[2], tid);
  constexpr int kStage = BM * kLd;  // `stage` holds 0 or kStage; the statistics' stage is stage / kLd
  auto load_q = [&](int stage, int tile) {
    const int m0 = tile * BM;
    q_copier.issue(sQ + stage, m0, c.qlen);
    do_copier.issue(sdO + stage, m0, c.qlen);
    const int r = tid % BM;
    const bool valid = m0 + r < c.qlen;
    const int64_t row = valid ? stats + m0 + r : stats;
    if (tid < BM) {
      cp_async_4(sLse + stage / kLd + r, p.lse + row, valid);
    } else if (tid < 2 * BM) {
      cp_async_4(sDelta + stage / kLd + r, p.delta + row, valid);
    }
  };
  TileCopier<T, BN, D, Tr::kThreads>(k, p.k_stride[2], tid).issue(sK, n0, c.klen);
  TileCopier<T, BN, D, Tr::kThreads>(v, p.v_stride[2], tid).issue(sV, n0, c.klen);
  cp_async_commit();
  FwdStep cur = sched.first(p);
  FwdStep nxt = sched.template next<true>(p, cur);
  if (cur.tile >= 0) load_q(0, cur.tile);
  cp_async_commit();
  if (nxt.tile >= 0) load_q(kStage, nxt.tile);
  cp_async_commit();
  cp_async_wait<2>();  // K and V; the first query tiles are still in flight
  __syncthreads();

  // NaN/Inf in K would reach dQ of the rows it is hidden from as 0 * NaN in dX K. Each warp looks at
  // its own 16 key rows once (two lanes a row) and zeroes such entries in shared memory. The rows
  // that see such a key lose nothing: its score was NaN (or +inf) in the forward, so their lse is
  // NaN and every P, dS and dX of theirs is NaN here (dq, and dk / dv of the keys they see). Finite
  // K: one read of the tile per CTA and one barrier.
  {
    uint32_t* row = reinterpret_cast<uint32_t*>(sK + (warp * 16 + lane / 2) * kLd + (lane % 2) * (D / 2));
    uint32_t hits = 0;
#pragma unroll
    for (int w = 0; w < D / 4; w += 4) {
      const uint4 x = *reinterpret_cast<const uint4*>(row + w);
      hits |= nonfinite_mask<T>(x.x) | nonfinite_mask<T>(x.y) | nonfinite_mask<T>(x.z) | nonfinite_mask<T>(x.w);
    }
    if (hits) {
#pragma unroll 1
      for (int w = 0; w < D / 4; ++w) row[w] = zero_nonfinite_pair<T>(row[w]);
    }
  }
  cp_async_wait<1>();  // the first query tile
  __syncthreads();       // (and K's zeroed entries, read by every warp's dX K)


  float dk[D / 8][4], dv[D / 8][4];  // [16, D] of this warp's keys
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nt][e] = dv[nt][e] = 0.f;
  }
  const float kf = Tr::kSoftcap || Tr::kNaturalUnits ? 1.f : p.scale * kLog2e;
  int stage = 0;

  // One query tile: the five products and the scores in between.
  auto tile_body = [&](auto mask_tile, const FwdStep& step) {
    constexpr bool kMaskTile = decltype(mask_tile)::value;
    const T* q_s = sQ + stage;
    const T* do_s = sdO + stage;
    const float* lse_s = sLse + stage / kLd;
    const float* delta_s = sDelta + stage / kLd;
    const int m0 = step.tile * BM;
    float st[BM / 8][4], dpt[BM / 8][4];  // [16 keys, BM queries]: S^T, dP^T
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      ldsm_a(ak, sK, kLd, warp * 16, kk * 16, lane);
      ldsm_a(av, sV, kLd, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < BM / 16; ++np) {
        uint32_t bq[4], bdo[4];  // queries [16np, 16np + 16) x head dims [16kk, 16kk + 16)
        ldsm_b_pair(bq, q_s, kLd, np * 16, kk * 16, lane);
        ldsm_b_pair(bdo, do_s, kLd, np * 16, kk * 16, lane);
        MmaTraits<T>::mma(st[2 * np], ak, bq);
        MmaTraits<T>::mma(st[2 * np + 1], ak, bq + 2);
        MmaTraits<T>::mma(dpt[2 * np], av, bdo);
        MmaTraits<T>::mma(dpt[2 * np + 1], av, bdo + 2);
      }
    }
    // P^T into st, dX^T into dpt.
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = nt * 8 + 2 * t + (e % 2);  // query row in the tile
        const int j = n0 + warp * 16 + g + (e / 2) * 8;
        float th = 0.f;
        const float x = fwd_score<Tr, kMaskTile>(p, c, st[nt][e], m0 + r, j, step.use_mask, &th);
        const float lse = bwd_lse<Tr>(lse_s[r]);
        const float prob = Tr::kNaturalUnits ? fast_exp2((x - lse) * kLog2e) : fast_exp2(fmaf(x, kf, -lse));
        float ds = prob * (dpt[nt][e] - delta_s[r]);  // d(loss)/d(score)
        // Selects on masked tiles (a hidden pair's P is exp(-inf) = 0): a NaN in a K or V row hidden
        // from this query reaches neither dS nor (through tanh' of its NaN score) dX. `== 0`, not
        // `> 0`: a NaN P (a row that saw a NaN, whose lse is NaN) keeps its NaN.
        const bool dropped = kMaskTile && prob == 0.f;
        if constexpr (kMaskTile) ds = dropped ? 0.f : ds;
        if constexpr (Tr::kBias) {
          if (p.dbias != nullptr && m0 + r < c.qlen && j < c.klen) write_dbias(p, b, hq, m0 + r, j, ds);
        }
        st[nt][e] = prob;
        if constexpr (kMaskTile && Tr::kSoftcap) th = dropped ? 0.f : th;
        dpt[nt][e] = Tr::kSoftcap ? ds * (p.scale * (1.f - th * th)) : ds * p.scale;
      }
    }
    // dV += P^T dO, dK += dX^T Q (A fragments straight from the accumulators).
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t ap[4], ads[4];
      accumulator_to_a<T>(ap, st[2 * kk], st[2 * kk + 1]);
      accumulator_to_a<T>(ads, dpt[2 * kk], dpt[2 * kk + 1]);
      {
        // dX^T rows g and g + 8 of this warp's keys, query columns 16kk + 2t (+ 8): a[] as the mma
        // fragment holds them (bank-conflict free: rows are BM + 8 elements apart).
        T* row = sdS + (warp * 16 + g) * kLdS + kk * 16 + 2 * t;
        *reinterpret_cast<uint32_t*>(row) = ads[0];
        *reinterpret_cast<uint32_t*>(row + 8 * kLdS) = ads[1];
        *reinterpret_cast<uint32_t*>(row + 8) = ads[2];
        *reinterpret_cast<uint32_t*>(row + 8 * kLdS + 8) = ads[3];
      }
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t bdo[4], bq[4];  // queries [16kk, 16kk + 16) x head dims [16np, 16np + 16)
        ldsm_b_pair_trans(bdo, do_s, kLd, kk * 16, np * 16, lane);
        ldsm_b_pair_trans(bq, q_s, kLd, kk * 16, np * 16, lane);
        MmaTraits<T>::mma(dv[2 * np], ap, bdo);
        MmaTraits<T>::mma(dv[2 * np + 1], ap, bdo + 2);
        MmaTraits<T>::mma(dk[2 * np], ads, bq);
        MmaTraits<T>::mma(dk[2 * np + 1], ads, bq + 2);
      }
    }
    {
      __syncthreads();  // dX^T of every warp is in shared memory
      // dQ[rows of row block mr, this warp's columns] += dX K: A = dX from dX^T (ldmatrix.trans),
      // B = K as stored (keys x head dims).
      constexpr int kRowWarps = Tr::kDqRowWarps;
      const int mr = warp % kRowWarps;
      const int col_base = (warp / kRowWarps) * Tr::kDqCols;
      uint32_t ads[BN / 16][4];
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) ldsm_a_trans(ads[kk], sdS, kLdS, mr * 16, kk * 16, lane);
      float* dq_rows = Tr::kDeterministic ? nullptr : p.dq_accum + (stats + m0 + mr * 16 + g) * D;
      const bool row_live[2] = {m0 + mr * 16 + g < c.qlen, m0 + mr * 16 + g + 8 < c.qlen};
#pragma unroll
      for (int chunk = 0; chunk < Tr::kDqCols / Tr::kDqChunk; ++chunk) {
        const int col0 = col_base + chunk * Tr::kDqChunk;
        float acc[Tr::kDqChunk / 8][4];  // [16 queries, kDqChunk head dims]
#pragma unroll
        for (int nt = 0; nt < Tr::kDqChunk / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
          for (int np = 0; np < Tr::kDqChunk / 16; ++np) {
            uint32_t bk[4];  // keys [16kk, 16kk + 16) x head dims [col0 + 16np, col0 + 16np + 16)
            ldsm_b_pair_trans(bk, sK, kLd, kk * 16, col0 + np * 16, lane);
            MmaTraits<T>::mma(acc[2 * np], ads[kk], bk);
            MmaTraits<T>::mma(acc[2 * np + 1], ads[kk], bk + 2);
          }
        }
#pragma unroll
        for (int nt = 0; nt < Tr::kDqChunk / 8; ++nt) {
          if constexpr (Tr::kDeterministic) {
            // Staged in shared memory (rows past query_lengths too: the ordered add skips them).
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              *reinterpret_cast<float2*>(sdQ + (mr * 16 + g + r * 8) * kLdQ + col0 + nt * 8 + 2 * t) =
                  make_float2(acc[nt][2 * r], acc[nt][2 * r + 1]);
            }
          } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              if (row_live[e / 2]) atomicAdd(dq_rows + (e / 2) * 8 * D + col0 + nt * 8 + 2 * t + (e % 2), acc[nt][e]);
            }
          }
        }
      }
      if constexpr (Tr::kDeterministic) {
        // The ordered add: wait until the key blocks before this one in the tile's order have added
        // theirs (thread 0 polls; the barrier passes its acquire on to the CTA), add the staged tile
        // with L2 loads and stores (.cg: whatever L1 held), and release the next one. Only earlier
        // key blocks of the same head are waited for: launched before this CTA, so resident or done.
        auto semaphore = [&] {
          return p.dq_semaphore + ((int64_t)blockIdx.z * p.heads_q + blockIdx.y) * ((p.seqlen_q + BM - 1) / BM) +
                 step.tile;
        };
        if (tid == 0) {
          // (The block indices are read again, not kept: registers are scarce here.)
          const int rank = dq_rank<BM, BN>(p, c, blockIdx.z, blockIdx.y, m0, blockIdx.x);
          while (ld_acquire_gpu(semaphore()) != rank) __nanosleep(32);
        }
        __syncthreads();
        constexpr int kVecs = D / 4;  // float4 per row
#pragma unroll 4
        for (int x = tid; x < BM * kVecs; x += Tr::kThreads) {
          const int row = x / kVecs, col = (x % kVecs) * 4;
          if (m0 + row >= c.qlen) continue;
          float4* dst = reinterpret_cast<float4*>(p.dq_accum + (stats + m0 + row) * D + col);
          const float4 add = *reinterpret_cast<const float4*>(sdQ + row * kLdQ + col);
          const float4 old = __ldcg(dst);
          __stcg(dst, make_float4(old.x + add.x, old.y + add.y, old.z + add.z, old.w + add.w));
        }
        __threadfence();  // this thread's adds are visible on the GPU before the release
        __syncthreads();
        if (tid == 0) red_release_gpu_add(semaphore(), 1);  // rank + 1: this block holds the tile
      }
    }
  };
  pipelined_walk(p, sched, cur, nxt, stage, kStage, tile_body, load_q);

  T* dk_out = static_cast<T*>(p.dk) + b * p.dk_stride[0] + hq * p.dk_stride[1];
  T* dv_out = static_cast<T*>(p.dv) + b * p.dv_stride[0] + hq * p.dv_stride[1];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = n0 + warp * 16 + g + r * 8;
    if (j >= p.seqlen_k) continue;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      const int col = nt * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(dk_out + (int64_t)j * p.dk_stride[2] + col) =
          MmaTraits<T>::pack(dk[nt][2 * r], dk[nt][2 * r + 1]);
      *reinterpret_cast<uint32_t*>(dv_out + (int64_t)j * p.dv_stride[2] + col) =
          MmaTraits<T>::pack(dv[nt][2 * r], dv[nt][2 * r + 1]);
    }
  }
}

}  // namespace cuda
}  // namespace fastattn
