// fastattn::attention_bwd for CUDA tensors: delta = rowsum(dO * O), then one kernel per key block
// doing the five products with dQ summed by float atomics (FlashAttention-2); under
// torch.use_deterministic_algorithms(True), the same kernel adds dQ in a fixed key-block order.
#include <ATen/Context.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "attention_host.h"

namespace fastattn {
namespace cuda {
namespace {

template <typename T, class Tr>
void launch_bwd(const AttentionParams& p) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seqlen_k, Tr::kBlockN)), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  launch(attention_bwd_kernel<T, Tr>, grid, Tr::kThreads, bwd_smem_bytes<T, Tr>(), p);
}

// How often each (row block, column block) pair is listed in one direction's BlockMask lists,
// (B', H', rows, cols) int32 with B', H' the lists' broadcast sizes (1 or B, 1 or Hq).
at::Tensor listed_pairs(const at::Tensor& num, const at::Tensor& idx, const at::Tensor& full_num,
                        const at::Tensor& full_idx, int64_t batch, int64_t heads, int64_t cols) {
  const int64_t rows = num.size(2);
  at::Tensor layout = at::zeros({batch, heads, rows, cols + 1}, num.options());
  for (const auto& [n, i] : {std::pair{num, idx}, std::pair{full_num, full_idx}}) {
    const at::Tensor entries = i.expand({batch, heads, rows, i.size(3)});
    const at::Tensor valid = at::arange(i.size(3), i.options()).lt(n.expand({batch, heads, rows}).unsqueeze(-1));
    // Column cols collects the unused entries (dropped below).
    layout.scatter_add_(3, at::where(valid, entries.clamp(0, cols - 1), cols).to(at::kLong), valid.to(at::kInt));
  }
  return layout.narrow(3, 0, cols);
}

// The deterministic mode's dq_rank_prefix (AttentionParams): for each query block of the forward
// lists, the number of listed key blocks before each key block, (B', H', nQB, nKB + 1) int32. The
// ordered dQ needs the backward lists to be exactly the transpose of the forward ones (a BlockMask's
// are): a key block waiting for a rank nobody holds would wait forever, so that is checked here
// (one host synchronisation, in this mode only).
at::Tensor dq_rank_prefix(const at::Tensor& kv_num, const at::Tensor& kv_idx,
                          const at::Tensor& full_kv_num, const at::Tensor& full_kv_idx, const at::Tensor& q_num,
                          const at::Tensor& q_idx, const at::Tensor& full_q_num, const at::Tensor& full_q_idx) {
  int64_t batch = 1, heads = 1;
  for (const at::Tensor* t : {&kv_num, &kv_idx, &full_kv_num, &full_kv_idx, &q_num, &q_idx, &full_q_num, &full_q_idx}) {
    batch = std::max(batch, t->size(0));
    heads = std::max(heads, t->size(1));
  }
  const int64_t nqb = kv_num.size(2), nkb = q_num.size(2);
  const at::Tensor forward = listed_pairs(kv_num, kv_idx, full_kv_num, full_kv_idx, batch, heads, nkb);
  const at::Tensor backward = listed_pairs(q_num, q_idx, full_q_num, full_q_idx, batch, heads, nqb);
  TORCH_CHECK(at::equal(forward, backward.transpose(2, 3)) && forward.le(1).all().item<bool>(),
              "under torch.use_deterministic_algorithms the CUDA backward needs q_num_blocks/q_indices (and the full "
              "ones) to list exactly the pairs of kv_num_blocks/kv_indices, each once (as a BlockMask's lists do)");
  return at::cat({at::zeros({batch, heads, nqb, 1}, forward.options()), forward.cumsum(3, at::kInt)}, 3);
}

