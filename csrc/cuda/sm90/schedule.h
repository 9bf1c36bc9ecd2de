// Which key tiles a Hopper-forward CTA visits, and which of them need element-wise masking: plain
// integer code, free of CuTe and torch and compiled for host and device, so that
// tests/cuda/sm90_schedule_check.cu runs it on the CPU against a brute-force enumeration of the
// visible (query, key) pairs. The kernel (attention_fwd_sm90_kernel.cu) calls exactly these.
#pragma once

#include "attention_fwd_sm90.h"

#if defined(__CUDACC__)
#define FASTATTN_SM90_HD __host__ __device__ __forceinline__
#else
#define FASTATTN_SM90_HD inline
#endif

namespace fastattn {
namespace cuda {
namespace sm90 {

FASTATTN_SM90_HD int imin(int a, int b) { return a < b ? a : b; }
FASTATTN_SM90_HD int imax(int a, int b) { return a > b ? a : b; }

// The key tiles one CTA (query tile m_block of (batch, head)) visits: the band [lo, hi] of tiles
// that hold a visible key -- causal and window edges and the key length bound the loop, so no
// tile outside it is loaded -- walked from hi down, or, with a BlockMask, the listed key blocks
// (each spans `sub` tiles) that fall inside the band. Producer and consumers build the same
// schedule and step through it with next(), so they agree on every tile.
struct Schedule {
  int qlen, klen, offset;  // valid lengths of this batch, offset = klen - qlen (the diagonal)
  int lo = 0, hi = -1;     // band of key tiles; empty when hi < lo
  int steps = 0;           // positions to walk: hi - lo + 1, or list entries * sub
  const int* partial = nullptr;
  const int* full = nullptr;
  int partial_stride = 1, full_stride = 1, num_partial = 0, sub = 1;

  // The next key tile at or after position `it` (advanced past it), or -1 when none is left.
  FASTATTN_SM90_HD int next(int& it) const {
    while (it < steps) {
      const int step = it++;
      if (partial == nullptr) return hi - step;
      const int e = step / sub;
      const int block = e < num_partial ? partial[e * partial_stride] : full[(e - num_partial) * full_stride];
      const int tile = block * sub + step % sub;
      if (tile >= lo && tile <= hi) return tile;
    }
    return -1;
  }
};

// `P` is FwdArgs or the kernel's Params (the same field names).
template <int kBlockM, int kBlockN, bool kWindow, bool kLengths, bool kBlockLists, class P>
FASTATTN_SM90_HD Schedule make_schedule(const P& p, int batch, int head, int m_block) {
  Schedule s;
  s.qlen = p.seqlen_q;
  s.klen = p.seqlen_k;
  if constexpr (kLengths) {
    // The Python API range-checks the lengths; clamping keeps a raw op call in bounds anyway.
    if (p.query_lengths) s.qlen = imin(imax(p.query_lengths[batch], 0), p.seqlen_q);
    if (p.key_lengths) s.klen = imin(imax(p.key_lengths[batch], 0), p.seqlen_k);
  }
  s.offset = s.klen - s.qlen;
  const int row0 = m_block * kBlockM;
  const int row_hi = imin(row0 + kBlockM, s.qlen) - 1;
  if (row_hi < row0 || s.klen == 0) return s;
  int key_lo = 0, key_hi = s.klen - 1;
  if constexpr (kWindow) {
    if (p.has_window_left) key_lo = imax(key_lo, row0 + s.offset - p.window_left);
    if (p.has_window_right) key_hi = imin(key_hi, row_hi + s.offset + p.window_right);
  }
  if (key_hi < key_lo) return s;
  s.lo = key_lo / kBlockN;
  s.hi = key_hi / kBlockN;
  s.steps = s.hi - s.lo + 1;
  if constexpr (kBlockLists) {
    const BlockLists& l = p.lists;
    if (l.num != nullptr) {
      const int row = row0 / p.mask_block_q;
      const int64_t n = batch * l.num_stride[0] + head * l.num_stride[1] + row * l.num_stride[2];
      const int64_t fn = batch * l.full_num_stride[0] + head * l.full_num_stride[1] + row * l.full_num_stride[2];
      s.num_partial = imin(imax(l.num[n], 0), l.cols);
      const int num_full = imin(imax(l.full_num[fn], 0), l.cols);
      s.partial = l.idx + batch * l.idx_stride[0] + head * l.idx_stride[1] + row * l.idx_stride[2];
      s.full = l.full_idx + batch * l.full_idx_stride[0] + head * l.full_idx_stride[1] + row * l.full_idx_stride[2];
      s.partial_stride = static_cast<int>(l.idx_stride[3]);
      s.full_stride = static_cast<int>(l.full_idx_stride[3]);
      s.sub = p.mask_block_k / kBlockN;
      s.steps = (s.num_partial + num_full) * s.sub;
    }
  }
  return s;
}

// Whether key tile n needs element-wise masking for query rows [row0, row0 + kRows): it crosses
// the key length, or a band edge of one of those rows. Uniform across a warpgroup.
template <int kBlockN, int kRows, bool kWindow, class P>
FASTATTN_SM90_HD bool tile_needs_mask(const Schedule& s, const P& p, int n, int row0) {
  const int key0 = n * kBlockN;
  bool edge = key0 + kBlockN > s.klen;
  if constexpr (kWindow) {
    const int diag0 = row0 + s.offset;  // the key aligned with the first row
    if (p.has_window_right) edge = edge || key0 + kBlockN - 1 > diag0 + p.window_right;
    if (p.has_window_left) edge = edge || key0 < diag0 + kRows - 1 - p.window_left;
  }
  return edge;
}

// Whether query `row` sees `key` (band and key length; rows past query_lengths are the
// epilogue's business: they are stored as 0).
template <bool kWindow, class P>
FASTATTN_SM90_HD bool key_visible(const Schedule& s, const P& p, int row, int key) {
  bool visible = key < s.klen;
  if constexpr (kWindow) {
    const int diag = row + s.offset;
    if (p.has_window_right) visible = visible && key <= diag + p.window_right;
    if (p.has_window_left) visible = visible && key >= diag - p.window_left;
  }
  return visible;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace fastattn
