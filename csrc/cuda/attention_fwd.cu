// fastattn::attention_fwd for CUDA tensors: checks, the choice of kernel instantiation, launch.
#include <string>
#include <utility>

#include "attention_host.h"

namespace fastattn {
namespace cuda {
namespace {

// Shared memory of a forward CTA: Q, then two stages of K and V, rows padded to D + 8.
template <typename T, class Tr>
constexpr int fwd_smem_bytes() {
  return (Tr::kBlockM + 4 * Tr::kBlockN) * (Tr::kHeadDim + 8) * static_cast<int>(sizeof(T));
}

template <typename T, class Tr>
void launch_fwd(const AttentionParams& p) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seqlen_q, Tr::kBlockM)), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  launch(attention_fwd_kernel<T, Tr>, grid, Tr::kThreads, fwd_smem_bytes<T, Tr>(), p);
}

// The instantiation for these parameters: features as template flags and 128-row tiles, except
// (the one generic 64 x 64 kernel) for block lists whose blocks are not multiples of those tiles,
// and for GPUs whose shared memory per block cannot hold them (sm_86/sm_89: 99 KiB < 102 KiB at D = 128).
template <typename T, int D>
void dispatch_fwd(const AttentionParams& p) {
  using Tiled = FwdTraits<D, false, false, false, 128>;
  const bool lists_fit =
      !p.use_block_lists || (p.mask_block_q % Tiled::kBlockM == 0 && p.mask_block_k % Tiled::kBlockN == 0);
  const bool smem_fits =
      static_cast<size_t>(fwd_smem_bytes<T, Tiled>()) <= at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  if (!lists_fit || !smem_fits) return launch_fwd<T, FwdTraits<D, true, true, true, 64>>(p);
  const bool window = p.has_window_left || p.has_window_right;
  // Raw dot-product units need scale > 0 (the row max of q.k is then the max of the scores); a
  // zero or negative scale takes the natural-unit (bias) kernels, as ALiBi and additive masks do.
  const bool bias = p.alibi != nullptr || (p.mask_kind != kNoMask && p.mask_kind != kBoolMask) || !(p.scale > 0.f);
  FASTATTN_BOOL_SWITCH(window, kWindow, [&] {
    FASTATTN_BOOL_SWITCH(p.softcap > 0.f, kSoftcap, [&] {
      FASTATTN_BOOL_SWITCH(bias, kBias, [&] { launch_fwd<T, FwdTraits<D, kWindow, kSoftcap, kBias, 128>>(p); });
    });
  });
}

// The forward. `into` (out, lse) given: they hold the Hopper forward's answer, and only the CTAs
// whose rows of out are non-finite compute theirs again (AttentionParams::redo_nonfinite).
std::tuple<at::Tensor, at::Tensor> run_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& query_lengths, const std::optional<at::Tensor>& kv_num_blocks,
    const std::optional<at::Tensor>& kv_indices, const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, const std::optional<at::Tensor>& partial_masks,
    const std::optional<at::Tensor>& partial_tile_ids, int64_t block_size_q, int64_t block_size_k, double scale,
    std::optional<int64_t> window_left, std::optional<int64_t> window_right, double softcap, double dropout_p,
    int64_t seed, const std::optional<std::pair<at::Tensor, at::Tensor>>& into = std::nullopt) {
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

  // In q's layout, as the op's fake (fastattn/ops.py output_like_q) says: torch.compile trusts the strides.
  at::Tensor out = into ? into->first : output_like_q(q, s);
  at::Tensor lse = into ? into->second : at::empty({s.batch, s.heads_q, s.seqlen_q}, q.options().dtype(at::kFloat));
  p.redo_nonfinite = into.has_value();
  p.out = out.data_ptr();
  set_strides(p.out_stride, out);
  p.lse = lse.data_ptr<float>();

  FASTATTN_CUDA_DISPATCH(q.scalar_type(), s.head_dim, [&] { dispatch_fwd<T, kHeadDim>(p); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& query_lengths, const std::optional<at::Tensor>& kv_num_blocks,
    const std::optional<at::Tensor>& kv_indices, const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, const std::optional<at::Tensor>& partial_masks,
    const std::optional<at::Tensor>& partial_tile_ids, int64_t block_size_q, int64_t block_size_k, double scale,
    std::optional<int64_t> window_left, std::optional<int64_t> window_right, double softcap, double dropout_p,
    int64_t seed) {
  return run_forward(q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths, kv_num_blocks, kv_indices,
                     full_kv_num_blocks, full_kv_indices, partial_masks, partial_tile_ids, block_size_q,
                     block_size_k, scale, window_left, window_right, softcap, dropout_p, seed);
}

}  // namespace

// The Hopper forward's follow-up (declared in attention_checks.h): its P V multiplies P = 0 by the
// V rows of a loaded tile that a row cannot see, so a NaN/Inf there makes the row non-finite. This
// launch reads `out` back and recomputes, by selection, the 128-row blocks that hold a NaN/Inf (the
// same grid as the forward; finite blocks return after one read of their rows).
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
                                  const at::Tensor& lse) {
  run_forward(q, k, v, std::nullopt, alibi_slopes, key_lengths, query_lengths, kv_num_blocks, kv_indices,
              full_kv_num_blocks, full_kv_indices, std::nullopt, std::nullopt, block_size_q, block_size_k, scale,
              window_left, window_right, softcap, 0.0, 0, std::make_pair(out, lse));
}

// The backward's row-statistics pass (AttentionParams::row_shift): the forward kernel these
// parameters select, with an additive mask (so a natural-unit, kBias, instantiation).
void attention_fwd_row_stats(const AttentionParams& p, at::ScalarType dtype, int64_t head_dim) {
  TORCH_CHECK(p.row_shift != nullptr && p.row_factor != nullptr && p.mask_kind != kNoMask &&
                  p.mask_kind != kBoolMask,
              "the row-statistics pass needs its outputs and an additive attn_mask");
  FASTATTN_CUDA_DISPATCH(dtype, head_dim, [&] { dispatch_fwd<T, kHeadDim>(p); });
}

// Why this extension's kernels cannot run on `device` (nullptr when they can): a GPU newer than the
// architectures it was built for (TORCH_CUDA_ARCH_LIST, default 8.0;9.0a) has no kernel image, and
// cudaFuncGetAttributes says so before any launch would fail. Called from fastattn._C.
const char* kernel_image_error(int device) {
  // Plain runtime calls, no c10 guard: nothing here may throw into the Python C API caller.
  static thread_local std::string message;
  int previous = -1;
  cudaError_t err = cudaGetDevice(&previous);
  if (err == cudaSuccess) err = cudaSetDevice(device);
  if (err == cudaSuccess) {
    cudaFuncAttributes attributes;
    err = cudaFuncGetAttributes(&attributes, attention_fwd_kernel<__half, FwdTraits<64, false, false, false, 128>>);
    (void)cudaSetDevice(previous);
  }
  if (err == cudaSuccess) return nullptr;
  (void)cudaGetLastError();  // a non-sticky error: clear it so later calls do not see it
  message = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  return message.c_str();
}

}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) { m.impl("attention_fwd", TORCH_FN(fastattn::cuda::attention_fwd_cuda)); }
