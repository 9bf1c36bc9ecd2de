// Fused attention backward on the CPU: probabilities recomputed from lse, no (Lq, Lk) buffer.
//
//   delta = rowsum(dO * O) - dlse                           # (B, Hq, Lq), first pass; O recomputed
//                                                           # in float for bfloat16/half
//   per (query tile, key tile) pair that is visible:
//     P  = exp(transform(scale * Q K^T) - lse)              # [rows, n]
//     dV += P^T dO                                          # [n, Dv]
//     dP = dO V^T;  dS = P * (dP - delta), 0 where P = 0    # [rows, n]   (dS is also dbias)
//     dX = dS * (1 - tanh^2)  with softcap, else dS
//     dK += scale * dX^T Q;  dQ += scale * dX K
//
// Grid, deterministic without atomics: one task per (batch, kv head, chunk of key tiles). A task owns
// dK and dV of its key tiles outright: for each key tile it loops over the query heads of its GQA
// group and the query tiles that see the tile (band or transposed BlockMask lists). dQ rows receive
// contributions from every chunk, so each chunk accumulates into its own dQ buffer, summed in a
// fixed order at the end. Chunks exist only to feed every thread when B * Hkv is small.
#include "cpu/attention_cpu.h"

#include <ATen/Parallel.h>

namespace fastattn::cpu {
namespace {

// The mask gradient's accumulator: dS summed over the dimensions the additive mask broadcasts, in
// acc_t, one (B', Hq', Lq', Lk') copy per key chunk when the mask broadcasts over the keys (chunks
// then share its elements) and a single copy otherwise. Element strides are 0 on the summed dims.
template <typename acc_t>
struct DbiasAccumulator {
  at::Tensor buffer;  // (copies, B', Hq', Lq', Lk') contiguous
  acc_t* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
  int64_t copy_stride = 0;  // 0 when there is one copy

  // Adds a dS tile (rows x n, row stride n) at (b, h, q0, k0), in a fixed order (rows, then keys).
  void add(int64_t chunk, int64_t b, int64_t h, int64_t q0, int64_t rows, int64_t k0, int64_t n,
           const acc_t* ds) const {
    acc_t* base = data + chunk * copy_stride + b * stride[0] + h * stride[1] + q0 * stride[2] + k0 * stride[3];
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; ++j) base[r * stride[2] + j * stride[3]] += ds[r * n + j];
  }
};

// Each row's softmax statistics, max m and sum l (P = exp(S - m) / l), recomputed from Q and K in
// acc_t, (B, Hq, Lq) contiguous; m is NaN for a row with a non-finite visible score, l is 0 for a row
// that sees nothing. The backward uses them instead of the op's float32 lse when that lse cannot give
// P: for float64 inputs (its rounding, 1e-7 relative, would show in float64 gradients: gradcheck runs
// on this kernel), and when an lse is so large (a row masked entirely at the dtype's minimum) that
// m + log(l) has lost log(l) -- then exp(S - lse) would be 1 on every key instead of 1 / n.
template <typename acc_t>
struct RowStats {
  std::vector<acc_t> m, l;
};

template <typename scalar_t, typename acc_t>
RowStats<acc_t> recompute_row_stats(const Params& p, const scalar_t* q_data, const scalar_t* k_data, int64_t block_q,
                                    int64_t block_k) {
  const bool block_mask = p.has_block_mask();
  const int64_t tile_q = block_mask ? p.block_q : block_q;
  const int64_t tile_k = block_mask ? std::max(block_k, p.block_k) : block_k;
  const int64_t num_q_tiles = ceil_div_i64(p.Lq, tile_q);
  RowStats<acc_t> stats{std::vector<acc_t>(p.B * p.Hq * p.Lq), std::vector<acc_t>(p.B * p.Hq * p.Lq)};
  at::parallel_for(0, p.B * p.Hq * num_q_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> S(tile_q * tile_k), m(tile_q), l(tile_q);
    std::vector<acc_t> q_buf, k_buf;  // converted tiles (bfloat16/half inputs only)
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      q_buf.resize(tile_q * p.D);
      k_buf.resize(tile_k * p.D);
    }
    std::vector<int32_t> list_scratch;
    std::vector<Range> key_tiles;
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (p.Hq * num_q_tiles), h = (task / num_q_tiles) % p.Hq;
      const int64_t q0 = (task % num_q_tiles) * tile_q, q1 = std::min(p.Lq, q0 + tile_q), rows = q1 - q0;
      const int64_t hk = h / p.group;
      const BatchGeometry g = batch_geometry(p, b);
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), acc_t(0));
      forward_key_tiles(p, g, b, h, q0, q1, tile_k, list_scratch, key_tiles);
      int64_t ldq, ldk;
      const acc_t* Q = tile_as_acc<scalar_t, acc_t>(q_data + b * p.q_sb + h * p.q_sh + q0 * p.q_sr, rows, p.D, p.q_sr,
                                                    q_buf.data(), &ldq);
      for (const Range& kr : key_tiles) {
        const int64_t n = kr.end - kr.begin;
        const acc_t* K = tile_as_acc<scalar_t, acc_t>(k_data + b * p.k_sb + hk * p.k_sh + kr.begin * p.k_sr, n, p.D,
                                                      p.k_sr, k_buf.data(), &ldk);
        gemm(Trans::kNo, Trans::kYes, rows, n, p.D, static_cast<acc_t>(p.scale), Q, ldq, K, ldk, acc_t(0), S.data(), n);
        transform_scores<acc_t>(p, g, b, h, q0, q1, kr.begin, kr.end, S.data(), n, nullptr);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s = S.data() + r * n;
          if (row_has_nonfinite(s, n)) m[r] = std::numeric_limits<acc_t>::quiet_NaN();
          if (std::isnan(m[r])) continue;
          const acc_t m_new = std::max(m[r], row_max(s, n));
          if (m_new == neg_inf) continue;
          l[r] = l[r] * (m[r] == neg_inf ? acc_t(0) : std::exp(m[r] - m_new)) + exp_shift_sum(s, n, m_new);
          m[r] = m_new;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        stats.m[(b * p.Hq + h) * p.Lq + q0 + r] = m[r];
        stats.l[(b * p.Hq + h) * p.Lq + q0 + r] = l[r];
      }
    }
  });
  return stats;
}