// The instantiation for these parameters: feature flags and dQ by atomics, or the generic kernel
// with dQ added in order when `deterministic`.
template <typename T, int D>
void dispatch_bwd(const AttentionParams& p, bool deterministic) {
  if (deterministic) return launch_bwd<T, BwdTraits<D, true, true, true, true>>(p);
  const bool window = p.has_window_left || p.has_window_right;
  // As in the forward: raw dot-product units need scale > 0 (a masked -inf times a negative or zero
  // scale would be +inf or NaN), so scale <= 0 takes the natural-unit (bias) kernels.
  const bool bias = p.alibi != nullptr || (p.mask_kind != kNoMask && p.mask_kind != kBoolMask) || !(p.scale > 0.f);
  // Plain and causal/window calls get their exact kernels; a softcap or bias kernel always carries
  // the band checks (on masked tiles only: the interior loop is the same, see docs/cuda-kernels.md),
  // which saves three instantiations per dtype and head dim of build time.
  if (!(p.softcap > 0.f) && !bias) {
    FASTATTN_BOOL_SWITCH(window, kWindow, [&] { launch_bwd<T, BwdTraits<D, kWindow, false, false, false>>(p); });
    return;
  }
  FASTATTN_BOOL_SWITCH(p.softcap > 0.f, kSoftcap, [&] {
    FASTATTN_BOOL_SWITCH(bias, kBias, [&] { launch_bwd<T, BwdTraits<D, true, kSoftcap, kBias, false>>(p); });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& key_lengths, const std::optional<at::Tensor>& query_lengths,
    const std::optional<at::Tensor>& kv_num_blocks, const std::optional<at::Tensor>& kv_indices,
    const std::optional<at::Tensor>& full_kv_num_blocks, const std::optional<at::Tensor>& full_kv_indices,
    const std::optional<at::Tensor>& q_num_blocks, const std::optional<at::Tensor>& q_indices,
    const std::optional<at::Tensor>& full_q_num_blocks, const std::optional<at::Tensor>& full_q_indices,
    const std::optional<at::Tensor>& partial_masks, const std::optional<at::Tensor>& partial_tile_ids,
    int64_t block_size_q, int64_t block_size_k, double scale, std::optional<int64_t> window_left,
    std::optional<int64_t> window_right, double softcap, double dropout_p, int64_t seed, bool compute_dbias,
    const std::optional<at::Tensor>& dlse) {
  (void)seed;  // dropout is refused in prepare()
  TORCH_CHECK(!dlse.has_value(), "dlse (a gradient of lse) is not supported by the CUDA kernels");
  TORCH_CHECK(!partial_masks.has_value() && !partial_tile_ids.has_value(),
              "partial_masks is not supported by the CUDA kernels: pass the element mask as attn_mask");
  const at::cuda::CUDAGuard device_guard(q.device());
  TORCH_CHECK(!compute_dbias || (attn_mask.has_value() && attn_mask->scalar_type() != at::kBool),
              "compute_dbias needs an additive (floating) attn_mask");
  PreparedInputs in = prepare(q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths, block_size_q,
                              block_size_k, scale, window_left, window_right, softcap, dropout_p);
  const AttentionShape& s = in.shape;
  AttentionParams& p = in.params;
  // An owning vector: an IntArrayRef of a braced list would dangle after this statement.
  const std::vector<int64_t> q_shape{s.batch, s.heads_q, s.seqlen_q, s.head_dim};
  TORCH_CHECK(dout_in.sizes() == at::IntArrayRef(q_shape), "dout must have q's shape ", q.sizes(), ", got ",
              dout_in.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(q_shape), "out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(dout_in.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "dout and out must have q's dtype ", q.scalar_type(), ", got ", dout_in.scalar_type(), " and ",
              out.scalar_type());
  check_same_device(dout_in, q, "dout");
  check_same_device(out, q, "out");
  check_same_device(lse_in, q, "lse");
  check_last_dim_contiguous(dout_in, "dout");
  check_last_dim_contiguous(out, "out");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, "lse must be float32, got ", lse_in.scalar_type());
  FASTATTN_CHECK_SHAPE(lse_in, s.batch, s.heads_q, s.seqlen_q);

  if (p.use_block_lists) {
    const int64_t nqb = ceil_div(s.seqlen_q, block_size_q), nkb = ceil_div(s.seqlen_k, block_size_k);
    p.kv_lists = make_lists(q, s, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, nqb, nkb,
                            "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices");
    p.q_lists = make_lists(q, s, q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, nkb, nqb,
                           "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices");
  } else {
    TORCH_CHECK(!kv_num_blocks.has_value() && !full_kv_num_blocks.has_value() && !q_num_blocks.has_value() &&
                    !full_q_num_blocks.has_value(),
                "block lists were given without block_size_q/block_size_k");
  }

  // dout is read with 16-byte row loads; lse and delta are indexed densely (B * Hq * Lq floats).
  const at::Tensor dout = rows_aligned(dout_in);
  const at::Tensor lse = lse_in.contiguous();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({s.batch, s.heads_q, s.seqlen_q}, f32);
  // dQ: summed in float32 into an accumulator the delta kernel zeroes (by atomics, or in the
  // deterministic mode in key-block order, counted per query tile in `semaphore`: B * Hq * Lq / 16
  // int32 at D = 128), then rounded once into dq.
  // dq, dk, dv have q's, k's and v's memory layouts (empty_like), as the ops' shared fake
  // (fastattn/ops.py bwd_fake) promises: torch.compile trusts those strides. (Their rows are
  // 16-byte aligned: a layout empty_like keeps is dense with a unit last stride.)
  at::Tensor dq_accum = at::empty({s.batch, s.heads_q, s.seqlen_q, s.head_dim}, f32);
  at::Tensor semaphore;
  if (deterministic) {
    const int64_t tile = bwd_block_m(static_cast<int>(s.head_dim), true);
    const int64_t query_tiles = ceil_div(s.seqlen_q, tile);
    semaphore = at::zeros({s.batch, s.heads_q, query_tiles}, q.options().dtype(at::kInt));
    p.dq_semaphore = semaphore.data_ptr<int>();
  }
  at::Tensor dq = at::empty_like(q);
  // dK, dV: one slice per query head (a CTA per key block and query head); a GQA group's slices
  // go to (B, Hq, Lk, D) buffers and are summed below, in float32 and a fixed order.
  at::Tensor rank_prefix;
  if (deterministic && p.use_block_lists) {
    rank_prefix = dq_rank_prefix(*kv_num_blocks, *kv_indices, *full_kv_num_blocks, *full_kv_indices, *q_num_blocks,
                                 *q_indices, *full_q_num_blocks, *full_q_indices);
    p.dq_rank_prefix = rank_prefix.data_ptr<int>();
    for (int d = 0; d < 3; ++d) p.dq_rank_prefix_stride[d] = broadcast_stride(rank_prefix, d);
  }
  const bool grouped = s.heads_q != s.heads_kv;
  at::Tensor dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor dk_heads = grouped ? at::empty({s.batch, s.heads_q, s.seqlen_k, s.head_dim}, q.options()) : dk;
  at::Tensor dv_heads = grouped ? at::empty({s.batch, s.heads_q, s.seqlen_k, s.head_dim}, q.options()) : dv;
  // dbias is accumulated in float32 in the mask's own broadcast shape (size 1 where the mask has
  // stride 0 or size 1): a (B, 1, 1, Lk) padding mask needs B * Lk floats, not B * Hq * Lq * Lk,
  // summed by float atomics. Atomics add in a varying order, so in the deterministic mode a
  // broadcast mask's gradient is written once per (b, h, i, j) into a dense float32 scratch instead
  // and summed over the broadcast dimensions by torch (a fixed order; B * Hq * Lq * Lk * 4 bytes,
  // in that mode only). Every pair the kernels skip has a zero gradient, hence zeros, not empty.
  at::Tensor dbias = q.new_empty({0});
  std::vector<int64_t> reduced(4);
  bool broadcast_any = false, dense_scratch = false;
  if (compute_dbias) {
    const std::vector<int64_t> full{s.batch, s.heads_q, s.seqlen_q, s.seqlen_k};
    for (int d = 0; d < 4; ++d) {
      const bool broadcast = attn_mask->size(d) == 1 || attn_mask->stride(d) == 0;
      reduced[d] = broadcast ? 1 : full[d];
      broadcast_any = broadcast_any || reduced[d] != full[d];
    }
    dense_scratch = broadcast_any && deterministic;
    p.dbias_reduced = broadcast_any && !deterministic;
    dbias = at::zeros(dense_scratch ? full : reduced, f32);
    for (int d = 0; d < 4; ++d) p.dbias_stride[d] = dbias.size(d) == 1 ? 0 : dbias.stride(d);
    p.dbias = dbias.data_ptr<float>();
  }
  p.out = const_cast<void*>(out.data_ptr());
  set_strides(p.out_stride, out);
  p.dout = dout.data_ptr();
  set_strides(p.dout_stride, dout);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk = dk_heads.data_ptr();
  p.dv = dv_heads.data_ptr();
  set_strides(p.dk_stride, dk_heads);
  set_strides(p.dv_stride, dv_heads);

  const int64_t rows = s.batch * s.heads_q * s.seqlen_q;
  // An additive mask can put every visible score of a row near -3.4e38 (finfo.min) or -1e9, where
  // float32 lse = m + log l has lost log l and P = exp(s - lse) would be wrong (kHugeLse in
  // attention_kernels.cuh). The forward kernel first recomputes (m, 1 / l) of those rows (a CTA
  // without such a row returns after reading its lse); the backward then takes m as their shift
  // (the others keep lse) and dO / l, rounded to the input dtype once by the delta kernel, as dO:
  // P' = l P, so P' dO' and P' (dP' - delta') are the true products and its loops are unchanged.
  const bool additive = p.mask_kind != kNoMask && p.mask_kind != kBoolMask;
  at::Tensor shift, factor, dout_scaled;
  if (additive && rows > 0) {
    shift = lse.clone();
    factor = at::ones_like(lse);
    dout_scaled = at::empty(q_shape, dout.options());
    AttentionParams stats_params = p;
    stats_params.row_shift = shift.data_ptr<float>();
    stats_params.row_factor = factor.data_ptr<float>();
    attention_fwd_row_stats(stats_params, q.scalar_type(), s.head_dim);
    p.lse = shift.data_ptr<float>();
    p.row_factor = factor.data_ptr<float>();
    p.dout_scaled = dout_scaled.data_ptr();
  }
  const dim3 delta_grid(static_cast<unsigned>(ceil_div(rows, kWarps)));
  FASTATTN_CUDA_DISPATCH(q.scalar_type(), s.head_dim, [&] {
    if (rows > 0) {
      attention_bwd_delta_kernel<T><<<delta_grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p, kHeadDim);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (p.dout_scaled != nullptr) {
      p.dout = p.dout_scaled;
      set_strides(p.dout_stride, dout_scaled);
    }
    dispatch_bwd<T, kHeadDim>(p, deterministic);
  });
  dq.copy_(dq_accum);
  if (grouped) {
    const std::vector<int64_t> group_shape{s.batch, s.heads_kv, s.heads_q / s.heads_kv, s.seqlen_k, s.head_dim};
    dk.copy_(at::sum(dk_heads.view(group_shape), {2}, false, at::kFloat));
    dv.copy_(at::sum(dv_heads.view(group_shape), {2}, false, at::kFloat));
  }
  if (!compute_dbias) return {dq, dk, dv, dbias};
  if (dense_scratch) dbias = dbias.sum_to_size(reduced);
  // The mask's own shape (fastattn/ops.py, dbias_shape), rounded once to the mask's dtype.
  return {dq, dk, dv, dbias.to(attn_mask->scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) { m.impl("attention_bwd", TORCH_FN(fastattn::cuda::attention_bwd_cuda)); }
