// Input checks shared by the CPU and CUDA implementations of fastattn::attention_fwd/bwd.
// They mirror the Python validation (fastattn/_inputs.py) so that calling a raw op with bad
// input raises a c10::Error (a Python RuntimeError) naming the argument -- never a crash.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>

#define FASTATTN_CHECK_SHAPE(x, ...)                                                            \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              "), got ", (x).sizes())

namespace fastattn {

struct AttentionShape {
  int64_t batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v;
};

inline void check_same_device(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.device() == q.device(), name, " must be on q's device ", q.device(), ", got ", t.device());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have a unit stride in its last dimension, got strides ",
              t.strides());
}

// q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); returns the sizes.
inline AttentionShape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "q must be 4-D (batch, heads, seqlen, head_dim), got ", q.dim(), "-D");
  TORCH_CHECK(k.dim() == 4, "k must be 4-D (batch, heads, seqlen, head_dim), got ", k.dim(), "-D");
  TORCH_CHECK(v.dim() == 4, "v must be 4-D (batch, heads, seqlen, head_dim), got ", v.dim(), "-D");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have q's dtype ", q.scalar_type(), ", got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), "v must have q's dtype ", q.scalar_type(), ", got ", v.scalar_type());
  check_same_device(k, q, "k");
  check_same_device(v, q, "v");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  AttentionShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == s.batch && v.size(0) == s.batch, "k and v must have q's batch size ", s.batch);
  TORCH_CHECK(k.size(3) == s.head_dim, "k must have q's head_dim ", s.head_dim, ", got ", k.size(3));
  TORCH_CHECK(v.size(1) == s.heads_kv && v.size(2) == s.seqlen_k, "v must match k in heads and seqlen, got v ",
              v.sizes(), " and k ", k.sizes());
  TORCH_CHECK(s.heads_kv > 0 && s.heads_q % s.heads_kv == 0, "the number of query heads (", s.heads_q,
              ") must be a multiple of the number of key/value heads (", s.heads_kv, ")");
  return s;
}

// The optional tensors of the op schema: attn_mask (B, Hq, Lq, Lk) bool or float (any strides),
// alibi_slopes (B, Hq) float32, key_lengths/query_lengths (B,) int32.
inline void check_optionals(const AttentionShape& s, const at::Tensor& q, const std::optional<at::Tensor>& attn_mask,
                            const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& key_lengths,
                            const std::optional<at::Tensor>& query_lengths) {
  if (attn_mask.has_value()) {
    const auto& m = *attn_mask;
    check_same_device(m, q, "attn_mask");
    TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()),
                "attn_mask must be bool or floating, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 4 && m.size(0) == s.batch && m.size(1) == s.heads_q && m.size(2) == s.seqlen_q &&
                    m.size(3) == s.seqlen_k,
                "attn_mask must be expanded to (B, Hq, Lq, Lk) = (", s.batch, ", ", s.heads_q, ", ", s.seqlen_q, ", ",
                s.seqlen_k, "), got ", m.sizes());
  }
  if (alibi_slopes.has_value()) {
    const auto& a = *alibi_slopes;
    check_same_device(a, q, "alibi_slopes");
    TORCH_CHECK(a.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", a.scalar_type());
    TORCH_CHECK(a.dim() == 2 && a.size(0) == s.batch && a.size(1) == s.heads_q,
                "alibi_slopes must be expanded to (B, Hq) = (", s.batch, ", ", s.heads_q, "), got ", a.sizes());
  }
  for (auto [t, name] : {std::pair{&key_lengths, "key_lengths"}, std::pair{&query_lengths, "query_lengths"}}) {
    if (t->has_value()) {
      const auto& l = t->value();
      check_same_device(l, q, name);
      TORCH_CHECK(l.scalar_type() == at::kInt, name, " must be int32, got ", l.scalar_type());
      TORCH_CHECK(l.dim() == 1 && l.size(0) == s.batch, name, " must have shape (", s.batch, ",), got ", l.sizes());
    }
  }
}

