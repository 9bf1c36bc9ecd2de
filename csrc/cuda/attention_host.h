// Host side shared by the sm80 kernels' forward and backward ops: AttentionParams from checked
// tensors (the checks are attention_checks.h's, shared with the Hopper op), the dtype / head-dim
// switch and the launch helper.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "attention_checks.h"
#include "attention_kernels.cuh"

namespace fastattn {
namespace cuda {

// Tiles of the shipped kernels (see docs/cuda-kernels.md); a BlockMask's block sizes must be
// multiples of kMaskTileMultiple so that every kernel tile lies inside one mask block.
constexpr int kMaskTileMultiple = 64;

// The one switch over the instantiated dtypes and head dims (flash-attention's static_switch).
#define FASTATTN_CUDA_DISPATCH(DTYPE, HEAD_DIM, ...)                   \
  [&] {                                                               \
    if ((DTYPE) == at::kHalf) {                                       \
      using T = __half;                                               \
      if ((HEAD_DIM) == 64) {                                         \
        constexpr int kHeadDim = 64;                                  \
        return __VA_ARGS__();                                         \
      } else {                                                        \
        constexpr int kHeadDim = 128;                                 \
        return __VA_ARGS__();                                         \
      }                                                               \
    } else {                                                          \
      using T = __nv_bfloat16;                                        \
      if ((HEAD_DIM) == 64) {                                         \
        constexpr int kHeadDim = 64;                                  \
        return __VA_ARGS__();                                         \
      } else {                                                        \
        constexpr int kHeadDim = 128;                                 \
        return __VA_ARGS__();                                         \
      }                                                               \
    }                                                                 \
  }()

// A runtime bool as a constexpr one (flash-attention's BOOL_SWITCH).
#define FASTATTN_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                       \
    if (COND) {                               \
      constexpr bool NAME = true;             \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr bool NAME = false;            \
      return __VA_ARGS__();                   \
    }                                         \
  }()

// Launches `kernel` with `threads` threads and `smem` bytes of dynamic shared memory on the
// current stream, opting in to more than 48 KiB where needed, and checks the launch.
template <typename Kernel>
inline void launch(Kernel kernel, dim3 grid, int threads, int smem, const AttentionParams& p) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (smem > 48 * 1024) {
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(static_cast<size_t>(smem) <= prop->sharedMemPerBlockOptin, "fastattn CUDA kernel needs ", smem,
                " bytes of shared memory per block, the device offers ", prop->sharedMemPerBlockOptin);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  kernel<<<grid, threads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernels read rows with 16-byte loads. A tensor whose rows are not 16-byte aligned (an
// offset view, an odd row stride) is copied once into a fresh contiguous buffer -- the only copy.
inline at::Tensor rows_aligned(const at::Tensor& t) {
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 &&
                       t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

inline void set_strides(int64_t out[3], const at::Tensor& t) {
  for (int d = 0; d < 3; ++d) out[d] = t.stride(d);
}

// The backward's row-statistics pass (attention_fwd.cu; AttentionParams::row_shift).
void attention_fwd_row_stats(const AttentionParams& p, at::ScalarType dtype, int64_t head_dim);

// The inputs of one call, checked, with the tensors the kernels read kept alive.
struct PreparedInputs {
  at::Tensor q, k, v, key_lengths, query_lengths;
  AttentionShape shape;
  AttentionParams params;
};

inline PreparedInputs prepare(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                              const std::optional<at::Tensor>& attn_mask,
                              const std::optional<at::Tensor>& alibi_slopes,
                              const std::optional<at::Tensor>& key_lengths,
                              const std::optional<at::Tensor>& query_lengths, int64_t block_size_q,
                              int64_t block_size_k, double scale, std::optional<int64_t> window_left,
                              std::optional<int64_t> window_right, double softcap, double dropout_p) {
  const AttentionShape s = check_cuda_inputs(q_in, k_in, v_in, attn_mask, alibi_slopes, key_lengths, query_lengths,
                                             scale, softcap, dropout_p);

  PreparedInputs in;
  in.shape = s;
  // Each tensor the kernels read with 16-byte loads must have aligned rows.
  in.q = rows_aligned(q_in);
  in.k = rows_aligned(k_in);
  in.v = rows_aligned(v_in);
  AttentionParams& p = in.params;
  p.q = in.q.data_ptr();
  p.k = in.k.data_ptr();
  p.v = in.v.data_ptr();
  set_strides(p.q_stride, in.q);
  set_strides(p.k_stride, in.k);
  set_strides(p.v_stride, in.v);
  p.batch = static_cast<int>(s.batch);
  p.heads_q = static_cast<int>(s.heads_q);
  p.heads_kv = static_cast<int>(s.heads_kv);
  p.group = static_cast<int>(s.heads_q / s.heads_kv);
  p.seqlen_q = static_cast<int>(s.seqlen_q);
  p.seqlen_k = static_cast<int>(s.seqlen_k);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.inv_softcap = softcap > 0.0 ? static_cast<float>(1.0 / softcap) : 0.f;
  // |i + offset - j| <= Lq + Lk, so clamping a window to that range changes no visibility.
  const int64_t limit = s.seqlen_q + s.seqlen_k + 1;
  p.has_window_left = window_left.has_value();
  p.has_window_right = window_right.has_value();
  p.window_left = static_cast<int>(std::clamp<int64_t>(window_left.value_or(0), -limit, limit));
  p.window_right = static_cast<int>(std::clamp<int64_t>(window_right.value_or(0), -limit, limit));
  // Both edges with left + right < 0: every row's band is empty. The tile bookkeeping assumes bands
  // that are not (the tiles a band touches from either side agree only then, and the deterministic
  // backward's dQ order, dq_rank, relies on it), so such a window becomes one that starts past every
  // key: the same visibility (none), and no tile is visited.
  if (p.has_window_left && p.has_window_right && p.window_left + p.window_right < 0) {
    p.window_left = static_cast<int>(-limit);
    p.window_right = 0;
  }
  // Lengths are (B,) int32; a strided view is copied (B integers) so the kernels index them densely.
  if (key_lengths.has_value()) {
    in.key_lengths = key_lengths->contiguous();
    p.key_lengths = in.key_lengths.data_ptr<int>();
  }
  if (query_lengths.has_value()) {
    in.query_lengths = query_lengths->contiguous();
    p.query_lengths = in.query_lengths.data_ptr<int>();
  }
  if (alibi_slopes.has_value()) {
    p.alibi = alibi_slopes->data_ptr<float>();
    p.alibi_stride[0] = broadcast_stride(*alibi_slopes, 0);
    p.alibi_stride[1] = broadcast_stride(*alibi_slopes, 1);
  }
  if (attn_mask.has_value()) {
    const auto t = attn_mask->scalar_type();
    p.mask = attn_mask->data_ptr();
    p.mask_kind = t == at::kBool ? kBoolMask : t == at::kHalf ? kHalfMask : t == at::kBFloat16 ? kBFloat16Mask : kFloatMask;
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = broadcast_stride(*attn_mask, d);
  }
  if (block_size_q > 0 || block_size_k > 0) {
    TORCH_CHECK(block_size_q > 0 && block_size_k > 0 && block_size_q % kMaskTileMultiple == 0 &&
                    block_size_k % kMaskTileMultiple == 0,
                "the CUDA kernels need BlockMask block sizes that are multiples of ", kMaskTileMultiple,
                ", got (block_size_q, block_size_k) = (", block_size_q, ", ", block_size_k, ")");
    p.use_block_lists = true;
    p.mask_block_q = static_cast<int>(block_size_q);
    p.mask_block_k = static_cast<int>(block_size_k);
  }
  return in;
}

}  // namespace cuda
}  // namespace fastattn