// True when some finite lse is too large for exp(S - lse) to resolve log(l) (see recompute_row_stats).
inline bool lse_too_large(const at::Tensor& lse) {
  if (lse.numel() == 0) return false;
  const at::Tensor finite = lse.masked_select(lse.isfinite());
  return finite.numel() > 0 && finite.abs().max().item<float>() > 65536.0f;
}

// How the backward recomputes a row's probabilities from its scores: exp(S - lse) from the op's lse,
// or exp(S - m) / l from recomputed RowStats.
template <typename acc_t>
struct RowSoftmax {
  const RowStats<acc_t>* stats;  // null: from lse
  const float* lse;
  int64_t lse_sb, lse_sh, lse_sr, Hq, Lq;

  // Scores s[0, n) of row i of (b, h) -> probabilities in place: 0 for a row that sees nothing, NaN at
  // the visible keys of a NaN row (a non-finite visible input).
  void apply(int64_t b, int64_t h, int64_t i, acc_t* s, int64_t n) const {
    const int64_t row = (b * Hq + h) * Lq + i;
    const acc_t shift = stats ? stats->m[row] : static_cast<acc_t>(lse[b * lse_sb + h * lse_sh + i * lse_sr]);
    const bool unseen = stats ? stats->l[row] == acc_t(0) : shift == -std::numeric_limits<acc_t>::infinity();
    probabilities_from_shift(s, n, shift, unseen);
    if (stats && !std::isnan(shift) && !unseen) {
      const acc_t inv = acc_t(1) / stats->l[row];
      for (int64_t j = 0; j < n; ++j) s[j] *= inv;
    }
  }
};

