// Fused attention over packed variable-length sequences on the CPU: fastattn::varlen_fwd / varlen_bwd
// (schemas in csrc/bindings.cpp), flash-attn's varlen layout.
//
//   q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), cu_seqlens_q/k int32 (num_seqs + 1,)
//
// Sequence s owns query rows [cu_q[s], cu_q[s+1]) and key rows [cu_k[s], cu_k[s+1]) and attends only
// to itself, with causal / window / ALiBi bottom-right aligned per sequence (offset Lk_s - Lq_s).
// The kernels read cu_seqlens once, then walk each sequence's own tiles with the tile math of the
// padded kernels (attention_cpu.h: the key range of a row, score transform, BLAS on tiles): a
// sequence is a batch element whose rows start at cu[s] -- no padding, no mask, no (total_q, total_k)
// buffer.
//
// Work lists, balanced by cost (rows x visible keys) rather than by count, since one long document
// costs as much as many short ones:
//   forward  -- one task per (sequence, query head, query tile): the online softmax of attention_fwd.cpp;
//   backward -- one task per (sequence, kv head, run of key tiles): it owns dK, dV of its key tiles
//               (looping over the query heads of its GQA group, as attention_bwd.cpp) and adds its dQ
//               contributions to a buffer of its own; a sequence's key tiles are cut into several runs
//               only when the sequence is expensive enough to need it, and the runs' dQ buffers are
//               summed in a fixed order at the end (deterministic, no atomics).
//
// Dropout: sequence s draws the pattern the padded kernels draw for that sequence alone (batch 1, its
// own Lq_s x Lk_s, local indices) from seed + s (sequence_dropout), so sequences never share random
// numbers and a sequence's pattern does not depend on the others; the backward regenerates it.
//
// lse comes out in the accumulation dtype (float32, or float64 for float64 inputs, so the backward of
// a float64 call recomputes P to float64 precision; the Python layer hands users a float32 lse).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/attention_cpu.h"

namespace fastattn::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

// The same tile sizes as the padded kernels (attention_ops.cpp).
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 256;

// Where each sequence's rows start and how many it has, read once from cu_seqlens.
struct Packing {
  std::vector<int64_t> q_begin, k_begin, q_len, k_len;
  int64_t num_seqs() const { return static_cast<int64_t>(q_len.size()); }
};

Packing read_packing(const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t total_q, int64_t total_k,
                     int64_t max_seqlen_q, int64_t max_seqlen_k) {
  for (auto [cu, name, total] : {std::tuple{&cu_q, "cu_seqlens_q", total_q}, std::tuple{&cu_k, "cu_seqlens_k", total_k}}) {
    TORCH_CHECK(cu->device().is_cpu(), name, " must be a CPU tensor for the CPU kernel, got ", cu->device());
    TORCH_CHECK(cu->scalar_type() == at::kInt, name, " must be int32, got ", cu->scalar_type());
    TORCH_CHECK(cu->dim() == 1 && cu->size(0) >= 1, name, " must have shape (num_seqs + 1,), got ", cu->sizes());
    const at::Tensor c = cu->contiguous();
    const int32_t* x = c.const_data_ptr<int32_t>();
    const int64_t n = c.size(0);
    TORCH_CHECK(x[0] == 0 && x[n - 1] == total, name, " must start at 0 and end at the number of packed tokens ",
                total, ", got ", x[0], " ... ", x[n - 1]);
    for (int64_t s = 1; s < n; ++s) TORCH_CHECK(x[s] >= x[s - 1], name, " must be non-decreasing");
  }
  TORCH_CHECK(cu_q.size(0) == cu_k.size(0), "cu_seqlens_q and cu_seqlens_k must describe the same number of "
              "sequences, got ", cu_q.size(0) - 1, " and ", cu_k.size(0) - 1);
  const at::Tensor cq = cu_q.contiguous(), ck = cu_k.contiguous();
  const int32_t* xq = cq.const_data_ptr<int32_t>();
  const int32_t* xk = ck.const_data_ptr<int32_t>();
  Packing pk;
  const int64_t n = cq.size(0) - 1;
  for (int64_t s = 0; s < n; ++s) {
    pk.q_begin.push_back(xq[s]);
    pk.k_begin.push_back(xk[s]);
    pk.q_len.push_back(xq[s + 1] - xq[s]);
    pk.k_len.push_back(xk[s + 1] - xk[s]);
    TORCH_CHECK(pk.q_len.back() <= max_seqlen_q, "max_seqlen_q = ", max_seqlen_q,
                " is shorter than a sequence of cu_seqlens_q (", pk.q_len.back(), ")");
    TORCH_CHECK(pk.k_len.back() <= max_seqlen_k, "max_seqlen_k = ", max_seqlen_k,
                " is shorter than a sequence of cu_seqlens_k (", pk.k_len.back(), ")");
  }
  return pk;
}

