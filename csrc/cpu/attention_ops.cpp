// CPU implementations of fastattn::attention_fwd / attention_bwd (schemas in csrc/bindings.cpp):
// input checks (csrc/checks.h), the Params a kernel reads, output allocation, tile sizes.
#include <torch/library.h>

#include "checks.h"
#include "cpu/attention_cpu.h"

namespace fastattn::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

void check_cpu_inputs(const at::Tensor& q, const OptTensor& attn_mask) {
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the CPU kernel, got ", q.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "q must be float32, float64, bfloat16 or float16, got ", dtype);
  if (attn_mask.has_value()) {
    const auto mt = attn_mask->scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == at::kFloat || mt == at::kDouble || mt == at::kBFloat16 || mt == at::kHalf,
                "attn_mask must be bool or float32/float64/bfloat16/float16, got ", mt);
  }
}

BlockList make_block_list(const OptTensor& num, const OptTensor& idx, int64_t B, int64_t H) {
  BlockList list;
  if (!num.has_value()) return list;
  // Broadcast (1 -> B, 1 -> H) through zero strides; no copy.
  const at::Tensor n = num->expand({B, H, num->size(2)});
  const at::Tensor i = idx->expand({B, H, idx->size(2), idx->size(3)});
  list.num = n.const_data_ptr<int32_t>();
  list.idx = i.const_data_ptr<int32_t>();
  list.num_sb = n.stride(0), list.num_sh = n.stride(1), list.num_sr = n.stride(2);
  list.idx_sb = i.stride(0), list.idx_sh = i.stride(1), list.idx_sr = i.stride(2), list.idx_sc = i.stride(3);
  return list;
}

MaskKind mask_kind(const at::Tensor& mask) {
  switch (mask.scalar_type()) {
    case at::kBool:
      return MaskKind::kBool;
    case at::kFloat:
      return MaskKind::kFloat;
    case at::kDouble:
      return MaskKind::kDouble;
    case at::kBFloat16:
      return MaskKind::kBFloat16;
    default:
      return MaskKind::kHalf;
  }
}

// Everything both kernels read, after the checks.
Params make_params(const AttentionShape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const OptTensor& attn_mask, const OptTensor& alibi_slopes, const OptTensor& key_lengths,
                   const OptTensor& query_lengths, const OptTensor& kv_num_blocks, const OptTensor& kv_indices,
                   const OptTensor& full_kv_num_blocks, const OptTensor& full_kv_indices, const OptTensor& q_num_blocks,
                   const OptTensor& q_indices, const OptTensor& full_q_num_blocks, const OptTensor& full_q_indices,
                   const OptTensor& partial_masks, const OptTensor& partial_tile_ids, int64_t block_size_q,
                   int64_t block_size_k, double scale, std::optional<int64_t> window_left,
                   std::optional<int64_t> window_right, double softcap, double dropout_p, int64_t seed) {
  Params p;
  p.B = s.batch;
  set_shape_and_options(p, s, scale, softcap, dropout_p, seed, window_left, window_right);
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sr = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sr = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sr = v.stride(2);
  if (key_lengths.has_value()) {
    p.key_lengths = key_lengths->const_data_ptr<int32_t>();
    p.key_lengths_s = key_lengths->stride(0);
  }
  if (query_lengths.has_value()) {
    p.query_lengths = query_lengths->const_data_ptr<int32_t>();
    p.query_lengths_s = query_lengths->stride(0);
  }
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    p.mask_kind = mask_kind(m);
    p.mask = m.const_data_ptr();
    p.mask_sb = m.stride(0), p.mask_sh = m.stride(1), p.mask_sq = m.stride(2), p.mask_sk = m.stride(3);
  }
  if (alibi_slopes.has_value()) {
    p.alibi = alibi_slopes->const_data_ptr<float>();
    p.alibi_sb = alibi_slopes->stride(0), p.alibi_sh = alibi_slopes->stride(1);
  }
  p.block_q = block_size_q, p.block_k = block_size_k;
  p.kv = make_block_list(kv_num_blocks, kv_indices, s.batch, s.heads_q);
  p.kv_full = make_block_list(full_kv_num_blocks, full_kv_indices, s.batch, s.heads_q);
  p.qt = make_block_list(q_num_blocks, q_indices, s.batch, s.heads_q);
  p.qt_full = make_block_list(full_q_num_blocks, full_q_indices, s.batch, s.heads_q);
  if (partial_masks.has_value()) {
    p.partial_masks = partial_masks->const_data_ptr<bool>();
    const at::Tensor ids = partial_tile_ids->expand({s.batch, s.heads_q, partial_tile_ids->size(2),
                                                     partial_tile_ids->size(3)});
    p.tile_ids = ids.const_data_ptr<int32_t>();
    p.tid_sb = ids.stride(0), p.tid_sh = ids.stride(1), p.tid_sq = ids.stride(2), p.tid_sk = ids.stride(3);
  }
  return p;
}

// Tile sizes without a BlockMask: large key tiles amortise the BLAS calls; query tiles stay small
// enough that the causal diagonal wastes little and every thread gets several tiles.
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 256;

