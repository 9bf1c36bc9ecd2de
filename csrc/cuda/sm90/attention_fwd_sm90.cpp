// fastattn::attention_fwd_sm90 for CUDA tensors: the CUDA backend's forward when the extension
// was built with the Hopper kernel. A call the Hopper kernel covers (an sm_90 device, fp16/bf16,
// head dim 64 or 128, no mask / bias / lengths / softcap / dropout / window other than causal,
// GQA allowed) runs attention_fwd_sm90_kernel.cu; every other call goes on to the sm80 kernels
// (fastattn::attention_fwd), which check and serve it. fastattn/backends/cuda.py (sm90_reasons)
// states the same rule for `fastattn info`; keep the two in step.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
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

// Whether the Hopper kernel serves this call (the rule of the file comment).
bool hopper_serves(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool has_optional_tensor,
                   int64_t block_size_q, double scale, std::optional<int64_t> window_left,
                   std::optional<int64_t> window_right, double softcap, double dropout_p) {
  if (!q.is_cuda() || q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return false;
  const auto* prop = at::cuda::getDeviceProperties(q.device().index());
  if (prop->major != 9 || prop->minor != 0) return false;
  const auto dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (k.scalar_type() != dtype || v.scalar_type() != dtype) return false;
  const int64_t d = q.size(3);
  if ((d != 64 && d != 128) || k.size(3) != d || v.size(3) != d) return false;
  if (q.size(2) == 0 || k.size(2) == 0) return false;  // a TMA descriptor needs non-empty extents
  const bool causal = !window_left.has_value() && window_right.has_value() && *window_right == 0;
  const bool unbounded = !window_left.has_value() && !window_right.has_value();
  return !has_optional_tensor && block_size_q == 0 && (causal || unbounded) && softcap == 0.0 && dropout_p == 0.0 &&
         scale > 0.0;
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
  const bool has_optional_tensor = attn_mask || alibi_slopes || key_lengths || query_lengths || kv_num_blocks ||
                                   kv_indices || full_kv_num_blocks || full_kv_indices || partial_masks ||
                                   partial_tile_ids;
  if (!hopper_serves(q, k, v, has_optional_tensor, block_size_q, scale, window_left, window_right, softcap,
                     dropout_p)) {
    static auto sm80 =
        c10::Dispatcher::singleton().findSchemaOrThrow("fastattn::attention_fwd", "").typed<FwdSignature>();
    return sm80.call(q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths, kv_num_blocks, kv_indices,
                     full_kv_num_blocks, full_kv_indices, partial_masks, partial_tile_ids, block_size_q, block_size_k,
                     scale, window_left, window_right, softcap, dropout_p, seed);
  }
  const AttentionShape s = check_qkv(q, k, v);  // names the argument that is wrong
  TORCH_CHECK(s.seqlen_q < (int64_t{1} << 31) && s.seqlen_k < (int64_t{1} << 31),
              "seqlen_q and seqlen_k must be below 2^31 for the Hopper kernel, got ", s.seqlen_q, " and ", s.seqlen_k);
  TORCH_CHECK(s.batch <= 65535 && s.heads_q <= 65535, "batch and heads (q.size(0), q.size(1)) must be at most 65535, got ",
              s.batch, " and ", s.heads_q);
  const at::cuda::CUDAGuard device_guard(q.device());
  const int smem = fwd_smem_bytes(static_cast<int>(s.head_dim));
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(static_cast<size_t>(smem) <= prop->sharedMemPerBlockOptin, "the Hopper attention kernel needs ", smem,
              " bytes of shared memory per block, the device offers ", prop->sharedMemPerBlockOptin);

  const at::Tensor q_ready = tma_ready(q);
  const at::Tensor k_ready = tma_ready(k);
  const at::Tensor v_ready = tma_ready(v);
  at::Tensor out = at::empty({s.batch, s.heads_q, s.seqlen_q, s.head_dim}, q.options());
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
  const bool causal = window_right.has_value();  // hopper_serves admits only right == 0 then
  const DType dtype = q.scalar_type() == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
  const cudaError_t err =
      run_fwd(args, dtype, static_cast<int>(s.head_dim), causal, at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "the Hopper attention kernel failed to launch: ", cudaGetErrorString(err));
  return {out, lse};
}

}  // namespace
}  // namespace sm90
}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("attention_fwd_sm90", TORCH_FN(fastattn::cuda::sm90::attention_fwd_sm90_cuda));
}
