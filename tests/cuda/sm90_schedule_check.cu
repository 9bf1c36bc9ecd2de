// Runs the Hopper forward's tile schedule and masking decisions (csrc/cuda/sm90/schedule.h) on
// the CPU, exactly as attention_fwd_sm90_kernel walks them, for random lengths, query/key lengths,
// windows and BlockMask lists, against a brute-force enumeration of the visible (i, j) pairs:
//   * every key tile holding a visible pair of the 128-row query tile is visited, none twice, and
//     every visited tile holds one (no masked-out tile is loaded);
//   * a tile a 64-row warpgroup takes without element checks is entirely visible for its live
//     rows, and on the other tiles the element check agrees with the brute force.
// And every feature combination maps to an instantiation that serves it (instantiation_for).
// Built and run by tests/test_cuda_sm90.py (nvcc, host code only: no GPU needed).
// Prints "ok <query tiles checked>" or the first failure, and exits non-zero on a failure.
#include <cstdio>
#include <random>
#include <set>
#include <vector>

#include "sm90/schedule.h"

using namespace fastattn::cuda::sm90;

constexpr int kBlockM = 128, kBlockN = 128, kWarpgroupRows = 64;

struct Case {
  int Lq, Lk, qlen, klen, bq, bk;
  bool lengths, left_on, right_on, lists;
  int left, right;
  std::vector<char> layout;  // (nqb, nkb): listed
};

template <bool kWindow, bool kLengths, bool kBlockLists>
bool check_case(const Case& cs, int* checked) {
  FwdArgs a{};
  a.batch = a.heads_q = a.heads_kv = 1;
  a.seqlen_q = cs.Lq;
  a.seqlen_k = cs.Lk;
  const int qlens[1] = {cs.qlen}, klens[1] = {cs.klen};
  if (cs.lengths) {
    a.query_lengths = qlens;
    a.key_lengths = klens;
  }
  a.has_window_left = cs.left_on;
  a.has_window_right = cs.right_on;
  a.window_left = cs.left;
  a.window_right = cs.right;
  const int nqb = (cs.Lq + cs.bq - 1) / cs.bq, nkb = (cs.Lk + cs.bk - 1) / cs.bk;
  std::vector<int> num(nqb), idx(nqb * nkb), full_num(nqb), full_idx(nqb * nkb);
  if (cs.lists) {
    std::mt19937 split(nqb * 131 + nkb);
    for (int r = 0; r < nqb; ++r) {
      for (int c = nkb - 1; c >= 0; --c) {  // descending: the schedule must not assume an order
        if (!cs.layout[r * nkb + c]) continue;
        if (split() % 2) idx[r * nkb + num[r]++] = c;
        else full_idx[r * nkb + full_num[r]++] = c;
      }
    }
    fastattn::cuda::BlockLists& l = a.lists;
    l.num = num.data();
    l.idx = idx.data();
    l.full_num = full_num.data();
    l.full_idx = full_idx.data();
    l.num_stride[2] = l.full_num_stride[2] = 1;  // (1, 1, nqb): broadcast over batch and heads
    l.idx_stride[2] = l.full_idx_stride[2] = nkb;
    l.idx_stride[3] = l.full_idx_stride[3] = 1;
    l.cols = nkb;
    a.mask_block_q = cs.bq;
    a.mask_block_k = cs.bk;
  }
  const int qlen = cs.lengths ? cs.qlen : cs.Lq, klen = cs.lengths ? cs.klen : cs.Lk, offset = klen - qlen;
  auto visible = [&](int i, int j) {  // band, lengths and lists
    if (i >= qlen || j >= klen) return false;
    if (cs.left_on && j < i + offset - cs.left) return false;
    if (cs.right_on && j > i + offset + cs.right) return false;
    return !cs.lists || cs.layout[(i / cs.bq) * nkb + j / cs.bk] != 0;
  };
  for (int m_block = 0; m_block * kBlockM < cs.Lq; ++m_block) {
    const int m0 = m_block * kBlockM;
    const Schedule s = make_schedule<kBlockM, kBlockN, kWindow, kLengths, kBlockLists>(a, 0, 0, m_block);
    std::set<int> visited;
    int it = 0;
    for (int n = s.next(it); n >= 0; n = s.next(it)) {
      if (!visited.insert(n).second) {
        std::printf("FAIL m0=%d: key tile %d visited twice\n", m0, n);
        return false;
      }
      bool any = false;
      for (int w = 0; w < kBlockM / kWarpgroupRows; ++w) {
        const int r0 = m0 + w * kWarpgroupRows;
        const bool masked = tile_needs_mask<kBlockN, kWarpgroupRows, kWindow>(s, a, n, r0);
        for (int i = r0; i < r0 + kWarpgroupRows && i < qlen; ++i) {
          for (int j = n * kBlockN; j < (n + 1) * kBlockN; ++j) {
            const bool band = visible(i, j) || (cs.lists && j < klen && (!cs.left_on || j >= i + offset - cs.left) &&
                                                (!cs.right_on || j <= i + offset + cs.right));
            any = any || visible(i, j);
            if (!masked && !band) {
              std::printf("FAIL m0=%d rows %d..: tile %d taken without element checks but (%d, %d) is hidden\n",
                          m0, r0, n, i, j);
              return false;
            }
            if (masked && key_visible<kWindow>(s, a, i, j) != band) {
              std::printf("FAIL m0=%d: element check of (%d, %d) says %d\n", m0, i, j, !band);
              return false;
            }
          }
        }
      }
      if (!any) {
        std::printf("FAIL m0=%d: key tile %d loaded but holds no visible pair\n", m0, n);
        return false;
      }
    }
    for (int i = m0; i < m0 + kBlockM && i < cs.Lq; ++i) {
      for (int j = 0; j < cs.Lk; ++j) {
        if (visible(i, j) && !visited.count(j / kBlockN)) {
          std::printf("FAIL m0=%d: visible (%d, %d) in key tile %d never visited\n", m0, i, j, j / kBlockN);
          return false;
        }
      }
    }
    ++*checked;
  }
  return true;
}