// q/k/v (total, H, D) as the (1, H, total, D) views check_qkv reads: the padded kernels' checks.
AttentionShape check_packed_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3, "q must be 3-D (total_q, Hq, D), got ", q.dim(), "-D");
  TORCH_CHECK(k.dim() == 3, "k must be 3-D (total_k, Hkv, D), got ", k.dim(), "-D");
  TORCH_CHECK(v.dim() == 3, "v must be 3-D (total_k, Hkv, Dv), got ", v.dim(), "-D");
  const AttentionShape s = check_qkv(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2),
                                     v.unsqueeze(0).transpose(1, 2));
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the CPU kernel, got ", q.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "q must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(s.head_dim > 0, "q must have a non-zero head_dim");
  return s;
}

// The Params the shared tile routines read: batch 1 (a sequence is addressed by its base pointers),
// head and row strides of the packed tensors, the per-head ALiBi slopes, the window.
Params make_params(const AttentionShape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const OptTensor& alibi_slopes, double scale, std::optional<int64_t> window_left,
                   std::optional<int64_t> window_right, double softcap, double dropout_p, int64_t seed) {
  check_scalars(scale, softcap, dropout_p);
  Params p;
  p.B = 1;  // packed: s's lengths are the totals, which bound every sequence's window too
  set_shape_and_options(p, s, scale, softcap, dropout_p, seed, window_left, window_right);
  p.q_sh = q.stride(1), p.q_sr = q.stride(0);
  p.k_sh = k.stride(1), p.k_sr = k.stride(0);
  p.v_sh = v.stride(1), p.v_sr = v.stride(0);
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    check_same_device(a, q, "alibi_slopes");
    TORCH_CHECK(a.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", a.scalar_type());
    FASTATTN_CHECK_SHAPE(a, s.heads_q);
    p.alibi = a.const_data_ptr<float>();
    p.alibi_sb = 0, p.alibi_sh = a.stride(0);
  }
  return p;
}

// The geometry of sequence s for the shared routines (local row and key indices).
inline BatchGeometry sequence_geometry(const Packing& pk, int64_t s) {
  return {pk.q_len[s], pk.k_len[s], pk.k_len[s] - pk.q_len[s]};
}

// The Params dropout_factors reads for sequence s (with b = 0 and local indices): the pattern of the
// sequence alone, batch 1 of its own length, from seed + s.
inline Params sequence_dropout(const Params& p, const BatchGeometry& g, int64_t seed, int64_t s) {
  Params d = p;
  d.B = 1, d.Lq = g.qlen, d.Lk = g.klen;
  d.dropout_key = dropout_key_from_seed(seed + s);
  return d;
}

// Cuts tasks with the given costs into `parts` contiguous runs of about equal total cost; returns the
// run boundaries (parts + 1 of them, some runs may be empty).
std::vector<int64_t> balanced_runs(const std::vector<double>& cost, int64_t parts) {
  const int64_t n = static_cast<int64_t>(cost.size());
  double total = 0;
  for (double c : cost) total += c;
  std::vector<int64_t> bounds{0};
  double seen = 0;
  int64_t t = 0;
  for (int64_t r = 1; r < parts; ++r) {
    const double target = total * static_cast<double>(r) / static_cast<double>(parts);
    while (t < n && seen + 0.5 * cost[t] < target) seen += cost[t++];
    bounds.push_back(t);
  }
  bounds.push_back(n);
  return bounds;
}

