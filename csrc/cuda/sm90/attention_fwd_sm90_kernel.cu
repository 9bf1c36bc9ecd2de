// The Hopper forward (sm_90a): warp-specialised, TMA loads completing on mbarriers, wgmma on
// both matmuls, register reallocation between roles. Built on CuTe/CUTLASS headers (the
// nvidia-cutlass wheel). Free of torch: tests/test_cuda_sm90.py compiles this file alone to read its
// SASS. Design: docs/cuda-hopper.md.
//
// One CTA = one (128-row query tile, head, batch); 384 threads in three warpgroups:
//   warpgroup 0 (producer, 24 registers/thread): one thread issues TMA loads -- the Q tile once, then
//     the K and V tiles of the CTA's schedule (the key band of causal / window / key length, or a
//     BlockMask's listed blocks inside it) into a 2-stage ring; each stage's "full" mbarrier
//     completes when its bytes land, its "empty" barrier when both consumers have released it.
//   warpgroups 1, 2 (consumers, 240 registers/thread): each owns 64 query rows. Per key tile:
//     S = Q K^T   (SS-wgmma: both operands in shared memory)       S: (64, kBlockN) fp32 registers
//     softcap / ALiBi if compiled in, masking on the tiles that cross an edge, online softmax in base 2
//     O += P V    (RS-wgmma: P converted to 16 bits in registers, V^T read from shared memory)
//   then O / rowsum and lse are stored straight from registers. The two consumers take turns at
//   issuing matmuls (ping-pong on two named barriers), so one's softmax hides under the other's
//   matmuls; within a consumer, S of the next tile is issued with P V of the current one.
// Features (window, softcap, ALiBi, lengths, BlockMask lists) are template flags: Traits::kFeatures.
#include "attention_fwd_sm90.h"
#include "schedule.h"

#include <cute/tensor.hpp>  // first: the atom headers below assume it
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <cmath>
#include <iterator>
#include <utility>

namespace fastattn {
namespace cuda {
namespace sm90 {
namespace {

using namespace cute;

template <typename Element_, int kHeadDim_, int kFeatures_>
struct Traits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  // Compile-time features (Feature bits, attention_fwd_sm90.h): an instantiation carries no code
  // for the features it lacks, and the plain one (0) none at all.
  static constexpr int kFeatures = kFeatures_;
  static constexpr bool kWindow = kFeatures & Feature::kWindow;  // band edges (causal, sliding window)
  static constexpr bool kSoftcap = kFeatures & Feature::kSoftcap;
  static constexpr bool kAlibi = kFeatures & Feature::kAlibi;
  static constexpr bool kLengths = kFeatures & Feature::kLengths;
  static constexpr bool kBlockLists = kFeatures & Feature::kBlockLists;
  // Scores in log2 units after softcap / ALiBi (transformed once per score); raw q.k otherwise,
  // the scale then folded into the exponent's FFMA.
  static constexpr bool kLog2Scores = kSoftcap || kAlibi;
  static constexpr int kBlockM = 128;  // query rows per CTA, 64 per consumer warpgroup
  static constexpr int kBlockN = 128;  // keys per tile
  static constexpr int kStages = 2;    // K/V ring depth
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
  static constexpr int kWarpgroupRows = kBlockM / kConsumerWarpgroups;  // 64: one wgmma is 64 rows tall
  static constexpr int kThreads = 128 + kConsumerThreads;
  // setmaxnreg targets: the producer only computes addresses; the consumers hold O (kHeadDim / 2
  // fp32 per thread), S (kBlockN / 2) and P. 65536 registers per SM must cover all three groups.
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;
  static_assert(128 * kProducerRegisters + kConsumerThreads * kConsumerRegisters <= 65536);

