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

  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* v_data = v.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();  // (B, Hq, Lq, Dv), unit last stride
  const int64_t o_sb = out.stride(0), o_sh = out.stride(1), o_sr = out.stride(2);
  float* lse_data = lse.mutable_data_ptr<float>();        // contiguous (B, Hq, Lq)

  at::parallel_for(0, p.B * p.Hq * num_q_tiles, 1, [&](int64_t begin, int64_t end) {
    ForwardScratch<scalar_t, acc_t> w(p, tile_q, tile_k);
    const auto online_softmax = [&](acc_t* S, int64_t tile_rows, int64_t n) { w.online_softmax(S, tile_rows, n); };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (p.Hq * num_q_tiles);
      const int64_t h = (task / num_q_tiles) % p.Hq;
      const int64_t q0 = (task % num_q_tiles) * tile_q, q1 = std::min(p.Lq, q0 + tile_q), rows = q1 - q0;
      const int64_t hk = h / p.group;
      const BatchGeometry g = batch_geometry(p, b);
      forward_rows(p, p, g, b, h, q0, q1, tile_k, q_data + b * p.q_sb + h * p.q_sh + q0 * p.q_sr,
                   k_data + b * p.k_sb + hk * p.k_sh, v_data + b * p.v_sb + hk * p.v_sh, online_softmax, w);
      w.finish(rows, out_data + b * o_sb + h * o_sh + q0 * o_sr, o_sr, lse_data + (b * p.Hq + h) * p.Lq + q0);
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
