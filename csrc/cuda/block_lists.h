// A BlockMask's tile lists as the CUDA kernels read them, shared by the sm80 kernels
// (attention_kernels.cuh) and the Hopper forward (sm90/attention_fwd_sm90.h). Plain data, no torch
// and no device code: host-only translation units and the kernels' own builds include it.
#pragma once

#include <stdint.h>

namespace fastattn {
namespace cuda {

// One direction's lists (fastattn/block_mask.py): counts (B|1, H|1, rows) and indices
// (B|1, H|1, rows, cols), int32, strides in elements with 0 on broadcast dimensions. `num` is null
// when the call has no BlockMask. Built by make_lists (attention_checks.h).
struct BlockLists {
  const int* num = nullptr;
  const int* idx = nullptr;
  const int* full_num = nullptr;
  const int* full_idx = nullptr;
  int64_t num_stride[3] = {0, 0, 0};
  int64_t idx_stride[4] = {0, 0, 0, 0};
  int64_t full_num_stride[3] = {0, 0, 0};
  int64_t full_idx_stride[4] = {0, 0, 0, 0};
  int cols = 0;  // entries per row of idx
};

}  // namespace cuda
}  // namespace fastattn
