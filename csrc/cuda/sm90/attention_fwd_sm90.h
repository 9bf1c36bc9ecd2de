// The Hopper (sm_90a) forward's interface, free of torch so that the kernel file compiles on its
// own (tests/test_cuda_sm90.py builds it alone to read its SASS). The torch side is
// attention_fwd_sm90.cpp; the kernel, its TMA descriptors and the launch are in
// attention_fwd_sm90_kernel.cu. Design: docs/cuda-hopper.md.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../block_lists.h"

namespace fastattn {
namespace cuda {
namespace sm90 {

// One forward call. q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D), out (B, Hq, Lq, D) with unit last
// stride; strides in elements as (batch, head, row). Every base pointer is 16-byte aligned and every
// stride a positive multiple of 8 elements (what the TMA descriptors need). lse is (B, Hq, Lq)
// float32, contiguous. The optional features are off at their defaults; the launch picks the
// kernel instantiation from which are on (features_of).
struct FwdArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  int64_t q_stride[3];
  int64_t k_stride[3];
  int64_t v_stride[3];
  int64_t out_stride[3];
  int batch;
  int heads_q;
  int heads_kv;
  int seqlen_q;
  int seqlen_k;
  float scale;
  // Band (bottom-right aligned, query i sees key j iff i + off - left <= j <= i + off + right with
  // off = Lk - Lq per batch); an absent edge is unbounded. Causal is right = 0 without a left edge.
  // Edges are clamped to +-(Lq + Lk + 1) by the caller.
  bool has_window_left = false, has_window_right = false;
  int window_left = 0, window_right = 0;
  float softcap = 0.f;                 // > 0: softcap * tanh(score / softcap)
  const float* alibi = nullptr;        // (B, Hq) float32 or null: score -= slope * |i + off - j|
  int64_t alibi_stride[2] = {0, 0};
  const int* key_lengths = nullptr;    // (B,) int32, contiguous, or null
  const int* query_lengths = nullptr;  // (B,) int32, contiguous, or null
  // A BlockMask's forward lists (key blocks per query block; lists.num null: none) and its block
  // sizes, multiples of 128 (the tiles). The kernel visits only the listed key blocks (partial and
  // full alike: without an element mask, the band and the lengths are all that masks a partial tile).
  BlockLists lists;
  int mask_block_q = 0, mask_block_k = 0;
};

// The compile-time feature flags of a kernel instantiation (bits of its Traits).
enum Feature : int { kWindow = 1, kSoftcap = 2, kAlibi = 4, kLengths = 8, kBlockLists = 16 };

// The features a call uses, as Feature bits.
inline int features_of(const FwdArgs& a) {
  return ((a.has_window_left || a.has_window_right) ? kWindow : 0) | (a.softcap > 0.f ? kSoftcap : 0) |
         (a.alibi != nullptr ? kAlibi : 0) | ((a.key_lengths || a.query_lengths) ? kLengths : 0) |
         (a.lists.num != nullptr ? kBlockLists : 0);
}

enum class DType { kFloat16, kBFloat16 };

// Shared memory (bytes) the kernel needs at this head dim; the caller checks it against the
// device's opt-in limit before launching.
int fwd_smem_bytes(int head_dim);

// The feature sets compiled, per dtype and head dim. A call runs the first one that holds all its
// features: a flag that is on while its feature is off costs a little time, never a wrong result
// (no window edge, no lengths, no lists and a zero ALiBi slope are each the identity), except
// softcap, which is matched exactly. The plain and the window (causal) kernels are the lean ones;
// every other call runs the all-features kernel, with or without softcap. 16 kernels in all: each
// entry adds ~5 s of CPU to the sm_90a compile (docs/cuda-hopper.md).
constexpr int kGeneral = kWindow | kAlibi | kLengths | kBlockLists;
constexpr int kInstantiated[] = {0, kWindow, kGeneral, kGeneral | kSoftcap};

// The feature set of the instantiation that serves a call using `features`, -1 if none does.
constexpr int instantiation_for(int features) {
  for (int flags : kInstantiated) {
    if ((flags & features) == features && (flags & kSoftcap) == (features & kSoftcap)) return flags;
  }
  return -1;
}

// Encodes the TMA descriptors and launches the kernel on `stream`; returns the launch's error
// (cudaErrorInvalidValue for a head dim that is not instantiated: 64 and 128 are).
cudaError_t run_fwd(const FwdArgs& args, DType dtype, int head_dim, cudaStream_t stream);

}  // namespace sm90
}  // namespace cuda
}  // namespace fastattn