// rowsum(dO * O) into rowsum (B, Hq, Lq) contiguous, for bfloat16/half, with O recomputed in acc_t
// where the op's out is its rounding. Where dS = P * (dP - delta) should cancel exactly (a row with one
// visible key; the gradient of an additive mask summed over keys, e.g. of a bias per query) the rounding
// of out, ~2^-9 of |dO| |O| in bfloat16, would be all that is left. The pass redoes the forward's two
// products per visible tile pair (+40-50% of a bfloat16 backward, docs/design.md) and needs no memory;
// keeping a float32 copy of out from the forward instead would add an output to every backend's forward
// op and keep (B, Hq, Lq, Dv) float32 alive for the backward. A row whose out is not within one ulp of
// the recomputed O -- the merged output a context-parallel call passes (fastattn/distributed), whose
// delta is the final softmax's -- uses out as given, as the op contract says.
template <typename scalar_t, typename acc_t>
void recompute_out_dot_dout(const Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& dout, const RowSoftmax<acc_t>& softmax,
                            int64_t block_q, int64_t block_k, std::vector<acc_t>& rowsum) {
  const bool block_mask = p.has_block_mask();
  const int64_t tile_q = block_mask ? p.block_q : block_q;
  const int64_t tile_k = block_mask ? std::max(block_k, p.block_k) : block_k;
  const int64_t num_q_tiles = ceil_div_i64(p.Lq, tile_q);
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* v_data = v.const_data_ptr<scalar_t>();
  const scalar_t* dout_data = dout.const_data_ptr<scalar_t>();
  const int64_t do_sb = dout.stride(0), do_sh = dout.stride(1), do_sr = dout.stride(2);
  const scalar_t* out_data = out.const_data_ptr<scalar_t>();
  const int64_t o_sb = out.stride(0), o_sh = out.stride(1), o_sr = out.stride(2);
  at::parallel_for(0, p.B * p.Hq * num_q_tiles, 1, [&](int64_t begin, int64_t end) {
    ForwardScratch<scalar_t, acc_t> w(p, tile_q, tile_k);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (p.Hq * num_q_tiles), h = (task / num_q_tiles) % p.Hq;
      const int64_t q0 = (task % num_q_tiles) * tile_q, q1 = std::min(p.Lq, q0 + tile_q), rows = q1 - q0;
      const int64_t hk = h / p.group;
      const BatchGeometry g = batch_geometry(p, b);
      // P = exp(S - lse), dropped as the forward dropped it; O = P V as the forward computes it
      const auto probabilities = [&](acc_t* S, int64_t tile_rows, int64_t n) {
        for (int64_t r = 0; r < tile_rows; ++r) softmax.apply(b, h, q0 + r, S + r * n, n);
      };
      forward_rows(p, p, g, b, h, q0, q1, tile_k, q_data + b * p.q_sb + h * p.q_sh + q0 * p.q_sr,
                   k_data + b * p.k_sb + hk * p.k_sh, v_data + b * p.v_sb + hk * p.v_sh, probabilities, w);
      for (int64_t r = 0; r < rows; ++r) {
        rowsum[(b * p.Hq + h) * p.Lq + q0 + r] =
            out_dot_dout<scalar_t, acc_t>(out_data + b * o_sb + h * o_sh + (q0 + r) * o_sr, w.acc.data() + r * p.Dv,
                                          dout_data + b * do_sb + h * do_sh + (q0 + r) * do_sr, p.Dv);
      }
    }
  });
}

}  // namespace