  using BlockM = Int<kBlockM>;
  using BlockN = Int<kBlockN>;
  using HeadDim = Int<kHeadDim>;
  // The consumer warpgroups stacked along M: warpgroup w owns rows [64w, 64w + 64) of the Q tile.
  using WarpgroupLayout = Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>;
  using MmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, BlockN, HeadDim>>(), WarpgroupLayout{}));
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, HeadDim, BlockN>, GMMA::Major::K, GMMA::Major::MN>(),
      WarpgroupLayout{}));

  // Shared tiles are rows of kHeadDim elements in the 128-byte swizzle that wgmma reads without
  // bank conflicts and TMA writes directly.
  using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<BlockM, HeadDim>{}));
  using SmemLayoutKVStage = decltype(tile_to_shape(SmemAtom{}, Shape<BlockN, HeadDim>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<BlockN, HeadDim, Int<kStages>>{}));
  // V^T (kHeadDim, kBlockN, stages): the same bytes as V seen transposed, the MN-major B operand of P V.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{},
      make_layout(Shape<HeadDim, BlockN, Int<kStages>>{}, Stride<BlockN, _1, Int<kBlockN * kHeadDim>>{})));

  // A global tensor as TMA sees it: (L, D, H, B) with element strides (row, 1, head, batch).
  using GmemLayout = Layout<Shape<int, HeadDim, int, int>, Stride<int64_t, _1, int64_t, int64_t>>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayout{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GmemTensor>(), SmemLayoutQ{},
                                      Shape<BlockM, HeadDim>{}, _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GmemTensor>(), SmemLayoutKVStage{},
                                       Shape<BlockN, HeadDim>{}, _1{}));
  static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesKV = kBlockN * kHeadDim * sizeof(Element);

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
};

template <class T>
struct SharedStorage {
  // 1024-byte alignment: the period of the 128-byte swizzle, which TMA and wgmma both assume.
  alignas(1024) cute::array_aligned<typename T::Element, cosize_v<typename T::SmemLayoutQ>> q;
  alignas(1024) cute::array_aligned<typename T::Element, cosize_v<typename T::SmemLayoutKV>> k;
  alignas(1024) cute::array_aligned<typename T::Element, cosize_v<typename T::SmemLayoutKV>> v;
  typename T::Pipeline::SharedStorage pipeline_k;
  typename T::Pipeline::SharedStorage pipeline_v;
  uint64_t q_full;  // mbarrier: the Q tile has landed
  float softmax_done[T::kConsumerThreads];  // written, never read: see pin_before_wait
};

template <class T>
struct Params {
  typename T::TmaQ tma_q;
  typename T::TmaKV tma_k;
  typename T::TmaKV tma_v;
  typename T::Element* out;
  float* lse;
  int64_t out_stride[3];  // (batch, head, row)
  int batch, heads_q, heads_kv, group, seqlen_q, seqlen_k;
  float scale_log2;     // scale * log2(e)
  float score_to_log2;  // score units -> log2: scale_log2 for raw scores, 1 for kLog2Scores
  float score_to_ln;    // score units -> natural log (lse): scale, or ln 2 for kLog2Scores
  float softcap_log2;   // softcap * log2(e)
  float scale_over_softcap;
  bool has_window_left, has_window_right;
  int window_left, window_right;
  const float* alibi;
  int64_t alibi_stride[2];
  const int* key_lengths;
  const int* query_lengths;
  BlockLists lists;
  int mask_block_q, mask_block_k;
};

// An accumulator fragment ((2 cols, 2 rows, V col groups), MMA_M, MMA_N) of a 64-row wgmma seen
// as (rows, cols): each thread holds 2 rows (r, r + 8) and pairs of adjacent columns.
template <class Engine, class Layout>
__device__ __forceinline__ auto as_rows_cols(Tensor<Engine, Layout>&& t) {
  auto l = t.layout();
  return make_tensor(t.data(), make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                                           make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l))));
}
template <class Engine, class Layout>
__device__ __forceinline__ auto as_rows_cols(Tensor<Engine, Layout>& t) {
  return as_rows_cols(make_tensor(t.data(), t.layout()));
}