// Runs body(task) for tasks [0, n) with the given costs, spread over torch's intra-op threads in runs
// of about equal cost (several runs per thread, so that at::parallel_for's equal split by count of
// runs still balances).
template <typename Body>
void parallel_balanced(const std::vector<double>& cost, const Body& body) {
  const int64_t n = static_cast<int64_t>(cost.size());
  if (n == 0) return;
  const int64_t parts = std::min<int64_t>(n, 4 * at::get_num_threads());
  const std::vector<int64_t> runs = balanced_runs(cost, parts);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) body(runs[r], runs[r + 1]);
  });
}

// Visible (row, key) pairs of rows [q0, q1) of a sequence, counting a row's band as one interval;
// plus a constant per row for the work that does not scale with keys.
inline double rows_cost(const Params& p, const BatchGeometry& g, int64_t q0, int64_t q1) {
  double cost = 0;
  for (int64_t i = q0; i < q1; ++i) {
    const KeyRange r = row_key_range(p, g, i);
    cost += 16.0 + static_cast<double>(std::max<int64_t>(0, r.hi - r.lo + 1));
  }
  return cost;
}

// ---------------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------------

// out_t: the output's element type, scalar_t; acc_t for the backward's float32 recomputation of out.
template <typename scalar_t, typename out_t = scalar_t>
void varlen_forward(const Params& p, const Packing& pk, int64_t seed, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, at::Tensor& out, at::Tensor& lse) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t tile_q = kBlockQ, tile_k = kBlockK, Hq = p.Hq, total_q = p.Lq;

  // Tasks: (sequence, query tile) x query head, the head fastest.
  struct Tile {
    int64_t seq, q0, q1;
  };
  std::vector<Tile> tiles;
  std::vector<double> cost;
  for (int64_t s = 0; s < pk.num_seqs(); ++s) {
    const BatchGeometry g = sequence_geometry(pk, s);
    for (int64_t q0 = 0; q0 < g.qlen; q0 += tile_q) {
      const int64_t q1 = std::min(g.qlen, q0 + tile_q);
      tiles.push_back({s, q0, q1});
      const double c = rows_cost(p, g, q0, q1);
      for (int64_t h = 0; h < Hq; ++h) cost.push_back(c);
    }
  }

  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* v_data = v.const_data_ptr<scalar_t>();
  out_t* out_data = out.mutable_data_ptr<out_t>();        // (total_q, Hq, Dv) contiguous
  acc_t* lse_data = lse.mutable_data_ptr<acc_t>();        // (Hq, total_q) contiguous

  parallel_balanced(cost, [&](int64_t begin, int64_t end) {
    ForwardScratch<scalar_t, acc_t> w(p, tile_q, tile_k);
    const auto online_softmax = [&](acc_t* S, int64_t tile_rows, int64_t n) { w.online_softmax(S, tile_rows, n); };
    for (int64_t task = begin; task < end; ++task) {
      const Tile& tile = tiles[task / Hq];
      const int64_t s = tile.seq, h = task % Hq, hk = h / p.group;
      const int64_t q0 = tile.q0, q1 = tile.q1, rows = q1 - q0;
      const BatchGeometry g = sequence_geometry(pk, s);
      const Params dp = p.dropout_threshold ? sequence_dropout(p, g, seed, s) : p;
      // This sequence's rows: local query i is packed row q_begin + i, local key j packed row k_begin + j.
      const scalar_t* q_seq = q_data + pk.q_begin[s] * p.q_sr + h * p.q_sh;
      const scalar_t* k_seq = k_data + pk.k_begin[s] * p.k_sr + hk * p.k_sh;
      const scalar_t* v_seq = v_data + pk.k_begin[s] * p.v_sr + hk * p.v_sh;
      forward_rows(p, dp, g, 0, h, q0, q1, tile_k, q_seq + q0 * p.q_sr, k_seq, v_seq, online_softmax, w);  // no BlockMask
      w.finish(rows, out_data + ((pk.q_begin[s] + q0) * Hq + h) * p.Dv, Hq * p.Dv,
               lse_data + h * total_q + pk.q_begin[s] + q0);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                  int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                  const OptTensor& alibi_slopes, double scale,
                                                  std::optional<int64_t> window_left,
                                                  std::optional<int64_t> window_right, double softcap,
                                                  double dropout_p, int64_t seed) {
  const AttentionShape s = check_packed_qkv(q, k, v);
  const Packing pk = read_packing(cu_seqlens_q, cu_seqlens_k, s.seqlen_q, s.seqlen_k, max_seqlen_q, max_seqlen_k);
  const Params p = make_params(s, q, k, v, alibi_slopes, scale, window_left, window_right, softcap, dropout_p, seed);
  const bool is_double = q.scalar_type() == at::kDouble;
  at::Tensor out = at::empty({s.seqlen_q, s.heads_q, s.head_dim_v}, q.options());
  at::Tensor lse = at::empty({s.heads_q, s.seqlen_q}, q.options().dtype(is_double ? at::kDouble : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn_varlen_fwd_cpu", [&] {
    varlen_forward<scalar_t>(p, pk, seed, q, k, v, out, lse);
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
void varlen_backward(const Params& p, const Packing& pk, int64_t seed, const at::Tensor& dout, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                     const OptTensor& dlse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t tile_q = kBlockQ, tile_k = kBlockK, D = p.D, Dv = p.Dv, Hq = p.Hq, Hkv = p.Hkv;
  const int64_t group = p.group, total_q = p.Lq;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* v_data = v.const_data_ptr<scalar_t>();
  const scalar_t* dout_data = dout.const_data_ptr<scalar_t>();  // (total_q, Hq, Dv) contiguous
  const acc_t* lse_data = lse.const_data_ptr<acc_t>();          // (Hq, total_q) contiguous

  // delta = rowsum(dO * O) - dlse in acc_t, (Hq, total_q): d lse / d S = P, so the lse gradient
  // enters as dS = P * (dP - rowsum(dO * O) + dlse). For bfloat16/half, O is the forward recomputed in
  // acc_t where the op's out is its rounding (within one ulp; else out as given, as the dense backward's
  // recompute_out_dot_dout does): the rounding of out would be all that is left of a dS that should
  // cancel (a row with one visible key). One more forward pass, no (total_q, Lk) memory.
  std::vector<acc_t> delta(Hq * total_q);
  {
    const scalar_t* out_data = out.const_data_ptr<scalar_t>();  // (total_q, Hq, Dv) contiguous
    const float* dlse_data = dlse.has_value() ? dlse->const_data_ptr<float>() : nullptr;  // (Hq, total_q) contiguous
    at::Tensor out_rec;  // (total_q, Hq, Dv) acc_t contiguous, for 16-bit inputs
    const acc_t* rec_data = nullptr;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      const at::ScalarType acc_type = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
      out_rec = at::empty({total_q, Hq, Dv}, q.options().dtype(acc_type));
      at::Tensor lse_rec = at::empty({Hq, total_q}, q.options().dtype(acc_type));
      varlen_forward<scalar_t, acc_t>(p, pk, seed, q, k, v, out_rec, lse_rec);
      rec_data = out_rec.const_data_ptr<acc_t>();
    }
    at::parallel_for(0, total_q, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t h = 0; h < Hq; ++h) {
          const int64_t row = (i * Hq + h) * Dv;
          acc_t sum = out_dot_dout<scalar_t, acc_t>(out_data + row, rec_data ? rec_data + row : nullptr,
                                                    dout_data + row, Dv);
          if (dlse_data) sum -= static_cast<acc_t>(dlse_data[h * total_q + i]);
          delta[h * total_q + i] = sum;
        }
    });
  }

  // Units (sequence, kv head); each unit's key tiles cut into runs by cost. A run's dQ goes to its own
  // rows of dq_acc: sequence s holds (Hkv, runs_s, group, Lq_s) rows of D from row seq_slot[s].
  const int64_t threads = at::get_num_threads();
  struct Task {
    // key tiles [t0, t1) of the sequence (tiles of tile_k keys); slot: the run's first dq_acc row,
    // counted from the sequence's seq_slot
    int64_t seq, hk, t0, t1, slot;
  };
  std::vector<Task> tasks;
  std::vector<double> task_cost;
  std::vector<int64_t> seq_runs(pk.num_seqs(), 1), seq_slot(pk.num_seqs(), 0);
  int64_t num_slots = 0;  // rows of D accumulators in dq_acc
  {
    std::vector<std::vector<double>> tile_cost(pk.num_seqs());
    double total = 0;
    for (int64_t s = 0; s < pk.num_seqs(); ++s) {
      const BatchGeometry g = sequence_geometry(pk, s);
      for (int64_t k0 = 0; k0 < g.klen; k0 += tile_k) {
        const KeyRange rows = rows_seeing_keys(p, g, k0, k0 + tile_k);
        const double c = (rows.hi >= rows.lo ? static_cast<double>(rows.hi - rows.lo + 1) : 0.0) *
                             static_cast<double>(std::min(tile_k, g.klen - k0)) * static_cast<double>(group) +
                         16.0 * static_cast<double>(tile_k);
        tile_cost[s].push_back(c);
        total += c;
      }
    }
    total *= static_cast<double>(Hkv);
    // Runs only where a unit costs more than a share of the work: enough runs to feed every thread.
    const double share = total / static_cast<double>(4 * threads);
    for (int64_t s = 0; s < pk.num_seqs(); ++s) {
      double unit_cost = 0;
      for (double c : tile_cost[s]) unit_cost += c;
      const int64_t num_tiles = static_cast<int64_t>(tile_cost[s].size());
      const int64_t runs = std::clamp<int64_t>(static_cast<int64_t>(std::ceil(unit_cost / std::max(share, 1.0))), 1,
                                               std::max<int64_t>(1, num_tiles));
      seq_runs[s] = runs;
      seq_slot[s] = num_slots;
      num_slots += runs * Hkv * group * pk.q_len[s];
      const std::vector<int64_t> bounds = balanced_runs(tile_cost[s], runs);
      for (int64_t hk = 0; hk < Hkv; ++hk)
        for (int64_t r = 0; r < runs; ++r) {
          double c = 0;
          for (int64_t t = bounds[r]; t < bounds[r + 1]; ++t) c += tile_cost[s][t];
          tasks.push_back({s, hk, bounds[r], bounds[r + 1], (hk * runs + r) * group * pk.q_len[s]});
          task_cost.push_back(c);
        }
    }
  }
  // dQ accumulators in acc_t: for sequence s, (Hkv, runs_s, group, Lq_s, D) from row seq_slot[s].
  const at::ScalarType acc_type = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  at::Tensor dq_acc = at::zeros({num_slots * D}, q.options().dtype(acc_type));
  acc_t* dq_acc_data = dq_acc.mutable_data_ptr<acc_t>();

  scalar_t* dk_data = dk.mutable_data_ptr<scalar_t>();  // (total_k, Hkv, D) contiguous
  scalar_t* dv_data = dv.mutable_data_ptr<scalar_t>();  // (total_k, Hkv, Dv) contiguous

  parallel_balanced(task_cost, [&](int64_t begin, int64_t end) {
    BackwardScratch<scalar_t, acc_t> w(p, tile_q, tile_k);
    const auto no_dbias = [](const acc_t*) {};
    for (int64_t ti = begin; ti < end; ++ti) {
      const Task& task = tasks[ti];
      const int64_t s = task.seq, hk = task.hk, qb = pk.q_begin[s], kb = pk.k_begin[s];
      const BatchGeometry g = sequence_geometry(pk, s);
      const Params dp = p.dropout_threshold ? sequence_dropout(p, g, seed, s) : p;
      const scalar_t* k_seq = k_data + kb * p.k_sr + hk * p.k_sh;
      const scalar_t* v_seq = v_data + kb * p.v_sr + hk * p.v_sh;
      for (int64_t t = task.t0; t < task.t1; ++t) {
        const int64_t k0 = t * tile_k, k1 = std::min(g.klen, k0 + tile_k);
        const BackwardKeyTile<acc_t> kt = w.load_keys(k0, k1, k_seq + k0 * p.k_sr, p.k_sr, v_seq + k0 * p.v_sr, p.v_sr);
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          backward_query_tiles(p, g, 0, h, k0, k1, tile_q, w.list_scratch, w.query_tiles);  // the band, no BlockMask
          const scalar_t* q_seq = q_data + qb * p.q_sr + h * p.q_sh;
          const scalar_t* do_seq = dout_data + (qb * Hq + h) * Dv;
          const acc_t* lse_seq = lse_data + h * total_q + qb;
          const auto probabilities = [&](int64_t i, acc_t* sr, int64_t n) {
            probabilities_from_shift(sr, n, lse_seq[i], lse_seq[i] == neg_inf);
          };
          acc_t* dq_rows = dq_acc_data + (seq_slot[s] + task.slot + (h - hk * group) * g.qlen) * D;
          for (const Range& qr : w.query_tiles) {
            const BackwardQueryTile<acc_t> qt = w.load_queries(qr.begin, qr.end, q_seq + qr.begin * p.q_sr, p.q_sr,
                                                               do_seq + qr.begin * Hq * Dv, Hq * Dv);
            backward_tile_step(p, dp, g, 0, h, kt, qt, delta.data() + h * total_q + qb, probabilities, no_dbias, w,
                               dq_rows);
          }
        }
        w.store_dk_dv(k1 - k0, dk_data + ((kb + k0) * Hkv + hk) * D, Hkv * D, 1, dv_data + ((kb + k0) * Hkv + hk) * Dv,
                      Hkv * Dv, 1);
      }
    }
  });

  // dQ = sum of the runs' accumulators, in run order.
  scalar_t* dq_data = dq.mutable_data_ptr<scalar_t>();  // (total_q, Hq, D) contiguous
  at::parallel_for(0, pk.num_seqs(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t Lq = pk.q_len[s], runs = seq_runs[s];
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t hk = h / group, hg = h % group;
        for (int64_t i = 0; i < Lq; ++i) {
          scalar_t* dst = dq_data + ((pk.q_begin[s] + i) * Hq + h) * D;
          for (int64_t c = 0; c < D; ++c) {
            acc_t sum = 0;
            for (int64_t r = 0; r < runs; ++r)
              sum += dq_acc_data[(seq_slot[s] + ((hk * runs + r) * group + hg) * Lq + i) * D + c];
            dst[c] = static_cast<scalar_t>(sum);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, const OptTensor& alibi_slopes, double scale, std::optional<int64_t> window_left,
    std::optional<int64_t> window_right, double softcap, const OptTensor& dlse, double dropout_p, int64_t seed) {
  const AttentionShape s = check_packed_qkv(q, k, v);
  const Packing pk = read_packing(cu_seqlens_q, cu_seqlens_k, s.seqlen_q, s.seqlen_k, max_seqlen_q, max_seqlen_k);
  const Params p = make_params(s, q, k, v, alibi_slopes, scale, window_left, window_right, softcap, dropout_p, seed);
  for (auto [t, name] : {std::pair{&dout, "dout"}, std::pair{&out, "out"}}) {
    check_same_device(*t, q, name);
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
                t->scalar_type());
    FASTATTN_CHECK_SHAPE(*t, s.seqlen_q, s.heads_q, s.head_dim_v);
  }
  const at::ScalarType lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_same_device(lse, q, "lse");
  TORCH_CHECK(lse.scalar_type() == lse_type, "lse must be ", lse_type, " (the forward's), got ", lse.scalar_type());
  FASTATTN_CHECK_SHAPE(lse, s.heads_q, s.seqlen_q);
  if (dlse.has_value()) {
    check_same_device(*dlse, q, "dlse");
    TORCH_CHECK(dlse->scalar_type() == at::kFloat, "dlse must be float32, got ", dlse->scalar_type());
    FASTATTN_CHECK_SHAPE(*dlse, s.heads_q, s.seqlen_q);
  }
  // The kernel reads these row by row at fixed strides; a broadcast dout (from out.sum().backward())
  // or a non-contiguous one is copied once.
  const at::Tensor dout_c = dout.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  const OptTensor dlse_c = dlse.has_value() ? OptTensor(dlse->contiguous()) : std::nullopt;
  at::Tensor dq = at::empty({s.seqlen_q, s.heads_q, s.head_dim}, q.options());
  // Keys of no sequence do not exist (cu_seqlens_k covers every packed key), so dk/dv are written whole.
  at::Tensor dk = at::empty({s.seqlen_k, s.heads_kv, s.head_dim}, q.options());
  at::Tensor dv = at::empty({s.seqlen_k, s.heads_kv, s.head_dim_v}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn_varlen_bwd_cpu", [&] {
    varlen_backward<scalar_t>(p, pk, seed, dout_c, q, k, v, out_c, lse_c, dlse_c, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("varlen_fwd", &varlen_fwd_cpu);
  m.impl("varlen_bwd", &varlen_bwd_cpu);
}

}  // namespace fastattn::cpu
