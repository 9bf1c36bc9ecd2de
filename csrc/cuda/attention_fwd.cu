// fastattn::attention_fwd for CUDA tensors: checks, launch of attention_fwd_kernel.
#include "attention_host.h"

namespace fastattn {
namespace cuda {
namespace {

constexpr int kFwdBlockM = 64;  // query rows per CTA (16 per warp)
constexpr int kFwdBlockN = 64;  // keys per tile

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& query_lengths, const std::optional<at::Tensor>& kv_num_blocks,
    const std::optional<at::Tensor>& kv_indices, const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, const std::optional<at::Tensor>& partial_masks,
    const std::optional<at::Tensor>& partial_tile_ids, int64_t block_size_q, int64_t block_size_k, double scale,
    std::optional<int64_t> window_left, std::optional<int64_t> window_right, double softcap, double dropout_p,
    int64_t seed) {
  (void)seed;  // dropout is refused in prepare()
  TORCH_CHECK(!partial_masks.has_value() && !partial_tile_ids.has_value(),
              "partial_masks is not supported by the CUDA kernels: pass the element mask as attn_mask");
  const at::cuda::CUDAGuard device_guard(q.device());
  PreparedInputs in = prepare(q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths, block_size_q,
                              block_size_k, scale, window_left, window_right, softcap, dropout_p);
  const AttentionShape& s = in.shape;
  AttentionParams& p = in.params;
  if (p.use_block_lists) {
    p.kv_lists = make_lists(q, s, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                            ceil_div(s.seqlen_q, block_size_q), ceil_div(s.seqlen_k, block_size_k), "kv_num_blocks",
                            "kv_indices", "full_kv_num_blocks", "full_kv_indices");
  } else {
    TORCH_CHECK(!kv_num_blocks.has_value() && !full_kv_num_blocks.has_value(),
                "block lists were given without block_size_q/block_size_k");
  }

  at::Tensor out = at::empty({s.batch, s.heads_q, s.seqlen_q, s.head_dim}, q.options());
  at::Tensor lse = at::empty({s.batch, s.heads_q, s.seqlen_q}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  set_strides(p.out_stride, out);
  p.lse = lse.data_ptr<float>();

  const dim3 grid(static_cast<unsigned>(ceil_div(s.seqlen_q, kFwdBlockM)), static_cast<unsigned>(s.heads_q),
                  static_cast<unsigned>(s.batch));
  FASTATTN_CUDA_DISPATCH(q.scalar_type(), s.head_dim, [&] {
    const int smem = (kFwdBlockM + 2 * kFwdBlockN) * (kHeadDim + 8) * static_cast<int>(sizeof(T));
    launch(attention_fwd_kernel<T, kHeadDim, kFwdBlockM, kFwdBlockN>, grid, smem, p);
  });
  return {out, lse};
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) { m.impl("attention_fwd", TORCH_FN(fastattn::cuda::attention_fwd_cuda)); }
