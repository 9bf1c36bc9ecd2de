// Runs the forward's tile schedule (FwdSchedule in csrc/cuda/attention_kernels.cuh) on the CPU,
// exactly as attention_fwd_kernel walks it, for random lengths, query/key lengths, windows, element
// masks and BlockMask lists, and checks against a brute-force enumeration of visible (i, j) pairs:
//   * every key tile holding a visible pair of the query tile is visited, and no tile twice;
//   * every tile visited without element checks (the interior loop) is entirely visible for every
//     live row of the query tile, and is a full (not partial) BlockMask tile;
//   * element-masked tiles come first.
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

template <class Tr>
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
  std::vector<int> num(nqb), idx(nqb * nkb), full_num(nqb), full_idx(nqb * nkb);
  if (cs.lists) {
    for (int r = 0; r < nqb; ++r) {
      for (int cidx = nkb - 1; cidx >= 0; --cidx) {  // descending: the schedule must not assume order
        if (!cs.layout[r * nkb + cidx]) continue;
        if (cs.partial[r * nkb + cidx]) idx[r * nkb + num[r]++] = cidx;
        else full_idx[r * nkb + full_num[r]++] = cidx;
      }
    }
    p.use_block_lists = true;
    p.mask_block_q = cs.bq;
    p.mask_block_k = cs.bk;
    BlockLists& l = p.kv_lists;
    l.num = num.data();
    l.idx = idx.data();
    l.full_num = full_num.data();
    l.full_idx = full_idx.data();
    l.num_stride[2] = l.full_num_stride[2] = 1;
    l.idx_stride[2] = l.full_idx_stride[2] = nkb;
    l.idx_stride[3] = l.full_idx_stride[3] = 1;
    l.cols = nkb;
  }
  const HeadContext c = head_context(p, 0, 0);
  auto visible = [&](int i, int j) {  // band, lengths and lists (an element mask may hide more)
    if (i >= c.qlen || j >= c.klen) return false;
    if (cs.left_on && j < i + c.offset - cs.left) return false;
    if (cs.right_on && j > i + c.offset + cs.right) return false;
    return !cs.lists || cs.layout[(i / cs.bq) * nkb + j / cs.bk] != 0;
  };
  for (int m0 = 0; m0 < cs.Lq; m0 += BM) {
    FwdSchedule<Tr> s;
    s.init(p, c, 0, 0, m0);
    std::vector<FwdStep> walk;  // as the kernel: cur, nxt and the step after next
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
    std::set<int> visited;
    bool unmasked_seen = false;
    for (const FwdStep& st : walk) {
      if (!visited.insert(st.tile).second) {
        std::printf("FAIL m0=%d: key tile %d visited twice\n", m0, st.tile);
        return false;
      }
      if (st.masked && unmasked_seen) {
        std::printf("FAIL m0=%d: masked tile %d after an unmasked one\n", m0, st.tile);
        return false;
      }
      unmasked_seen = unmasked_seen || !st.masked;
      const int row_end = std::min(m0 + BM, c.qlen);
      if (!st.masked) {
        for (int i = m0; i < row_end; ++i) {
          for (int j = st.tile * BN; j < st.tile * BN + BN; ++j) {
            // The element mask covers every tile without lists, only partial tiles with them (the op's
            // contract: with a BlockMask, attn_mask carries the partial tiles' element masks).
            const bool element_mask = cs.lists ? cs.partial[(i / cs.bq) * nkb + j / cs.bk] != 0 : cs.mask;
            if (!visible(i, j) || element_mask) {
              std::printf("FAIL m0=%d: tile %d walked without element checks but (%d, %d) is hidden\n", m0,
                          st.tile, i, j);
              return false;
            }
          }
        }
      }
    }
    for (int i = m0; i < std::min(m0 + BM, cs.Lq); ++i) {
      for (int j = 0; j < cs.Lk; ++j) {
        if (visible(i, j) && !visited.count(j / BN)) {
          std::printf("FAIL m0=%d: visible (%d, %d) in key tile %d never visited\n", m0, i, j, j / BN);
          return false;
        }
      }
    }
    ++*checked;
  }
  return true;
}

template <class Tr>
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
    cs.bq = BM * (1 + static_cast<int>(rng() % 2));
    cs.bk = BN * (1 + static_cast<int>(rng() % 3));
    const int nqb = (cs.Lq + cs.bq - 1) / cs.bq, nkb = (cs.Lk + cs.bk - 1) / cs.bk;
    for (int e = 0; e < nqb * nkb; ++e) {
      cs.layout.push_back(rng() % 3 != 0);
      cs.partial.push_back(cs.layout.back() && rng() % 2);
    }
    if (!check_case<Tr>(cs, checked)) {
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
                  run<FwdTraits<64, true, true, true, 64>>(rng, trials, &checked);
  if (!ok) return 1;
  std::printf("ok %d\n", checked);
  return 0;
}
