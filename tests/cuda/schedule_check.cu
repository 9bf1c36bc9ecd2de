// Runs the tile schedules of csrc/cuda/attention_kernels.cuh on the CPU, exactly as the kernels walk
// them -- FwdSchedule (key tiles of a query tile: attention_fwd_kernel) and BwdSchedule (query
// tiles of a key block, attention_bwd_kernel) -- for random lengths, query/key lengths, windows, element
// masks and BlockMask lists, and checks against a brute-force enumeration of visible (i, j) pairs:
//   * every tile holding a visible pair of the CTA's rows (columns) is visited, and no tile twice;
//   * every tile visited without element checks (the interior loop) is entirely visible (forward:
//     for every live row of the query tile; backward: for every pair of the whole tile and key
//     block, as its loads past the lengths are zeros), and is a full (not partial) BlockMask tile;
//   * element-masked tiles come first;
//   * backward (windows with left + right >= 0): dq_rank (the deterministic mode's dQ order)
//     numbers the key blocks visiting each query tile 0, 1, 2, ... in increasing key-block order --
//     so each waits only for earlier ones, and no key block waits for a rank nobody holds.
// Built and run by tests/test_cuda_static.py (nvcc, host code only: no GPU needed).
// Prints "ok <query tiles checked>" or the first failure, and exits non-zero on a failure.
#include <cstdio>
#include <random>
#include <set>
#include <vector>

#include "attention_kernels.cuh"

using namespace fastattn::cuda;

struct Case {
  int Lq, Lk, qlen, klen, bq, bk;
  bool lengths, left_on, right_on, mask, lists;
  int left, right;
  std::vector<char> layout, partial;  // (nqb, nkb): listed, and listed as partial
};

// The walk of one CTA as the kernel does it: cur, nxt and the step after next.
template <class Sched>
std::vector<FwdStep> walk_schedule(const Sched& s, const AttentionParams& p) {
  std::vector<FwdStep> walk;
  FwdStep cur = s.first(p);
  FwdStep nxt = s.template next<true>(p, cur);
  while (cur.tile >= 0 && cur.masked) {
    walk.push_back(cur);
    const FwdStep after = s.template next<true>(p, nxt);
    cur = nxt;
    nxt = after;
  }
  while (cur.tile >= 0) {
    walk.push_back(cur);
    const FwdStep after = s.template next<false>(p, nxt);
    cur = nxt;
    nxt = after;
  }
  return walk;
}

// Fills `l` with the lists of a (rows, cols) block layout, indices in descending order (the
// schedule must not assume order). `at(r, c)` gives the layout entry of row block r, column block c.
template <class At>
void fill_lists(BlockLists& l, std::vector<int>& num, std::vector<int>& idx, std::vector<int>& full_num,
                std::vector<int>& full_idx, int rows, int cols, At at) {
  num.assign(rows, 0);
  full_num.assign(rows, 0);
  idx.assign(rows * cols, 0);
  full_idx.assign(rows * cols, 0);
  for (int r = 0; r < rows; ++r) {
    for (int cidx = cols - 1; cidx >= 0; --cidx) {
      const int e = at(r, cidx);
      if (e == 1) idx[r * cols + num[r]++] = cidx;
      if (e == 2) full_idx[r * cols + full_num[r]++] = cidx;
    }
  }
  l.num = num.data();
  l.idx = idx.data();
  l.full_num = full_num.data();
  l.full_idx = full_idx.data();
  l.num_stride[2] = l.full_num_stride[2] = 1;
  l.idx_stride[2] = l.full_idx_stride[2] = cols;
  l.idx_stride[3] = l.full_idx_stride[3] = 1;
  l.cols = cols;
}