// The accumulator layout of S ((2, 2, V), 1, 1) as the register A operand of P V: each k-block of
// 16 keys takes two adjacent column groups, ((2, 2, 2), 1, V / 2) -- the layouts of a wgmma
// accumulator and of its register A operand agree element for element.
template <class Layout>
__device__ __forceinline__ auto acc_as_a_operand(Layout l) {
  static_assert(decltype(size<1>(l))::value == 1 && decltype(size<2>(l))::value == 1);
  auto groups = logical_divide(layout<0, 2>(l), _2{});  // (2, V / 2)
  return make_layout(make_layout(layout<0, 0>(l), layout<0, 1>(l), layout<0>(groups)), layout<1>(l),
                     layout<1>(groups));
}

// Issues one warpgroup matmul C (+)= A B over all k-blocks, without waiting for it. kRegisterA: A
// is a register fragment (RS-wgmma), which must not be reordered across the wgmma either.
template <bool kZeroInit, bool kRegisterA, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void warpgroup_gemm(Mma& mma, TA const& a, TB const& b, TC& c) {
  if constexpr (kRegisterA) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
  if constexpr (kRegisterA) warpgroup_fence_operand(const_cast<TA&>(a));
}

// Named barriers (after CUTLASS's reserved ones) on which consumer warpgroup 0 / 1 waits for its turn.
constexpr uint32_t kPingPongBarrier = 0;

// Max / sum over the 4 threads (a quad) that share an accumulator row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// ptxas schedules a wgmma wait as early as its basic block allows, which would put the wait for
// P V above the softmax meant to run under it. It keeps shared-memory stores on their side of the
// wait, so storing a value that depends on every exponential (the row sums) just before the wait
// pins the whole softmax above it. One 4-byte store per thread per tile.
__device__ __forceinline__ void pin_before_wait(float* slot, float value) {
  asm volatile("st.shared.f32 [%0], %1;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(slot))), "f"(value)
               : "memory");
}