// A tensor BLAS can read row by row: unit last stride and rows that do not overlap (a broadcast
// dout from `out.sum().backward()` has stride 0 everywhere, so that one is copied).
at::Tensor rows_readable(const at::Tensor& t) {
  const bool ok = (t.size(3) <= 1 || t.stride(3) == 1) && (t.size(2) <= 1 || t.stride(2) >= t.size(3));
  return ok ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& attn_mask,
    const OptTensor& alibi_slopes, const OptTensor& key_lengths, const OptTensor& query_lengths,
    const OptTensor& kv_num_blocks, const OptTensor& kv_indices, const OptTensor& full_kv_num_blocks,
    const OptTensor& full_kv_indices, const OptTensor& partial_masks, const OptTensor& partial_tile_ids,
    int64_t block_size_q, int64_t block_size_k, double scale, std::optional<int64_t> window_left,
    std::optional<int64_t> window_right, double softcap, double dropout_p, int64_t seed) {
  const AttentionShape s = check_qkv(q, k, v);
  check_cpu_inputs(q, attn_mask);
  TORCH_CHECK(s.head_dim > 0, "q must have a non-zero head_dim");
  check_optionals(s, q, attn_mask, alibi_slopes, key_lengths, query_lengths);
  check_length_values(key_lengths, s.seqlen_k, "key_lengths");
  check_length_values(query_lengths, s.seqlen_q, "query_lengths");
  check_scalars(scale, softcap, dropout_p);
  check_block_mask_args(s, q, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, std::nullopt,
                        std::nullopt, std::nullopt, std::nullopt, block_size_q, block_size_k);
  check_partial_masks(s, q, attn_mask, partial_masks, partial_tile_ids,
                      kv_num_blocks.has_value() || full_kv_num_blocks.has_value(), block_size_q, block_size_k);

  const Params p = make_params(s, q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths, kv_num_blocks,
                               kv_indices, full_kv_num_blocks, full_kv_indices, std::nullopt, std::nullopt,
                               std::nullopt, std::nullopt, partial_masks, partial_tile_ids, block_size_q,
                               block_size_k, scale, window_left, window_right, softcap, dropout_p, seed);
  // out in q's layout (fastattn/ops.py output_like_q): a transposed (B, L, H, D) view gets (B, L, H, Dv)
  // memory, so a caller holding that layout needs no copy back.
  const bool bshd = s.heads_q > 1 && s.seqlen_q > 1 && q.stride(1) < q.stride(2);
  at::Tensor out = bshd ? at::empty({s.batch, s.seqlen_q, s.heads_q, s.head_dim_v}, q.options()).transpose(1, 2)
                        : at::empty({s.batch, s.heads_q, s.seqlen_q, s.head_dim_v}, q.options());
  at::Tensor lse = at::empty({s.batch, s.heads_q, s.seqlen_q}, q.options().dtype(at::kFloat));
  attention_forward_dispatch(p, q, k, v, out, lse, kBlockQ, kBlockK);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const OptTensor& attn_mask, const OptTensor& alibi_slopes, const OptTensor& key_lengths,
    const OptTensor& query_lengths, const OptTensor& kv_num_blocks, const OptTensor& kv_indices,
    const OptTensor& full_kv_num_blocks, const OptTensor& full_kv_indices, const OptTensor& q_num_blocks,
    const OptTensor& q_indices, const OptTensor& full_q_num_blocks, const OptTensor& full_q_indices,
    const OptTensor& partial_masks, const OptTensor& partial_tile_ids, int64_t block_size_q, int64_t block_size_k,
    double scale, std::optional<int64_t> window_left, std::optional<int64_t> window_right, double softcap,
    double dropout_p, int64_t seed, bool compute_dbias, const OptTensor& dlse) {
  const AttentionShape s = check_qkv(q, k, v);
  check_cpu_inputs(q, attn_mask);
  TORCH_CHECK(s.head_dim > 0, "q must have a non-zero head_dim");
  check_optionals(s, q, attn_mask, alibi_slopes, key_lengths, query_lengths);
  check_length_values(key_lengths, s.seqlen_k, "key_lengths");
  check_length_values(query_lengths, s.seqlen_q, "query_lengths");
  check_scalars(scale, softcap, dropout_p);
  check_backward_tensors(s, q, dout, out, lse);
  check_block_mask_args(s, q, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks,
                        q_indices, full_q_num_blocks, full_q_indices, block_size_q, block_size_k);
  const bool forward_lists = kv_num_blocks.has_value() || full_kv_num_blocks.has_value();
  const bool backward_lists = q_num_blocks.has_value() || full_q_num_blocks.has_value();
  TORCH_CHECK(forward_lists == backward_lists,
              "the backward needs the transposed block lists q_num_blocks/q_indices (and full_q_*) exactly when "
              "kv_num_blocks/kv_indices (and full_kv_*) are given");
  TORCH_CHECK(!compute_dbias || (attn_mask.has_value() && attn_mask->scalar_type() != at::kBool),
              "compute_dbias needs a floating (additive) attn_mask");
  check_partial_masks(s, q, attn_mask, partial_masks, partial_tile_ids, forward_lists, block_size_q, block_size_k);

  check_dlse(s, q, dlse);

  const at::Tensor dout_r = rows_readable(dout);
  const Params p = make_params(s, q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths, kv_num_blocks,
                               kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices,
                               full_q_num_blocks, full_q_indices, partial_masks, partial_tile_ids, block_size_q,
                               block_size_k, scale, window_left, window_right, softcap, dropout_p, seed);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  // dbias in the mask's own shape: size 1 where attn_mask has size 1 or stride 0 (fastattn/ops.py,
  // dbias_shape); the kernel sums dS over those dimensions in acc_t and rounds once.
  at::Tensor dbias = at::empty({0}, q.options());
  if (compute_dbias) {
    std::vector<int64_t> shape(4);
    for (int d = 0; d < 4; ++d)
      shape[d] = attn_mask->size(d) == 1 || attn_mask->stride(d) == 0 ? 1 : attn_mask->size(d);
    dbias = at::empty(shape, attn_mask->options());
  }
  attention_backward_dispatch(p, dout_r, q, k, v, out, lse, dlse.has_value() ? &*dlse : nullptr, dq, dk, dv,
                              compute_dbias ? &dbias : nullptr, kBlockQ, kBlockK);
  return {dq, dk, dv, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastattn::cpu