template <typename scalar_t>
void attention_backward(const Params& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor* dlse,
                        at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor* dbias, int64_t block_q,
                        int64_t block_k) {
  using acc_t = typename AccType<scalar_t>::type;
  const bool block_mask = p.has_block_mask();
  const int64_t tile_q = block_mask ? std::max(block_q, p.block_q) : block_q;
  const int64_t tile_k = block_mask ? p.block_k : block_k;
  const int64_t B = p.B, Hq = p.Hq, Lq = p.Lq, D = p.D, Dv = p.Dv;

  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* v_data = v.const_data_ptr<scalar_t>();
  const scalar_t* dout_data = dout.const_data_ptr<scalar_t>();
  const float* lse_data = lse.const_data_ptr<float>();
  const int64_t lse_sb = lse.stride(0), lse_sh = lse.stride(1), lse_sr = lse.stride(2);
  const int64_t do_sb = dout.stride(0), do_sh = dout.stride(1), do_sr = dout.stride(2);

  RowStats<acc_t> stats;
  if (std::is_same_v<scalar_t, double> || lse_too_large(lse))
    stats = recompute_row_stats<scalar_t, acc_t>(p, q_data, k_data, block_q, block_k);
  const bool use_stats = !stats.m.empty();

  const RowSoftmax<acc_t> softmax{use_stats ? &stats : nullptr, lse_data, lse_sb, lse_sh, lse_sr, Hq, Lq};

  // delta = rowsum(dO * O) - dlse in acc_t, (B, Hq, Lq) contiguous (d lse / d S = P, so the lse
  // gradient enters as dS = P * (dP - rowsum(dO * O) + dlse)). O is the op's out; for bfloat16/half,
  // its float recomputation where out is its rounding (see recompute_out_dot_dout).
  std::vector<acc_t> delta(B * Hq * Lq);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const scalar_t* out_data = out.const_data_ptr<scalar_t>();
    const int64_t o_sb = out.stride(0), o_sh = out.stride(1), o_sr = out.stride(2);
    at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / Hq, h = bh % Hq;
        for (int64_t i = 0; i < Lq; ++i) {
          delta[bh * Lq + i] = out_dot_dout<scalar_t, acc_t>(out_data + b * o_sb + h * o_sh + i * o_sr, nullptr,
                                                             dout_data + b * do_sb + h * do_sh + i * do_sr, Dv);
        }
      }
    });
  } else {
    recompute_out_dot_dout<scalar_t, acc_t>(p, q, k, v, out, dout, softmax, block_q, block_k, delta);
  }
  if (dlse) {
    const float* dlse_data = dlse->const_data_ptr<float>();
    const int64_t dlse_sb = dlse->stride(0), dlse_sh = dlse->stride(1), dlse_sr = dlse->stride(2);
    for (int64_t bh = 0; bh < B * Hq; ++bh)
      for (int64_t i = 0; i < Lq; ++i)
        delta[bh * Lq + i] -= static_cast<acc_t>(dlse_data[(bh / Hq) * dlse_sb + (bh % Hq) * dlse_sh + i * dlse_sr]);
  }

  std::vector<Range> key_tiles;
  backward_key_tiles(p, tile_k, key_tiles);
  const int64_t num_key_tiles = static_cast<int64_t>(key_tiles.size());
  // A mask broadcast over the batch or the heads sums dS of several (b, kv head) pairs into one
  // element: a task then loops over those pairs itself (in order), so no two tasks write one element
  // of the mask gradient and it is deterministic without a dense buffer.
  const bool sum_batch = dbias != nullptr && dbias->size(0) == 1;
  const bool sum_heads = dbias != nullptr && dbias->size(1) == 1;
  const bool sum_keys = dbias != nullptr && dbias->size(3) == 1 && p.Lk > 1;
  const int64_t task_heads = sum_heads ? 1 : p.Hkv, units = (sum_batch ? 1 : B) * task_heads;
  const int64_t pair_heads = sum_heads ? p.Hkv : 1, pairs_per_task = (sum_batch ? B : 1) * pair_heads;
  const int64_t threads = at::get_num_threads();
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(num_key_tiles, units >= 2 * threads ? 1 : ceil_div_i64(2 * threads, units)));

  DbiasAccumulator<acc_t> dbias_acc;
  if (dbias != nullptr) {
    const int64_t copies = sum_keys ? chunks : 1;
    at::Tensor buffer = at::zeros({copies, dbias->size(0), dbias->size(1), dbias->size(2), dbias->size(3)},
                                  q.options().dtype(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat));
    dbias_acc.data = buffer.mutable_data_ptr<acc_t>();
    for (int d = 0; d < 4; ++d) dbias_acc.stride[d] = dbias->size(d) == 1 ? 0 : buffer.stride(d + 1);
    dbias_acc.copy_stride = sum_keys ? buffer.stride(0) : 0;
    dbias_acc.buffer = buffer;
  }

  // dQ accumulators, one per chunk: (chunks, B, Hq, Lq, D).
  const at::ScalarType acc_type = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  at::Tensor dq_acc = at::zeros({chunks, B, Hq, Lq, D}, q.options().dtype(acc_type));
  acc_t* dq_acc_data = dq_acc.mutable_data_ptr<acc_t>();

  scalar_t* dk_data = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dv_data = dv.mutable_data_ptr<scalar_t>();
  const int64_t dk_sb = dk.stride(0), dk_sh = dk.stride(1), dk_sr = dk.stride(2), dk_sc = dk.stride(3);
  const int64_t dv_sb = dv.stride(0), dv_sh = dv.stride(1), dv_sr = dv.stride(2), dv_sc = dv.stride(3);

  at::parallel_for(0, units * chunks, 1, [&](int64_t begin, int64_t end) {
    BackwardScratch<scalar_t, acc_t> w(p, tile_q, tile_k);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t unit = task / chunks, chunk = task % chunks;
      const int64_t unit_b = unit / task_heads, unit_hk = unit % task_heads;
      const int64_t t0 = chunk * num_key_tiles / chunks, t1 = (chunk + 1) * num_key_tiles / chunks;
      for (int64_t pair = 0; pair < pairs_per_task; ++pair) {
        const int64_t b = sum_batch ? pair / pair_heads : unit_b;
        const int64_t hk = sum_heads ? pair % pair_heads : unit_hk;
        const BatchGeometry g = batch_geometry(p, b);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t k0 = key_tiles[t].begin, k1 = key_tiles[t].end;
          const BackwardKeyTile<acc_t> kt = w.load_keys(k0, k1, k_data + b * p.k_sb + hk * p.k_sh + k0 * p.k_sr, p.k_sr,
                                                        v_data + b * p.v_sb + hk * p.v_sh + k0 * p.v_sr, p.v_sr);
          for (int64_t h = hk * p.group; h < (hk + 1) * p.group; ++h) {
            backward_query_tiles(p, g, b, h, k0, k1, tile_q, w.list_scratch, w.query_tiles);
            const auto probabilities = [&](int64_t i, acc_t* s, int64_t n) { softmax.apply(b, h, i, s, n); };
            for (const Range& qr : w.query_tiles) {
              const BackwardQueryTile<acc_t> qt =
                  w.load_queries(qr.begin, qr.end, q_data + b * p.q_sb + h * p.q_sh + qr.begin * p.q_sr, p.q_sr,
                                 dout_data + b * do_sb + h * do_sh + qr.begin * do_sr, do_sr);
              const auto add_dbias = [&](const acc_t* ds) {
                if (dbias != nullptr) dbias_acc.add(chunk, b, h, qr.begin, qr.end - qr.begin, k0, k1 - k0, ds);
              };
              backward_tile_step(p, p, g, b, h, kt, qt, delta.data() + (b * Hq + h) * Lq, probabilities, add_dbias, w,
                                 dq_acc_data + ((chunk * B + b) * Hq + h) * Lq * D);
            }
          }
          w.store_dk_dv(k1 - k0, dk_data + b * dk_sb + hk * dk_sh + k0 * dk_sr, dk_sr, dk_sc,
                        dv_data + b * dv_sb + hk * dv_sh + k0 * dv_sr, dv_sr, dv_sc);
        }
      }
    }
  });

  // dbias = the accumulator's copies summed in chunk order, rounded once to the mask's dtype.
  if (dbias != nullptr) {
    const at::Tensor& buffer = dbias_acc.buffer;
    at::Tensor sum = buffer[0];
    if (sum_keys) {
      const int64_t copies = buffer.size(0), numel = sum.numel();
      acc_t* first = dbias_acc.data;
      at::parallel_for(0, numel, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e)
          for (int64_t c = 1; c < copies; ++c) first[e] += first[c * numel + e];
      });
    }
    dbias->copy_(sum);
  }

  // dQ = sum of the chunks' accumulators, in chunk order.
  scalar_t* dq_data = dq.mutable_data_ptr<scalar_t>();
  const int64_t dq_sb = dq.stride(0), dq_sh = dq.stride(1), dq_sr = dq.stride(2), dq_sc = dq.stride(3);
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      for (int64_t i = 0; i < Lq; ++i) {
        scalar_t* dst = dq_data + b * dq_sb + h * dq_sh + i * dq_sr;
        for (int64_t c = 0; c < D; ++c) {
          acc_t sum = 0;
          for (int64_t ch = 0; ch < chunks; ++ch) sum += dq_acc_data[((ch * B * Hq + bh) * Lq + i) * D + c];
          dst[c * dq_sc] = static_cast<scalar_t>(sum);
        }
      }
    }
  });
}

void attention_backward_dispatch(const Params& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor* dlse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                                 at::Tensor* dbias, int64_t block_q, int64_t block_k) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn_attention_bwd_cpu", [&] {
    attention_backward<scalar_t>(p, dout, q, k, v, out, lse, dlse, dq, dk, dv, dbias, block_q, block_k);
  });
}

}  // namespace fastattn::cpu
