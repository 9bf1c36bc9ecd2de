// The Hopper (sm_90a) forward's interface, free of torch so that the kernel file compiles on its
// own (tests/test_cuda_sm90.py builds it alone to read its SASS). The torch side is
// attention_fwd_sm90.cpp; the kernel, its TMA descriptors and the launch are in
// attention_fwd_sm90_kernel.cu. Design: docs/cuda-hopper.md.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastattn {
namespace cuda {
namespace sm90 {

// One forward call. q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D), out (B, Hq, Lq, D) with unit last
// stride; strides in elements as (batch, head, row). Every base pointer is 16-byte aligned and every
// stride a positive multiple of 8 elements (what the TMA descriptors need). lse is (B, Hq, Lq)
// float32, contiguous.
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
};

enum class DType { kFloat16, kBFloat16 };

// Shared memory (bytes) the kernel needs at this head dim; the caller checks it against the
// device's opt-in limit before launching.
int fwd_smem_bytes(int head_dim);

// Encodes the TMA descriptors and launches the kernel on `stream`; returns the launch's error
// (cudaErrorInvalidValue for a head dim that is not instantiated: 64 and 128 are).
cudaError_t run_fwd(const FwdArgs& args, DType dtype, int head_dim, bool causal, cudaStream_t stream);

}  // namespace sm90
}  // namespace cuda
}  // namespace fastattn