// One MUFU.TANH (tanh.approx.f32, sm_75+): the softcap's one transcendental per score.
__device__ __forceinline__ float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <class T>
__global__ void __launch_bounds__(T::kThreads, 1) attention_fwd_sm90_kernel(CUTE_GRID_CONSTANT Params<T> const p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename T::Element;
  using Pipeline = typename T::Pipeline;
  using PipelineState = typename Pipeline::PipelineState;
  extern __shared__ char smem_raw[];
  auto& shared = *reinterpret_cast<SharedStorage<T>*>(smem_raw);

  const int warpgroup = threadIdx.x / 128;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // the longest causal rows start first
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const Schedule sched =
      make_schedule<T::kBlockM, T::kBlockN, T::kWindow, T::kLengths, T::kBlockLists>(p, batch, head, m_block);

  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = T::kTmaBytesKV;
  pipe_params.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = T::kConsumerThreads;
  Pipeline pipeline_k(shared.pipeline_k, pipe_params, Shape<_1, _1, _1>{});
  Pipeline pipeline_v(shared.pipeline_v, pipe_params, Shape<_1, _1, _1>{});
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(&shared.q_full, 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();  // barriers initialised before anyone waits on them

  if (warpgroup == 0) {
    // ---- producer ----
    cutlass::arch::warpgroup_reg_dealloc<T::kProducerRegisters>();
    if (threadIdx.x == 0) {
      const int head_kv = head / p.group;
      Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename T::SmemLayoutQ{});
      Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename T::SmemLayoutKV{});
      Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename T::SmemLayoutKV{});
      Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.seqlen_q, typename T::HeadDim{}, p.heads_q, p.batch));
      Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.seqlen_k, typename T::HeadDim{}, p.heads_kv, p.batch));
      Tensor mV = p.tma_v.get_tma_tensor(make_shape(p.seqlen_k, typename T::HeadDim{}, p.heads_kv, p.batch));
      auto q_tile = Shape<typename T::BlockM, typename T::HeadDim>{};
      auto kv_tile = Shape<typename T::BlockN, typename T::HeadDim>{};
      Tensor gQ = local_tile(mQ(_, _, head, batch), q_tile, make_coord(m_block, _0{}));  // (kBlockM, D)
      Tensor gK = local_tile(mK(_, _, head_kv, batch), kv_tile, make_coord(_, _0{}));   // (kBlockN, D, tiles)
      Tensor gV = local_tile(mV(_, _, head_kv, batch), kv_tile, make_coord(_, _0{}));   // (kBlockN, D, tiles)
      auto [tQgQ, tQsQ] = tma_partition(p.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tKgK, tKsK] = tma_partition(p.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVgV, tVsV] = tma_partition(p.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

      // Rows and keys past the sequence ends are zero-filled by TMA (the box runs off the tensor).
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&shared.q_full, T::kTmaBytesQ);
      copy(p.tma_q.with(shared.q_full, 0), tQgQ, tQsQ);
      PipelineState state = cutlass::make_producer_start_state<Pipeline>();
      int it = 0;
      for (int n = sched.next(it); n >= 0; n = sched.next(it)) {
        pipeline_k.producer_acquire(state);
        copy(p.tma_k.with(*pipeline_k.producer_get_barrier(state), 0), tKgK(_, n), tKsK(_, state.index()));
        pipeline_v.producer_acquire(state);
        copy(p.tma_v.with(*pipeline_v.producer_get_barrier(state), 0), tVgV(_, n), tVsV(_, state.index()));
        ++state;
      }
    }
    return;
  }

  // ---- consumers ----
  cutlass::arch::warpgroup_reg_alloc<T::kConsumerRegisters>();
  const int tid = threadIdx.x - 128;  // 0 .. 255 over both consumer warpgroups
  const int consumer = tid / 128;
  Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename T::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename T::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(shared.v.data()), typename T::SmemLayoutVt{});
  typename T::MmaQK mma_qk;
  typename T::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_pv = mma_pv.get_thread_slice(tid);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);    // wgmma descriptors (MMA, 1, D / 16)
  Tensor tSrK = thr_qk.partition_fragment_B(sK);    // (MMA, 1, D / 16, stages)
  Tensor tOrVt = thr_pv.partition_fragment_B(sVt);  // (MMA, 1, kBlockN / 16, stages)
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<typename T::BlockM, typename T::HeadDim>{});  // fp32
  clear(tOrO);
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<typename T::BlockM, typename T::BlockN>{});  // fp32 scores
  // P in 16 bits, in the register layout of the A operand of P V.
  Tensor tOrP = make_tensor<Element>(acc_as_a_operand(tSrS.layout()));
  static_assert(std::is_same_v<decltype(shape(tOrP)), decltype(partition_shape_A(
                                                          mma_pv, Shape<typename T::BlockM, typename T::BlockN>{}))>,
                "P must have the shape of the P V matmul's A fragment");
  // (row, col) of every element this thread holds of an S tile and of the O tile.
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<typename T::BlockM, typename T::BlockN>{}));
  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(Shape<typename T::BlockM, typename T::HeadDim>{}));
  Tensor S = as_rows_cols(tSrS);  // (2, kBlockN / 4)
  Tensor S_coords = as_rows_cols(tScS);
  Tensor O = as_rows_cols(tOrO);
  constexpr int kRows = decltype(size<0>(O))::value;  // 2: rows r and r + 8 of the warp's 16
  static_assert(kRows == 2, "a thread holds rows r and r + 8 of its warp's 16");
  float row_max[kRows];
  float row_sum[kRows];
  float correction[kRows];
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  const int row0 = m_block * T::kBlockM;
  const int wg_row0 = row0 + T::kWarpgroupRows * consumer;  // this warpgroup's first row
  float slope_log2 = 0.f;
  if constexpr (T::kAlibi) {
    if (p.alibi) slope_log2 = p.alibi[batch * p.alibi_stride[0] + head * p.alibi_stride[1]] * float(M_LOG2E);
  }

  // Scores of key tile n, in place in S: softcap / ALiBi (log2 units then), -inf where (row, key) is
  // not visible -- checked element-wise only on a tile that crosses the key length or a band edge
  // for this warpgroup's rows -- then the online softmax: S becomes P (fp32), row_sum and row_max
  // move on, and correction[r] is the factor O's row r must take before P V of this tile adds in.
  auto softmax_tile = [&](int n) {
    const int key0 = n * T::kBlockN;
    if constexpr (T::kLog2Scores) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(S); ++i) {
        float s = T::kSoftcap ? p.softcap_log2 * fast_tanh(S(i) * p.scale_over_softcap) : S(i) * p.scale_log2;
        if constexpr (T::kAlibi) {
          const int row = row0 + get<0>(S_coords(i));
          const int key = key0 + get<1>(S_coords(i));
          s -= slope_log2 * fabsf(static_cast<float>(row + sched.offset - key));
        }
        S(i) = s;
      }
    }
    if (tile_needs_mask<T::kBlockN, T::kWarpgroupRows, T::kWindow>(sched, p, n, wg_row0)) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(S); ++i) {
        const int row = row0 + get<0>(S_coords(i));
        if (!key_visible<T::kWindow>(sched, p, row, key0 + get<1>(S_coords(i)))) S(i) = -INFINITY;
      }
    }
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float m = row_max[r];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(S); ++c) m = fmaxf(m, S(r, c));
      m = quad_max(m);
      // A row that has seen no key yet keeps max -inf; 0 in its place keeps the exponents finite.
      const float m_scaled = m == -INFINITY ? 0.f : m * p.score_to_log2;
      correction[r] = exp2f(row_max[r] * p.score_to_log2 - m_scaled);
      row_max[r] = m;
      float sum = 0.f;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(S); ++c) {
        const float prob = exp2f(S(r, c) * p.score_to_log2 - m_scaled);
        S(r, c) = prob;
        sum += prob;
      }
      row_sum[r] = row_sum[r] * correction[r] + sum;
    }
  };
  auto rescale_o = [&] {
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(O); ++c) O(r, c) *= correction[r];
    }
  };
  auto convert_p = [&] {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tSrS); ++i) tOrP(i) = static_cast<Element>(tSrS(i));
  };

  // Ping-pong: the two consumer warpgroups take turns issuing matmuls, so one's softmax runs while
  // the other's matmuls occupy the tensor cores. A warpgroup waits for its turn on its own named
  // barrier and, once its matmuls are issued, passes the turn on by arriving at the other's.
  // Warpgroup 1 gives warpgroup 0 the first turn and warpgroup 0 takes back the last hand-over
  // after its loop, so arrivals and waits balance on both barriers (both take n_tiles + 1 turns).
  auto wait_turn = [&] { cutlass::arch::NamedBarrier::sync(T::kConsumerThreads, kPingPongBarrier + consumer); };
  auto pass_turn = [&] { cutlass::arch::NamedBarrier::arrive(T::kConsumerThreads, kPingPongBarrier + 1 - consumer); };
  if (consumer == 1) pass_turn();

  // Intra-warpgroup overlap: a turn issues S(n) = Q K_n^T together with O += P(n') V(n') of the
  // previous tile n'; the softmax of tile n then runs while P(n') V(n') is still on the tensor
  // cores. O takes tile n's correction at the next turn, between its two matmuls (O is not in
  // flight then), so after the wait only P's conversion touches a matmul's registers.
  cutlass::arch::ClusterTransactionBarrier::wait(&shared.q_full, 0);
  PipelineState state;    // the tile whose K is consumed next
  PipelineState v_state;  // the tile whose V (and P) is pending
  int it = 0;
  int n = sched.next(it);
  if (n >= 0) {
    pipeline_k.consumer_wait(state);
    wait_turn();
    warpgroup_gemm</*kZeroInit=*/true, /*kRegisterA=*/false>(mma_qk, tSrQ, tSrK(_, _, _, state.index()), tSrS);
    pass_turn();
    warpgroup_wait<0>();
    pipeline_k.consumer_release(state);
    softmax_tile(n);
    convert_p();
    v_state = state;
    ++state;
    for (n = sched.next(it); n >= 0; n = sched.next(it)) {
      pipeline_k.consumer_wait(state);
      pipeline_v.consumer_wait(v_state);
      wait_turn();
      warpgroup_gemm</*kZeroInit=*/true, /*kRegisterA=*/false>(mma_qk, tSrQ, tSrK(_, _, _, state.index()), tSrS);
      rescale_o();  // to tile n's running max, while S(n) runs
      warpgroup_gemm</*kZeroInit=*/false, /*kRegisterA=*/true>(mma_pv, tOrP, tOrVt(_, _, _, v_state.index()), tOrO);
      pass_turn();
      warpgroup_wait<1>();  // S(n) is in (the older batch); P(n') V(n') may still run
      pipeline_k.consumer_release(state);
      softmax_tile(n);
      pin_before_wait(&shared.softmax_done[tid], row_sum[0] + row_sum[1]);
      warpgroup_wait<0>();
      pipeline_v.consumer_release(v_state);
      convert_p();  // P(n) over P(n'), whose matmul has completed
      v_state = state;
      ++state;
    }
    pipeline_v.consumer_wait(v_state);
    wait_turn();
    rescale_o();
    warpgroup_gemm</*kZeroInit=*/false, /*kRegisterA=*/true>(mma_pv, tOrP, tOrVt(_, _, _, v_state.index()), tOrO);
    pass_turn();
    warpgroup_wait<0>();
    pipeline_v.consumer_release(v_state);
  }
  if (consumer == 0) wait_turn();  // the hand-over from warpgroup 1's last turn (or its first)

  // ---- epilogue: O / rowsum, lse; a row that saw no key (or lies past query_lengths) gets 0 and
  // lse = -inf ----
  Tensor O_coords = as_rows_cols(tOcO);
  Element* out = p.out + batch * p.out_stride[0] + head * p.out_stride[1];
  float* lse = p.lse + (static_cast<int64_t>(batch) * p.heads_q + head) * p.seqlen_q;
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int row = row0 + get<0>(O_coords(r, 0));
    float sum = quad_sum(row_sum[r]);
    if constexpr (T::kLengths) sum = row < sched.qlen ? sum : 0.f;
    // sum != 0, not sum > 0: a NaN sum (a NaN among the row's visible scores) makes the row NaN, never 0.
    const bool live = sum != 0.f;
    const float inv = live ? 1.f / sum : 0.f;
    if (row < p.seqlen_q && (tid % 4) == 0) lse[row] = live ? row_max[r] * p.score_to_ln + logf(sum) : -INFINITY;
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < size<1>(O); c += 2) {
      // Columns c and c + 1 of a row are adjacent in memory: one 4-byte store.
      if (row < p.seqlen_q) {
        const int col = get<1>(O_coords(r, c));
        // A select, not O * 0: a row past query_lengths may hold NaN from padding it never shows.
        cute::array<Element, 2> pair{static_cast<Element>(live ? O(r, c) * inv : 0.f),
                                     static_cast<Element>(live ? O(r, c + 1) * inv : 0.f)};
        *reinterpret_cast<cute::array<Element, 2>*>(out + row * p.out_stride[2] + col) = pair;
      }
    }
  }