// Block lists of a BlockMask: counts (B or 1, H or 1, n) and indices (B or 1, H or 1, n, m), int32.
inline void check_block_lists(const at::Tensor& q, const std::optional<at::Tensor>& num,
                              const std::optional<at::Tensor>& idx, int64_t rows, int64_t cols, const char* num_name,
                              const char* idx_name) {
  TORCH_CHECK(num.has_value() == idx.has_value(), num_name, " and ", idx_name, " must be given together");
  if (!num.has_value()) return;
  check_same_device(*num, q, num_name);
  check_same_device(*idx, q, idx_name);
  TORCH_CHECK(num->scalar_type() == at::kInt && idx->scalar_type() == at::kInt, num_name, " and ", idx_name,
              " must be int32");
  TORCH_CHECK(num->dim() == 3 && num->size(2) == rows, num_name, " must have shape (B, H, ", rows, "), got ",
              num->sizes());
  TORCH_CHECK(idx->dim() == 4 && idx->size(2) == rows && idx->size(3) == cols && idx->size(0) == num->size(0) &&
                  idx->size(1) == num->size(1),
              idx_name, " must have shape (B, H, ", rows, ", ", cols, "), got ", idx->sizes());
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scalars of the op schema: a finite scale, softcap >= 0, 0 <= dropout_p < 1.
inline void check_scalars(double scale, double softcap, double dropout_p) {
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "softcap must be finite and >= 0, got ", softcap);
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0 && dropout_p < 1, "dropout_p must lie in [0, 1), got ",
              dropout_p);
}

// Values of key_lengths / query_lengths in [0, max_len] (reads the values: a sync on a GPU).
inline void check_length_values(const std::optional<at::Tensor>& lengths, int64_t max_len, const char* name) {
  if (!lengths.has_value() || lengths->numel() == 0) return;
  const int64_t lo = lengths->min().item<int64_t>(), hi = lengths->max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi <= max_len, name, " must lie in [0, ", max_len, "], got values in [", lo, ", ", hi, "]");
}

// The block lists of a BlockMask (forward lists with rows = query blocks, cols = key blocks; the
// transposed lists the other way round): shapes broadcastable to (B, Hq), counts in [0, cols] and
// the first `count` indices of each row in [0, cols) (reads the values: a sync on a GPU).
inline void check_block_list_values(const AttentionShape& s, const at::Tensor& q, const std::optional<at::Tensor>& num,
                                    const std::optional<at::Tensor>& idx, int64_t rows, int64_t cols,
                                    const char* num_name, const char* idx_name) {
  check_block_lists(q, num, idx, rows, cols, num_name, idx_name);
  if (!num.has_value()) return;
  TORCH_CHECK((num->size(0) == 1 || num->size(0) == s.batch) && (num->size(1) == 1 || num->size(1) == s.heads_q),
              num_name, " must have (B, H) broadcastable to (", s.batch, ", ", s.heads_q, "), got ", num->sizes());
  if (num->numel() == 0) return;
  const int64_t lo = num->min().item<int64_t>(), hi = num->max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi <= cols, num_name, " must lie in [0, ", cols, "], got values in [", lo, ", ", hi, "]");
  if (idx->numel() == 0) return;
  const at::Tensor listed = at::arange(cols, idx->options()).lt(num->unsqueeze(-1));
  const at::Tensor outside = idx->lt(0).logical_or(idx->ge(cols)).logical_and(listed);
  TORCH_CHECK(!outside.any().item<bool>(), idx_name, " must hold block indices in [0, ", cols,
              ") in its first ", num_name, " entries of each row");
}

// All block-mask arguments of one op call. `transposed` are the backward's q lists (may be absent
// in the forward: pass nullopt). Block sizes must be positive when any list is given.
inline void check_block_mask_args(const AttentionShape& s, const at::Tensor& q,
                                  const std::optional<at::Tensor>& kv_num_blocks,
                                  const std::optional<at::Tensor>& kv_indices,
                                  const std::optional<at::Tensor>& full_kv_num_blocks,
                                  const std::optional<at::Tensor>& full_kv_indices,
                                  const std::optional<at::Tensor>& q_num_blocks,
                                  const std::optional<at::Tensor>& q_indices,
                                  const std::optional<at::Tensor>& full_q_num_blocks,
                                  const std::optional<at::Tensor>& full_q_indices, int64_t block_size_q,
                                  int64_t block_size_k) {
  const bool any = kv_num_blocks.has_value() || kv_indices.has_value() || full_kv_num_blocks.has_value() ||
                   full_kv_indices.has_value() || q_num_blocks.has_value() || q_indices.has_value() ||
                   full_q_num_blocks.has_value() || full_q_indices.has_value();
  if (!any) return;
  TORCH_CHECK(block_size_q > 0 && block_size_k > 0, "block_size_q and block_size_k must be > 0 with block lists, got ",
              block_size_q, " and ", block_size_k);
  const int64_t nq = ceil_div(s.seqlen_q, block_size_q), nk = ceil_div(s.seqlen_k, block_size_k);
  check_block_list_values(s, q, kv_num_blocks, kv_indices, nq, nk, "kv_num_blocks", "kv_indices");
  check_block_list_values(s, q, full_kv_num_blocks, full_kv_indices, nq, nk, "full_kv_num_blocks", "full_kv_indices");
  check_block_list_values(s, q, q_num_blocks, q_indices, nk, nq, "q_num_blocks", "q_indices");
  check_block_list_values(s, q, full_q_num_blocks, full_q_indices, nk, nq, "full_q_num_blocks", "full_q_indices");
}

