// Fused attention forward on the CPU: online softmax over key tiles, no (Lq, Lk) buffer.
//
// Grid: one task per (batch, query head, query tile), spread over torch's intra-op threads with
// at::parallel_for. A task loads its query tile once and walks only the key tiles its rows can
// see (the window band, or the BlockMask's listed blocks), keeping per row the running max m,
// the running sum l and the unnormalised output acc:
//
//   S   = scale * Q K^T                       # [rows, n]   (BLAS)
//   S   = transform(S)                        # softcap, ALiBi, attn_mask, band -> -inf
//   m'  = max(m, rowmax S);  P = exp(S - m')  # [rows, n]
//   l   = l * exp(m - m') + rowsum P
//   acc = acc * exp(m - m') + P V             # [rows, Dv]  (BLAS)
//
// and finally out = acc / l, lse = m + log l (out 0 and lse -inf for a row that saw nothing; NaN
// for a row with a NaN or +inf visible score). A V tile holding NaN/Inf is multiplied without those
// entries and the rows that see them are set NaN there (add_pv_nonfinite), so a hidden non-finite value
// never reaches a row through P = 0, even when other rows of the tile see it.
#include "cpu/attention_cpu.h"

#include <ATen/Parallel.h>

namespace fastattn::cpu {

template <typename scalar_t>
void attention_forward(const Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                       at::Tensor& lse, int64_t block_q, int64_t block_k) {
  using acc_t = typename AccType<scalar_t>::type;
  const bool block_mask = p.has_block_mask();
  const int64_t tile_q = block_mask ? p.block_q : block_q;
  const int64_t tile_k = block_mask ? std::max(block_k, p.block_k) : block_k;
  const int64_t num_q_tiles = ceil_div_i64(p.Lq, tile_q);
  const int64_t D = p.D, Dv = p.Dv;

  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* v_data = v.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();  // (B, Hq, Lq, Dv), unit last stride
  const int64_t o_sb = out.stride(0), o_sh = out.stride(1), o_sr = out.stride(2);
  float* lse_data = lse.mutable_data_ptr<float>();        // contiguous (B, Hq, Lq)

  at::parallel_for(0, p.B * p.Hq * num_q_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> S(tile_q * tile_k), acc(tile_q * Dv), m(tile_q), l(tile_q);
    std::vector<acc_t> drop(p.dropout_threshold ? tile_q * tile_k : 0);  // dropout factors of a tile
    std::vector<acc_t> v_clean(tile_k * Dv);  // a V tile without its non-finite entries (such tiles only)
    std::vector<char> seen(tile_q * tile_k);  // the keys each row sees (tiles with a non-finite V only)
    std::vector<char> bad(tile_q);            // rows with a non-finite visible score: NaN out and lse
    std::vector<acc_t> q_buf, k_buf, v_buf;  // converted tiles (bfloat16/half inputs only)
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      q_buf.resize(tile_q * D);
      k_buf.resize(tile_k * D);
      v_buf.resize(tile_k * Dv);
    }
    std::vector<int32_t> list_scratch;
    std::vector<Range> key_tiles;
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (p.Hq * num_q_tiles);
      const int64_t h = (task / num_q_tiles) % p.Hq;
      const int64_t q0 = (task % num_q_tiles) * tile_q, q1 = std::min(p.Lq, q0 + tile_q), rows = q1 - q0;
      const int64_t hk = h / p.group;
      const BatchGeometry g = batch_geometry(p, b);

      std::fill(m.begin(), m.begin() + rows, neg_inf);
      std::fill(l.begin(), l.begin() + rows, acc_t(0));
      std::fill(acc.begin(), acc.begin() + rows * Dv, acc_t(0));
      std::fill(bad.begin(), bad.begin() + rows, 0);

      forward_key_tiles(p, g, b, h, q0, q1, tile_k, list_scratch, key_tiles);
      if (!key_tiles.empty()) {
        int64_t ldq;
        const acc_t* Q = tile_as_acc<scalar_t, acc_t>(q_data + b * p.q_sb + h * p.q_sh + q0 * p.q_sr, rows, D, p.q_sr,
                                                      q_buf.data(), &ldq);
        for (const Range& kr : key_tiles) {
          const int64_t k0 = kr.begin, n = kr.end - kr.begin;
          int64_t ldk, ldv;
          const acc_t* K = tile_as_acc<scalar_t, acc_t>(k_data + b * p.k_sb + hk * p.k_sh + k0 * p.k_sr, n, D, p.k_sr,
                                                        k_buf.data(), &ldk);
          gemm(Trans::kNo, Trans::kYes, rows, n, D, static_cast<acc_t>(p.scale), Q, ldq, K, ldk, acc_t(0), S.data(), n);
          transform_scores<acc_t>(p, g, b, h, q0, q1, k0, kr.end, S.data(), n, nullptr);
          const acc_t* V = tile_as_acc<scalar_t, acc_t>(v_data + b * p.v_sb + hk * p.v_sh + k0 * p.v_sr, n, Dv, p.v_sr,
                                                        v_buf.data(), &ldv);
          const bool v_finite = tile_finite(V, n, Dv, ldv);
          if (!v_finite) seen_keys(S.data(), rows * n, seen.data());
          online_softmax_step(S.data(), rows, n, m.data(), l.data(), bad.data(), acc.data(), Dv);
          if (p.dropout_threshold) {  // l keeps the undropped sum; only P V sees the dropout
            dropout_factors<acc_t>(p, b, h, q0, rows, k0, n, drop.data());
            for (int64_t e = 0; e < rows * n; ++e) S[e] *= drop[e];
          }
          if (v_finite) {
            gemm(Trans::kNo, Trans::kNo, rows, Dv, n, acc_t(1), S.data(), n, V, ldv, acc_t(1), acc.data(), Dv);
          } else {  // a non-finite value reaches exactly the rows that see it
            add_pv_nonfinite(S.data(), seen.data(), rows, n, V, ldv, Dv, v_clean.data(), acc.data());
          }
        }
      }

      scalar_t* o = out_data + b * o_sb + h * o_sh + q0 * o_sr;
      float* row_lse = lse_data + (b * p.Hq + h) * p.Lq + q0;
      for (int64_t r = 0; r < rows; ++r) {
        const bool seen = l[r] > acc_t(0);
        const acc_t inv = seen ? acc_t(1) / l[r] : acc_t(0);
        const acc_t* a = acc.data() + r * Dv;
        for (int64_t c = 0; c < Dv; ++c) o[r * o_sr + c] = static_cast<scalar_t>(a[c] * inv);
        row_lse[r] = seen ? static_cast<float>(m[r] + std::log(l[r])) : -std::numeric_limits<float>::infinity();
        if (bad[r]) {
          for (int64_t c = 0; c < Dv; ++c) o[r * o_sr + c] = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
          row_lse[r] = std::numeric_limits<float>::quiet_NaN();
        }
      }
    }
  });
}

void attention_forward_dispatch(const Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                at::Tensor& out, at::Tensor& lse, int64_t block_q, int64_t block_k) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn_attention_fwd_cpu", [&] {
    attention_forward<scalar_t>(p, q, k, v, out, lse, block_q, block_k);
  });
}

}  // namespace fastattn::cpu