#endif
}

template <class T>
int smem_bytes() {
  return static_cast<int>(sizeof(SharedStorage<T>));
}

template <class T>
cudaError_t launch(const FwdArgs& a, cudaStream_t stream) {
  using Element = typename T::Element;
  constexpr float log2e = static_cast<float>(M_LOG2E);
  auto gmem = [](const void* ptr, int length, int heads, int batch, const int64_t* stride) {
    return make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)),
                       typename T::GmemLayout{make_shape(length, typename T::HeadDim{}, heads, batch),
                                              make_stride(stride[2], _1{}, stride[1], stride[0])});
  };
  Params<T> p{
      make_tma_copy(SM90_TMA_LOAD{}, gmem(a.q, a.seqlen_q, a.heads_q, a.batch, a.q_stride),
                    typename T::SmemLayoutQ{}, Shape<typename T::BlockM, typename T::HeadDim>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem(a.k, a.seqlen_k, a.heads_kv, a.batch, a.k_stride),
                    typename T::SmemLayoutKVStage{}, Shape<typename T::BlockN, typename T::HeadDim>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem(a.v, a.seqlen_k, a.heads_kv, a.batch, a.v_stride),
                    typename T::SmemLayoutKVStage{}, Shape<typename T::BlockN, typename T::HeadDim>{}, _1{}),
      static_cast<Element*>(a.out),
      a.lse,
      {a.out_stride[0], a.out_stride[1], a.out_stride[2]},
      a.batch,
      a.heads_q,
      a.heads_kv,
      a.heads_q / a.heads_kv,
      a.seqlen_q,
      a.seqlen_k,
      a.scale * log2e,
      T::kLog2Scores ? 1.f : a.scale * log2e,
      T::kLog2Scores ? static_cast<float>(M_LN2) : a.scale,
      a.softcap * log2e,
      a.softcap > 0.f ? a.scale / a.softcap : 0.f,
      a.has_window_left,
      a.has_window_right,
      a.window_left,
      a.window_right,
      a.alibi,
      {a.alibi_stride[0], a.alibi_stride[1]},
      a.key_lengths,
      a.query_lengths,
      a.lists,
      a.mask_block_q,
      a.mask_block_k,
  };
  auto kernel = attention_fwd_sm90_kernel<T>;
  const int smem = smem_bytes<T>();
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((a.seqlen_q + T::kBlockM - 1) / T::kBlockM, a.heads_q, a.batch);
  kernel<<<grid, T::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <class Fn, int... kIndex>