// kBackward: walk BwdSchedule per key block of Tr::kBlockN keys over query tiles of Tr::kBlockM,
// else FwdSchedule per query tile over key tiles.
template <class Tr, bool kBackward>
bool check_case(const Case& cs, int* checked) {
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN;
  AttentionParams p{};
  p.batch = p.heads_q = p.heads_kv = p.group = 1;
  p.seqlen_q = cs.Lq;
  p.seqlen_k = cs.Lk;
  p.scale = 1.f;
  const int qlens[1] = {cs.qlen}, klens[1] = {cs.klen};
  if (cs.lengths) {
    p.query_lengths = qlens;
    p.key_lengths = klens;
  }
  p.has_window_left = cs.left_on;
  p.has_window_right = cs.right_on;
  p.window_left = cs.left;
  p.window_right = cs.right;
  static const unsigned char dummy = 1;
  if (cs.mask) {
    p.mask = &dummy;  // never dereferenced by the schedule
    p.mask_kind = kBoolMask;
  }
  const int nqb = (cs.Lq + cs.bq - 1) / cs.bq, nkb = (cs.Lk + cs.bk - 1) / cs.bk;
  // layout entry: 0 absent, 1 partial, 2 full
  auto entry = [&](int qb, int kb) { return cs.layout[qb * nkb + kb] ? (cs.partial[qb * nkb + kb] ? 1 : 2) : 0; };
  std::vector<int> num, idx, full_num, full_idx, qnum, qidx, qfull_num, qfull_idx, prefix;
  if (cs.lists) {
    p.use_block_lists = true;
    p.mask_block_q = cs.bq;
    p.mask_block_k = cs.bk;
    fill_lists(p.kv_lists, num, idx, full_num, full_idx, nqb, nkb, entry);
    fill_lists(p.q_lists, qnum, qidx, qfull_num, qfull_idx, nkb, nqb, [&](int kb, int qb) { return entry(qb, kb); });
    // The deterministic mode's table (attention_bwd.cu dq_rank_prefix): listed key blocks before kb.
    prefix.assign(nqb * (nkb + 1), 0);
    for (int qb = 0; qb < nqb; ++qb) {
      for (int kb = 0; kb < nkb; ++kb) {
        prefix[qb * (nkb + 1) + kb + 1] = prefix[qb * (nkb + 1) + kb] + (entry(qb, kb) != 0);
      }
    }
    p.dq_rank_prefix = prefix.data();
    p.dq_rank_prefix_stride[2] = nkb + 1;
  }
  const HeadContext c = head_context(p, 0, 0);
  auto visible = [&](int i, int j) {  // band, lengths and lists (an element mask may hide more)
    if (i >= c.qlen || j >= c.klen) return false;
    if (cs.left_on && j < i + c.offset - cs.left) return false;
    if (cs.right_on && j > i + c.offset + cs.right) return false;
    return !cs.lists || cs.layout[(i / cs.bq) * nkb + j / cs.bk] != 0;
  };
  // The element mask covers every tile without lists, only partial tiles with them (the op's
  // contract: with a BlockMask, attn_mask carries the partial tiles' element masks).
  auto element_mask = [&](int i, int j) { return cs.lists ? cs.partial[(i / cs.bq) * nkb + j / cs.bk] != 0 : cs.mask; };
  const int own = kBackward ? BN : BM;        // rows (forward) or keys (backward) of a CTA
  const int other = kBackward ? BM : BN;      // the walked tiles
  const int own_len = kBackward ? cs.Lk : cs.Lq;
  const int other_len = kBackward ? cs.Lq : cs.Lk;
  std::vector<std::vector<int>> visitors((other_len + other - 1) / other);  // backward: key blocks per query tile
  for (int x0 = 0; x0 < own_len; x0 += own) {
    std::vector<FwdStep> walk;
    if constexpr (kBackward) {
      BwdSchedule<Tr> s;
      s.init(p, c, 0, 0, x0);
      walk = walk_schedule(s, p);
    } else {
      FwdSchedule<Tr> s;
      s.init(p, c, 0, 0, x0);
      walk = walk_schedule(s, p);
    }
    // (i, j) of own index x and walked index y
    auto pair_visible = [&](int x, int y) { return kBackward ? visible(y, x) : visible(x, y); };
    auto pair_masked = [&](int x, int y) { return kBackward ? element_mask(y, x) : element_mask(x, y); };
    std::set<int> visited;
    bool unmasked_seen = false;
    for (const FwdStep& st : walk) {
      if (kBackward) visitors[st.tile].push_back(x0 / own);
      if (!visited.insert(st.tile).second) {
        std::printf("FAIL %s x0=%d: tile %d visited twice\n", kBackward ? "bwd" : "fwd", x0, st.tile);
        return false;
      }
      if (st.masked && unmasked_seen) {
        std::printf("FAIL %s x0=%d: masked tile %d after an unmasked one\n", kBackward ? "bwd" : "fwd", x0, st.tile);
        return false;
      }
      unmasked_seen = unmasked_seen || !st.masked;
      if (!st.masked) {
        // forward: the live rows of the query tile; backward: every pair of tile and key block.
        const int x_end = kBackward ? x0 + own : std::min(x0 + own, c.qlen);
        for (int x = x0; x < x_end; ++x) {
          for (int y = st.tile * other; y < st.tile * other + other; ++y) {
            if (!pair_visible(x, y) || pair_masked(x, y)) {
              std::printf("FAIL %s x0=%d: tile %d walked without element checks but (%d, %d) is hidden\n",
                          kBackward ? "bwd" : "fwd", x0, st.tile, x, y);
              return false;
            }
          }
        }
      }
    }
    for (int x = x0; x < std::min(x0 + own, own_len); ++x) {
      for (int y = 0; y < other_len; ++y) {
        if (pair_visible(x, y) && !visited.count(y / other)) {
          std::printf("FAIL %s x0=%d: visible (%d, %d) in tile %d never visited\n", kBackward ? "bwd" : "fwd", x0, x,
                      y, y / other);
          return false;
        }
      }
    }
    ++*checked;
  }
  // The order needs each row's band to be non-empty where both edges are set (left + right >= 0;
  // the host turns a narrower window, which hides every pair, into one that visits no tile).
  const bool band_rows_nonempty = !(cs.left_on && cs.right_on) || cs.left + cs.right >= 0;
  if (kBackward && band_rows_nonempty) {
    for (int m = 0; m < static_cast<int>(visitors.size()); ++m) {
      for (int r = 0; r < static_cast<int>(visitors[m].size()); ++r) {
        const int rank = dq_rank<BM, BN>(p, c, 0, 0, m * BM, visitors[m][r]);
        if (rank != r) {
          std::printf("FAIL dq order: query tile %d, key block %d has rank %d, expected %d\n", m, visitors[m][r], rank, r);
          return false;
        }
      }
    }
  }
  return true;
}