template <bool kWindow, bool kLengths, bool kBlockLists>
bool run(std::mt19937& rng, int trials, int* checked) {
  for (int trial = 0; trial < trials; ++trial) {
    Case cs;
    cs.Lq = 1 + static_cast<int>(rng() % 700);
    cs.Lk = 1 + static_cast<int>(rng() % 700);
    cs.lengths = kLengths && rng() % 2;
    cs.qlen = cs.lengths ? static_cast<int>(rng() % (cs.Lq + 1)) : cs.Lq;
    cs.klen = cs.lengths ? static_cast<int>(rng() % (cs.Lk + 1)) : cs.Lk;
    cs.left_on = kWindow && rng() % 2;
    cs.right_on = kWindow && rng() % 2;
    cs.left = static_cast<int>(rng() % 400);  // the API's windows: edges >= 0 (or absent)
    cs.right = rng() % 3 == 0 ? 0 : static_cast<int>(rng() % 400);
    cs.lists = kBlockLists && rng() % 3 != 0;
    cs.bq = kBlockM * (1 + static_cast<int>(rng() % 2));
    cs.bk = kBlockN * (1 + static_cast<int>(rng() % 3));
    const int nqb = (cs.Lq + cs.bq - 1) / cs.bq, nkb = (cs.Lk + cs.bk - 1) / cs.bk;
    for (int e = 0; e < nqb * nkb; ++e) cs.layout.push_back(rng() % 3 != 0);
    if (!check_case<kWindow, kLengths, kBlockLists>(cs, checked)) {
      std::printf("  case: Lq=%d Lk=%d qlen=%d klen=%d window=(%s%d, %s%d) lists=%d bq=%d bk=%d flags=%d%d%d\n",
                  cs.Lq, cs.Lk, cs.qlen, cs.klen, cs.left_on ? "" : "off:", cs.left, cs.right_on ? "" : "off:",
                  cs.right, cs.lists, cs.bq, cs.bk, kWindow, kLengths, kBlockLists);
      return false;
    }
  }
  return true;
}

// Every subset of the features is served by an instantiation that holds it, with softcap exactly.
bool check_instantiations() {
  constexpr int kAll = kWindow | kSoftcap | kAlibi | kLengths | kBlockLists;
  for (int features = 0; features <= kAll; ++features) {
    const int flags = instantiation_for(features);
    if (flags < 0 || (flags & features) != features || (flags & kSoftcap) != (features & kSoftcap)) {
      std::printf("FAIL features %d served by instantiation %d\n", features, flags);
      return false;
    }
  }
  static_assert(instantiation_for(0) == 0, "the plain call runs the feature-free kernel");
  static_assert(instantiation_for(kWindow) == kWindow, "causal / window runs the window kernel");
  return true;
}

int main() {
  if (!check_instantiations()) return 1;
  std::mt19937 rng(4321);
  int checked = 0;
  const int trials = 300;
  // The instantiated sets' flags: plain, window, and window + lengths + lists.
  const bool ok = run<false, false, false>(rng, trials, &checked) && run<true, false, false>(rng, trials, &checked) &&
                  run<true, true, true>(rng, trials, &checked);
  if (!ok) return 1;
  std::printf("ok %d\n", checked);
  return 0;
}