// A BlockMask's per-tile element masks: partial_masks bool (n, block_size_q, block_size_k) contiguous
// and partial_tile_ids int32 (B|1, Hq|1, nQB, nKB) with values in [-1, n); only with block lists and
// without attn_mask (the two are alternative sources of the element mask).
inline void check_partial_masks(const AttentionShape& s, const at::Tensor& q, const std::optional<at::Tensor>& attn_mask,
                                const std::optional<at::Tensor>& partial_masks,
                                const std::optional<at::Tensor>& partial_tile_ids, bool has_block_lists,
                                int64_t block_size_q, int64_t block_size_k) {
  TORCH_CHECK(partial_masks.has_value() == partial_tile_ids.has_value(),
              "partial_masks and partial_tile_ids must be given together");
  if (!partial_masks.has_value()) return;
  TORCH_CHECK(has_block_lists, "partial_masks needs the block lists (kv_num_blocks, ...) of its BlockMask");
  TORCH_CHECK(!attn_mask.has_value(), "give attn_mask or partial_masks, not both");
  const at::Tensor& m = *partial_masks;
  const at::Tensor& ids = *partial_tile_ids;
  check_same_device(m, q, "partial_masks");
  check_same_device(ids, q, "partial_tile_ids");
  TORCH_CHECK(m.scalar_type() == at::kBool, "partial_masks must be bool, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 3 && m.size(1) == block_size_q && m.size(2) == block_size_k && m.is_contiguous(),
              "partial_masks must be contiguous with shape (n, block_size_q, block_size_k) = (n, ", block_size_q, ", ",
              block_size_k, "), got ", m.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kInt, "partial_tile_ids must be int32, got ", ids.scalar_type());
  const int64_t nq = ceil_div(s.seqlen_q, block_size_q), nk = ceil_div(s.seqlen_k, block_size_k);
  TORCH_CHECK(ids.dim() == 4 && (ids.size(0) == 1 || ids.size(0) == s.batch) &&
                  (ids.size(1) == 1 || ids.size(1) == s.heads_q) && ids.size(2) == nq && ids.size(3) == nk,
              "partial_tile_ids must have shape (B or 1, Hq or 1, nQB, nKB) with nQB = ", nq, ", nKB = ", nk, ", got ",
              ids.sizes());
  if (ids.numel() == 0) return;
  const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
  TORCH_CHECK(lo >= -1 && hi < m.size(0), "partial_tile_ids must lie in [-1, ", m.size(0), "), got values in [", lo,
              ", ", hi, "]");
}

// The backward's extra tensors: dout and out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) float32.
inline void check_backward_tensors(const AttentionShape& s, const at::Tensor& q, const at::Tensor& dout,
                                   const at::Tensor& out, const at::Tensor& lse) {
  for (auto [t, name] : {std::pair{&dout, "dout"}, std::pair{&out, "out"}}) {
    check_same_device(*t, q, name);
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
                t->scalar_type());
    TORCH_CHECK(t->dim() == 4 && t->size(0) == s.batch && t->size(1) == s.heads_q && t->size(2) == s.seqlen_q &&
                    t->size(3) == s.head_dim_v,
                name, " must have shape (B, Hq, Lq, Dv) = (", s.batch, ", ", s.heads_q, ", ", s.seqlen_q, ", ",
                s.head_dim_v, "), got ", t->sizes());
  }
  check_same_device(lse, q, "lse");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.batch && lse.size(1) == s.heads_q && lse.size(2) == s.seqlen_q,
              "lse must have shape (B, Hq, Lq) = (", s.batch, ", ", s.heads_q, ", ", s.seqlen_q, "), got ",
              lse.sizes());
}

// The backward's optional lse gradient: float32 (B, Hq, Lq) on q's device, any strides.
inline void check_dlse(const AttentionShape& s, const at::Tensor& q, const std::optional<at::Tensor>& dlse) {
  if (!dlse.has_value()) return;
  check_same_device(*dlse, q, "dlse");
  TORCH_CHECK(dlse->scalar_type() == at::kFloat, "dlse must be float32, got ", dlse->scalar_type());
  TORCH_CHECK(dlse->dim() == 3 && dlse->size(0) == s.batch && dlse->size(1) == s.heads_q && dlse->size(2) == s.seqlen_q,
              "dlse must have shape (B, Hq, Lq) = (", s.batch, ", ", s.heads_q, ", ", s.seqlen_q, "), got ",
              dlse->sizes());
}

}  // namespace fastattn