cudaError_t with_instantiation(int features, std::integer_sequence<int, kIndex...>, Fn&& fn) {
  cudaError_t err = cudaErrorInvalidValue;
  bool done = false;
  auto one = [&](auto flags) {
    constexpr int kFlags = decltype(flags)::value;
    if (!done && kFlags == instantiation_for(features)) {
      err = fn(flags);
      done = true;
    }
  };
  (one(Int<kInstantiated[kIndex]>{}), ...);
  return err;
}

// The one switch over the instantiated dtypes, head dims and feature sets.
template <class Fn>
cudaError_t dispatch(DType dtype, int head_dim, int features, Fn&& fn) {
  auto with_dim = [&](auto element) {
    using Element = decltype(element);
    auto with_features = [&](auto dim) -> cudaError_t {
      constexpr int kHeadDim = decltype(dim)::value;
      return with_instantiation(features, std::make_integer_sequence<int, std::size(kInstantiated)>{}, [&](auto flags) {
        return fn(Traits<Element, kHeadDim, decltype(flags)::value>{});
      });
    };
    if (head_dim == 64) return with_features(Int<64>{});
    if (head_dim == 128) return with_features(Int<128>{});
    return cudaErrorInvalidValue;
  };
  return dtype == DType::kFloat16 ? with_dim(cutlass::half_t{}) : with_dim(cutlass::bfloat16_t{});
}

}  // namespace

int fwd_smem_bytes(int head_dim) {
  // Shared memory does not depend on dtype (both 16 bits) or features.
  return head_dim == 64 ? smem_bytes<Traits<cutlass::half_t, 64, 0>>() : smem_bytes<Traits<cutlass::half_t, 128, 0>>();
}

cudaError_t run_fwd(const FwdArgs& args, DType dtype, int head_dim, cudaStream_t stream) {
  if (args.batch == 0 || args.heads_q == 0 || args.seqlen_q == 0) return cudaSuccess;
  return dispatch(dtype, head_dim, features_of(args),
                  [&](auto traits) { return launch<decltype(traits)>(args, stream); });
}

}  // namespace sm90
}  // namespace cuda
}  // namespace fastattn