template <class Tr, bool kBackward = false>
bool run(std::mt19937& rng, int trials, int* checked) {
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN;
  for (int trial = 0; trial < trials; ++trial) {
    Case cs;
    cs.Lq = 1 + static_cast<int>(rng() % 600);
    cs.Lk = 1 + static_cast<int>(rng() % 600);
    cs.lengths = rng() % 2;
    cs.qlen = cs.lengths ? static_cast<int>(rng() % (cs.Lq + 1)) : cs.Lq;
    cs.klen = cs.lengths ? static_cast<int>(rng() % (cs.Lk + 1)) : cs.Lk;
    cs.left_on = Tr::kWindow && rng() % 2;
    cs.right_on = Tr::kWindow && rng() % 2;
    cs.left = static_cast<int>(rng() % 500) - 60;
    cs.right = rng() % 3 == 0 ? 0 : static_cast<int>(rng() % 500) - 60;
    cs.mask = rng() % 5 == 0;
    cs.lists = rng() % 2;
    // BlockMask blocks: multiples of 64 (the host's rule) holding whole kernel tiles.
    cs.bq = std::max(BM, 64) * (1 + static_cast<int>(rng() % 2));
    cs.bk = std::max(BN, 64) * (1 + static_cast<int>(rng() % 3));
    const int nqb = (cs.Lq + cs.bq - 1) / cs.bq, nkb = (cs.Lk + cs.bk - 1) / cs.bk;
    for (int e = 0; e < nqb * nkb; ++e) {
      cs.layout.push_back(rng() % 3 != 0);
      cs.partial.push_back(cs.layout.back() && rng() % 2);
    }
    if (!check_case<Tr, kBackward>(cs, checked)) {
      std::printf("  case: Lq=%d Lk=%d qlen=%d klen=%d window=(%s%d, %s%d) mask=%d lists=%d bq=%d bk=%d BM=%d BN=%d\n",
                  cs.Lq, cs.Lk, cs.qlen, cs.klen, cs.left_on ? "" : "off:", cs.left, cs.right_on ? "" : "off:",
                  cs.right, cs.mask, cs.lists, cs.bq, cs.bk, BM, BN);
      return false;
    }
  }
  return true;
}

int main() {
  std::mt19937 rng(1234);
  int checked = 0;
  const int trials = 400;
  const bool ok = run<FwdTraits<128, true, false, false, 128>>(rng, trials, &checked) &&
                  run<FwdTraits<64, true, false, false, 128>>(rng, trials, &checked) &&
                  run<FwdTraits<128, false, false, false, 128>>(rng, trials, &checked) &&
                  run<FwdTraits<128, true, true, true, 64>>(rng, trials, &checked) &&
                  run<FwdTraits<64, true, true, true, 64>>(rng, trials, &checked) &&
                  run<BwdTraits<128, true, false, false, false>, true>(rng, trials, &checked) &&
                  run<BwdTraits<64, true, false, false, false>, true>(rng, trials, &checked) &&
                  run<BwdTraits<128, false, false, false, false>, true>(rng, trials, &checked) &&
                  run<BwdTraits<128, true, true, true, true>, true>(rng, trials, &checked) &&
                  run<BwdTraits<64, true, true, true, true>, true>(rng, trials, &checked);
  if (!ok) return 1;
  std::printf("ok %d\n", checked);
  return 0;
}
