// Host side shared by every CUDA attention op -- the sm80 kernels' ops (attention_fwd.cu,
// attention_bwd.cu, through attention_host.h) and the Hopper forward (sm90/attention_fwd_sm90.cpp):
// the input checks, BlockMask lists, the output allocation, and the sm80 forward's follow-up launch
// that the Hopper op calls. Host code only (no kernel headers), so plain C++ translation units
// include it too.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"
#include "block_lists.h"

namespace fastattn {
namespace cuda {

// Checks the inputs every CUDA attention kernel needs, naming the argument at fault (csrc/checks.h
// for the shapes and values every backend shares, then the CUDA kernels' own limits).
inline AttentionShape check_cuda_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const std::optional<at::Tensor>& attn_mask,
                                        const std::optional<at::Tensor>& alibi_slopes,
                                        const std::optional<at::Tensor>& key_lengths,
                                        const std::optional<at::Tensor>& query_lengths, double scale, double softcap,
                                        double dropout_p) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q must be float16 or bfloat16 for the CUDA kernels, got ", q.scalar_type());
  const AttentionShape s = check_qkv(q, k, v);
  check_optionals(s, q, attn_mask, alibi_slopes, key_lengths, query_lengths);
  check_scalars(scale, softcap, dropout_p);
  TORCH_CHECK(s.head_dim == 64 || s.head_dim == 128, "head_dim (q.size(-1)) must be 64 or 128 for the CUDA kernels, got ",
              s.head_dim);
  TORCH_CHECK(s.head_dim_v == s.head_dim, "v must have q's head_dim ", s.head_dim, " for the CUDA kernels, got ",
              s.head_dim_v);
  // Below 2^29: row + offset +- window stays within int32.
  TORCH_CHECK(s.seqlen_q < (int64_t{1} << 29) && s.seqlen_k < (int64_t{1} << 29),
              "seqlen_q and seqlen_k must be below 2^29 for the CUDA kernels, got ", s.seqlen_q, " and ", s.seqlen_k);
  TORCH_CHECK(s.batch <= 65535 && s.heads_q <= 65535,
              "batch and heads (q.size(0), q.size(1)) must be at most 65535 for the CUDA kernels, got ", s.batch,
              " and ", s.heads_q);
  TORCH_CHECK(dropout_p == 0.0, "dropout_p must be 0: the CUDA kernels do not implement dropout, got ", dropout_p);
  if (attn_mask.has_value()) {
    const auto t = attn_mask->scalar_type();
    TORCH_CHECK(t == at::kBool || t == at::kHalf || t == at::kBFloat16 || t == at::kFloat,
                "attn_mask must be bool, float16, bfloat16 or float32 for the CUDA kernels, got ", t);
  }
  return s;
}

// Strides of a (possibly broadcast) tensor, 0 on dimensions of size 1.
inline int64_t broadcast_stride(const at::Tensor& t, int d) { return t.size(d) == 1 ? 0 : t.stride(d); }

// A BlockMask list tensor broadcasts over batch and heads: (1 or B, 1 or Hq, ...).
inline void check_lists_broadcast(const std::optional<at::Tensor>& num, const AttentionShape& s, const char* name) {
  if (!num.has_value()) return;
  TORCH_CHECK((num->size(0) == 1 || num->size(0) == s.batch) && (num->size(1) == 1 || num->size(1) == s.heads_q),
              name, " must have (B, H) = (1 or ", s.batch, ", 1 or ", s.heads_q, "), got ", num->sizes());
}

// Checks one direction's four BlockMask list tensors (num and idx: (B|1, Hq|1, rows) and
// (B|1, Hq|1, rows, cols) int32 on q's device) and returns them as the kernels read them.
inline BlockLists make_lists(const at::Tensor& q, const AttentionShape& s, const std::optional<at::Tensor>& num,
                             const std::optional<at::Tensor>& idx, const std::optional<at::Tensor>& full_num,
                             const std::optional<at::Tensor>& full_idx, int64_t rows, int64_t cols,
                             const char* num_name, const char* idx_name, const char* full_num_name,
                             const char* full_idx_name) {
  check_block_lists(q, num, idx, rows, cols, num_name, idx_name);
  check_block_lists(q, full_num, full_idx, rows, cols, full_num_name, full_idx_name);
  TORCH_CHECK(num.has_value() && full_num.has_value(), num_name, " and ", full_num_name,
              " must be given together (a BlockMask passes both)");
  check_lists_broadcast(num, s, num_name);
  check_lists_broadcast(full_num, s, full_num_name);
  BlockLists l;
  l.num = num->data_ptr<int>();
  l.idx = idx->data_ptr<int>();
  l.full_num = full_num->data_ptr<int>();
  l.full_idx = full_idx->data_ptr<int>();
  for (int d = 0; d < 3; ++d) {
    l.num_stride[d] = broadcast_stride(*num, d);
    l.full_num_stride[d] = broadcast_stride(*full_num, d);
  }
  for (int d = 0; d < 4; ++d) {
    l.idx_stride[d] = broadcast_stride(*idx, d);
    l.full_idx_stride[d] = broadcast_stride(*full_idx, d);
  }
  l.cols = static_cast<int>(cols);
  return l;
}

// An empty out (B, Hq, Lq, Dv) in q's memory layout: (B, L, H, Dv) memory when q is a transposed
// (B, L, H, D) view, so a caller holding that layout needs no copy back; contiguous otherwise. The
// rule of fastattn/ops.py output_like_q, which the ops' fakes state and torch.compile trusts.
inline at::Tensor output_like_q(const at::Tensor& q, const AttentionShape& s) {
  if (s.heads_q > 1 && s.seqlen_q > 1 && q.stride(1) < q.stride(2)) {
    return at::empty({s.batch, s.seqlen_q, s.heads_q, s.head_dim_v}, q.options()).transpose(1, 2);
  }
  return at::empty({s.batch, s.heads_q, s.seqlen_q, s.head_dim_v}, q.options());
}

// The Hopper forward's follow-up (defined in attention_fwd.cu, called by sm90/attention_fwd_sm90.cpp):
// the sm80 forward recomputes, by selection, the 128-row blocks of `out` (and their lse) that hold a
// NaN/Inf. Same arguments as the Hopper call (no element mask, no dropout).
void attention_fwd_redo_nonfinite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& alibi_slopes,
                                  const std::optional<at::Tensor>& key_lengths,
                                  const std::optional<at::Tensor>& query_lengths,
                                  const std::optional<at::Tensor>& kv_num_blocks,
                                  const std::optional<at::Tensor>& kv_indices,
                                  const std::optional<at::Tensor>& full_kv_num_blocks,
                                  const std::optional<at::Tensor>& full_kv_indices, int64_t block_size_q,
                                  int64_t block_size_k, double scale, std::optional<int64_t> window_left,
                                  std::optional<int64_t> window_right, double softcap, const at::Tensor& out,
                                  const at::Tensor& lse);

}  // namespace cuda
}  // namespace fastattn
