// fastattn::attention_fwd_sm90 for CUDA tensors: the CUDA backend's forward when the extension
// was built with the Hopper kernel. A call the Hopper kernel covers (an sm_90 device, fp16/bf16,
// head dim 64 or 128, scale > 0, no attn_mask / partial_masks / dropout; causal, any window,
// ALiBi, softcap, lengths, GQA and BlockMask tile lists with blocks that are multiples of 128 all
// allowed) runs attention_fwd_sm90_kernel.cu; every other call goes on to the sm80 kernels
// (fastattn::attention_fwd), which check and serve it. fastattn/backends/cuda.py (hopper_reasons)
// states the same rule for `fastattn info`; keep the two in step.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "cuda/attention_checks.h"
#include "cuda/sm90/attention_fwd_sm90.h"

namespace fastattn {
namespace cuda {
namespace sm90 {
namespace {

using OptTensor = std::optional<at::Tensor>;
using FwdSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, int64_t, int64_t, double, std::optional<int64_t>, std::optional<int64_t>, double, double, int64_t);

// The tile both sides of a BlockMask block must be a multiple of (kBlockM = kBlockN = 128).
constexpr int64_t kTile = 128;

// Whether the Hopper kernel serves this call (the rule of the file comment).
bool hopper_serves(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool has_element_mask,
                   bool has_lists, int64_t block_size_q, int64_t block_size_k, double scale, double dropout_p) {
  if (!q.is_cuda() || q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return false;
  const auto* prop = at::cuda::getDeviceProperties(q.device().index());
  if (prop->major != 9 || prop->minor != 0) return false;
  const auto dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (k.scalar_type() != dtype || v.scalar_type() != dtype) return false;
  const int64_t d = q.size(3);
  if ((d != 64 && d != 128) || k.size(3) != d || v.size(3) != d) return false;
  if (q.size(2) == 0 || k.size(2) == 0) return false;  // a TMA descriptor needs non-empty extents
  if (has_lists && (block_size_q <= 0 || block_size_k <= 0 || block_size_q % kTile || block_size_k % kTile)) {
    return false;
  }
  return !has_element_mask && dropout_p == 0.0 && scale > 0.0;
}

// TMA reads rows through a descriptor whose base must be 16-byte aligned and whose strides must
// be positive multiples of 16 bytes. A tensor that breaks this (an offset view, an odd or
// broadcast stride) is copied once into a contiguous buffer -- the only copy.
at::Tensor tma_ready(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(3) == 1;
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) == 1 || (t.stride(d) > 0 && t.stride(d) % 8 == 0));
  return ok ? t : t.contiguous();
}

// Strides (batch, head, row) for the descriptor; a dimension of size 1 is never stepped along, so
// any valid stride (16 bytes) stands in for whatever it had.
void tma_strides(int64_t out[3], const at::Tensor& t) {
  for (int d = 0; d < 3; ++d) out[d] = t.size(d) == 1 ? 8 : t.stride(d);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_sm90_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& attn_mask,
    const OptTensor& alibi_slopes, const OptTensor& key_lengths, const OptTensor& query_lengths,
    const OptTensor& kv_num_blocks, const OptTensor& kv_indices, const OptTensor& full_kv_num_blocks,
    const OptTensor& full_kv_indices, const OptTensor& partial_masks, const OptTensor& partial_tile_ids,
    int64_t block_size_q, int64_t block_size_k, double scale, std::optional<int64_t> window_left,
    std::optional<int64_t> window_right, double softcap, double dropout_p, int64_t seed) {
  const bool has_lists = kv_num_blocks || kv_indices || full_kv_num_blocks || full_kv_indices;
  if (!hopper_serves(q, k, v, attn_mask || partial_masks || partial_tile_ids, has_lists, block_size_q, block_size_k,
                     scale, dropout_p)) {
    static auto sm80 =
        c10::Dispatcher::singleton().findSchemaOrThrow("fastattn::attention_fwd", "").typed<FwdSignature>();
    return sm80.call(q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths, kv_num_blocks, kv_indices,
                     full_kv_num_blocks, full_kv_indices, partial_masks, partial_tile_ids, block_size_q, block_size_k,
                     scale, window_left, window_right, softcap, dropout_p, seed);
  }
  // The sm80 ops' checks (one copy, attention_checks.h), each naming the argument that is wrong.
  const AttentionShape s = check_cuda_inputs(q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths, scale,
                                             softcap, dropout_p);
  const at::cuda::CUDAGuard device_guard(q.device());
  const int smem = fwd_smem_bytes(static_cast<int>(s.head_dim));
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(static_cast<size_t>(smem) <= prop->sharedMemPerBlockOptin, "the Hopper attention kernel needs ", smem,
              " bytes of shared memory per block, the device offers ", prop->sharedMemPerBlockOptin);

  const at::Tensor q_ready = tma_ready(q);
  const at::Tensor k_ready = tma_ready(k);
  const at::Tensor v_ready = tma_ready(v);
  at::Tensor out = output_like_q(q, s);  // q's layout, as the op's fake (fastattn/ops.py) says
  at::Tensor lse = at::empty({s.batch, s.heads_q, s.seqlen_q}, q.options().dtype(at::kFloat));

  FwdArgs args{};
  args.q = q_ready.data_ptr();
  args.k = k_ready.data_ptr();
  args.v = v_ready.data_ptr();
  args.out = out.data_ptr();
  args.lse = lse.data_ptr<float>();
  tma_strides(args.q_stride, q_ready);
  tma_strides(args.k_stride, k_ready);
  tma_strides(args.v_stride, v_ready);
  for (int d = 0; d < 3; ++d) args.out_stride[d] = out.stride(d);
  args.batch = static_cast<int>(s.batch);
  args.heads_q = static_cast<int>(s.heads_q);
  args.heads_kv = static_cast<int>(s.heads_kv);
  args.seqlen_q = static_cast<int>(s.seqlen_q);
  args.seqlen_k = static_cast<int>(s.seqlen_k);
  args.scale = static_cast<float>(scale);
  // |i + offset - j| <= Lq + Lk, so clamping a window edge to that range changes no visibility.
  const int64_t limit = s.seqlen_q + s.seqlen_k + 1;
  args.has_window_left = window_left.has_value();
  args.has_window_right = window_right.has_value();
  args.window_left = static_cast<int>(std::clamp<int64_t>(window_left.value_or(0), -limit, limit));
  args.window_right = static_cast<int>(std::clamp<int64_t>(window_right.value_or(0), -limit, limit));
  args.softcap = static_cast<float>(softcap);
  if (alibi_slopes) {
    args.alibi = alibi_slopes->data_ptr<float>();
    args.alibi_stride[0] = broadcast_stride(*alibi_slopes, 0);
    args.alibi_stride[1] = broadcast_stride(*alibi_slopes, 1);
  }
  // Lengths are (B,) int32; a strided view is copied (B integers) so the kernel indexes them densely.
  const at::Tensor klens = key_lengths ? key_lengths->contiguous() : at::Tensor();
  const at::Tensor qlens = query_lengths ? query_lengths->contiguous() : at::Tensor();
  if (klens.defined()) args.key_lengths = klens.data_ptr<int>();
  if (qlens.defined()) args.query_lengths = qlens.data_ptr<int>();
  if (has_lists) {
    // Counts are clamped and indices outside the band skipped by the kernel.
    args.lists = make_lists(q, s, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                            ceil_div(s.seqlen_q, block_size_q), ceil_div(s.seqlen_k, block_size_k), "kv_num_blocks",
                            "kv_indices", "full_kv_num_blocks", "full_kv_indices");
    args.mask_block_q = static_cast<int>(block_size_q);
    args.mask_block_k = static_cast<int>(block_size_k);
  }
  const DType dtype = q.scalar_type() == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
  const cudaError_t err = run_fwd(args, dtype, static_cast<int>(s.head_dim), at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "the Hopper attention kernel failed to launch: ", cudaGetErrorString(err));
  // A NaN/Inf in a V row hidden from some rows of a loaded tile reaches them as 0 * NaN in P V:
  // the sm80 forward recomputes, by selection, the row blocks whose output is non-finite (given the
  // TMA-ready tensors, whose rows are aligned: no second copy of a misaligned input).
  attention_fwd_redo_nonfinite(q_ready, k_ready, v_ready, alibi_slopes, key_lengths, query_lengths, kv_num_blocks, kv_indices,
                               full_kv_num_blocks, full_kv_indices, block_size_q, block_size_k, scale, window_left,
                               window_right, softcap, out, lse);
  return {out, lse};
}

}  // namespace
}  // namespace sm90
}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("attention_fwd_sm90", TORCH_FN(fastattn::cuda::sm90::attention_fwd_sm90_cuda));
}
