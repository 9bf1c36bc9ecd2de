// Input checks shared by the CPU and CUDA implementations of fastattn::attention_fwd/bwd.
// They mirror the Python validation (fastattn/_inputs.py) so that calling a raw op with bad
// input raises a c10::Error (a Python RuntimeError) naming the argument -- never a crash.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

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

}  // namespace fastattn
