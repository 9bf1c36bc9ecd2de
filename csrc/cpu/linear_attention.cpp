// Chunked linear attention on the CPU: fastattn::linear_attention_fwd / linear_attention_bwd
// (schemas in csrc/bindings.cpp, fakes in fastattn/linear/ops.py).
//
// The core of fastattn.linear_attention, on feature-mapped queries and keys (the feature map and
// the normaliser column are applied in Python). For q (B, Hq, L, M), k (B, Hkv, L, M),
// v (B, Hkv, L, Dv) and a state S0 (B, Hkv, M, Dv) in the accumulation type (float32, float64 for
// float64 inputs):
//
//   causal:      o_i = q_i (S0 + sum_{j <= i} k_j^T v_j)
//   non-causal:  o_i = q_i (S0 + sum_j k_j^T v_j)
//   final state:  S  = S0 + sum_j k_j^T v_j
//
// The sequence is cut into chunks of T positions. Causal chunk c computes
//
//   O_c = Q_c S + tril(Q_c K_c^T) V_c        # [T, Dv]  (the state holds the earlier chunks)
//   S  += K_c^T V_c                          # [M, Dv]
//
// so the work is O(L (T + M) Dv) per head and no buffer grows with L. The backward walks the
// chunks forwards for dQ (the same states) and backwards for dK, dV with the state gradient
//
//   dH = dS + sum_{later chunks} Q^T dO      # [M, Dv]
//   dK_c = V_c dH^T + tril(dO_c V_c^T)^T Q_c,   dV_c = K_c dH + tril(Q_c K_c^T)^T dO_c
//
// and dS0 = dH before the first chunk. Grid: one task per (batch, key/value head), spread over
// torch's intra-op threads; a task serves the Hq / Hkv query heads of its group, so K/V are never
// repeated and the group's dK, dV are summed without atomics. Matrix products go through the BLAS
// wrapper of the softmax kernels (attention_cpu.h).
#include <ATen/Parallel.h>
#include <cmath>
#include <torch/library.h>

#include "checks.h"
#include "cpu/attention_cpu.h"

namespace fastattn::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

// Feature maps the fused ops apply to q/k tiles as they load them (after the sqrt(scale) factor).
enum FeatureMap : int64_t { kIdentity = 0, kEluPlusOne = 1, kRelu = 2 };

struct LinearParams {
  int64_t B, Hq, Hkv, L, M, Dv, group, chunk;
  bool causal;
  // Fused form: the feature map, sqrt(scale), and the normaliser carried as column Dv of the state
  // (Dva = Dv + 1 columns then, else Dva = Dv).
  int64_t fmap = kIdentity, Dva = 0;
  bool normalize = false;
  double root = 1.0;
};

// exp(x) for x <= 0 without branches or float-to-int conversions, so that the feature loop vectorises
// (the build keeps trapping math): x = n ln2 + r with |r| <= ln2 / 2, n rounded by the 1.5 * 2^23
// shift, exp(r) by its degree-7 Taylor polynomial (relative error below 1e-7), 2^n from the exponent
// bits. Inputs below -87 give exp(-87) ~ 1.6e-38 (the smallest normal floats).
inline float exp_nonpositive(float x) {
  const uint32_t bits = bit_copy<uint32_t>(x);  // x <= 0: x < -87 is a larger unsigned pattern
  x = bit_copy<float>(bits > 0xC2AE0000u ? 0xC2AE0000u : bits);
  const float shifted = x * 1.44269504f + 12582912.0f;  // round(x / ln2) lands in the low mantissa bits
  const float nf = shifted - 12582912.0f;
  const int32_t n = bit_copy<int32_t>(shifted) - 0x4B400000;
  const float r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;
  float e = 1.0f / 5040.0f;
  e = e * r + 1.0f / 720.0f;
  e = e * r + 1.0f / 120.0f;
  e = e * r + 1.0f / 24.0f;
  e = e * r + 1.0f / 6.0f;
  e = e * r + 0.5f;
  e = e * r + 1.0f;
  e = e * r + 1.0f;
  return e * bit_copy<float>((n + 127) << 23);
}
inline double exp_nonpositive(double x) { return std::exp(x); }

// phi over n contiguous values, in place; one loop per map so the compiler can vectorise it.
template <typename acc_t>
void apply_feature(acc_t* x, int64_t n, int64_t fmap) {
  if (fmap == kEluPlusOne) {
    for (int64_t i = 0; i < n; ++i) {  // exp(min(v, 0)) + max(v, 0), min and max by |v| (exact)
      const acc_t v = x[i], a = std::abs(v), e = exp_nonpositive((v - a) * acc_t(0.5));
      x[i] = e + (v + a) * acc_t(0.5);
    }
  } else if (fmap == kRelu) {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] > acc_t(0) ? x[i] : acc_t(0);
  }
}

// phi'(x) from phi(x): elu+1 is x + 1 > 1 for x > 0 and exp(x) <= 1 else; relu is x > 0 or 0.
template <typename acc_t>
acc_t feature_grad(acc_t phi, int64_t fmap) {
  if (fmap == kEluPlusOne) return phi > acc_t(1) ? acc_t(1) : phi;
  if (fmap == kRelu) return phi > acc_t(0) ? acc_t(1) : acc_t(0);
  return acc_t(1);
}

// Base pointer and row stride of head (b, h) of a (B, H, L, X) tensor with a unit last stride.
template <typename T>
struct HeadView {
  T* data;
  int64_t sb, sh, sl;
  T* at(int64_t b, int64_t h, int64_t l) const { return data + b * sb + h * sh + l * sl; }
};

template <typename T>
HeadView<T> head_view(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename scalar_t, typename acc_t>
void store_tile(const acc_t* src, int64_t rows, int64_t cols, scalar_t* dst, int64_t row_stride,
                int64_t src_stride = -1) {
  if (src_stride < 0) src_stride = cols;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * row_stride + c] = static_cast<scalar_t>(src[r * src_stride + c]);
}

// phi(sqrt(scale) x) of a (rows, M) q/k tile; the tile itself when there is nothing to apply.
template <typename scalar_t, typename acc_t>
const acc_t* feature_tile(const LinearParams& p, const scalar_t* base, int64_t rows, int64_t row_stride,
                          acc_t* scratch, int64_t* ld) {
  if (p.fmap == kIdentity && p.root == 1.0) return tile_as_acc<scalar_t, acc_t>(base, rows, p.M, row_stride, scratch, ld);
  const acc_t root = static_cast<acc_t>(p.root);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < p.M; ++c) scratch[r * p.M + c] = root * static_cast<acc_t>(base[r * row_stride + c]);
  apply_feature(scratch, rows * p.M, p.fmap);
  *ld = p.M;
  return scratch;
}

// A (rows, Dv) value tile, with a ones column appended (rows, Dv + 1) when normalising.
template <typename scalar_t, typename acc_t>
const acc_t* value_tile(const LinearParams& p, const scalar_t* base, int64_t rows, int64_t row_stride,
                        acc_t* scratch, int64_t* ld) {
  if (!p.normalize) return tile_as_acc<scalar_t, acc_t>(base, rows, p.Dv, row_stride, scratch, ld);
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* dst = scratch + r * p.Dva;
    for (int64_t c = 0; c < p.Dv; ++c) dst[c] = static_cast<acc_t>(base[r * row_stride + c]);
    dst[p.Dv] = acc_t(1);
  }
  *ld = p.Dva;
  return scratch;
}

// Output rows from a [rows, Dva] tile: o / den (0 where den == 0, whose numerator is 0 too) and den.
template <typename scalar_t, typename acc_t>
void store_output(const LinearParams& p, const acc_t* src, int64_t rows, scalar_t* dst, int64_t row_stride,
                  acc_t* den) {
  if (!p.normalize) return store_tile(src, rows, p.Dv, dst, row_stride);
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* row = src + r * p.Dva;
    const acc_t d = row[p.Dv], inv = d == acc_t(0) ? acc_t(1) : acc_t(1) / d;
    for (int64_t c = 0; c < p.Dv; ++c) dst[r * row_stride + c] = static_cast<scalar_t>(row[c] * inv);
    den[r] = d;
  }
}

// The gradient of a [rows, Dva] output tile: [dout / den, -(dout . out) / den] per row (dout and 0
// where den == 0), or dout itself without normalisation.
template <typename scalar_t, typename acc_t>
const acc_t* dout_tile(const LinearParams& p, const scalar_t* dO, int64_t do_stride, const scalar_t* O,
                       int64_t o_stride, const acc_t* den, int64_t rows, acc_t* scratch, int64_t* ld) {
  if (!p.normalize) return tile_as_acc<scalar_t, acc_t>(dO, rows, p.Dv, do_stride, scratch, ld);
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* dst = scratch + r * p.Dva;
    const acc_t d = den[r], inv = d == acc_t(0) ? acc_t(1) : acc_t(1) / d;
    acc_t dot = 0;
    for (int64_t c = 0; c < p.Dv; ++c) {
      const acc_t g = static_cast<acc_t>(dO[r * do_stride + c]);
      dot += g * static_cast<acc_t>(O[r * o_stride + c]);
      dst[c] = g * inv;
    }
    dst[p.Dv] = d == acc_t(0) ? acc_t(0) : -dot * inv;
  }
  *ld = p.Dva;
  return scratch;
}

// dX = dphi * phi'(x) * sqrt(scale) of a (rows, M) tile, phi the loaded feature tile.
template <typename scalar_t, typename acc_t>
void store_feature_grad(const LinearParams& p, const acc_t* dphi, const acc_t* phi, int64_t ldphi, int64_t rows,
                        scalar_t* dst, int64_t row_stride) {
  const acc_t root = static_cast<acc_t>(p.root);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < p.M; ++c)
      dst[r * row_stride + c] =
          static_cast<scalar_t>(dphi[r * p.M + c] * feature_grad(phi[r * ldphi + c], p.fmap) * root);
}

// A[i, j] = 0 for j > i in a row-major (n, n) block: keep what a causal query sees of its own chunk.
template <typename acc_t>
void keep_lower_triangle(acc_t* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) std::fill(a + i * n + i + 1, a + (i + 1) * n, acc_t(0));
}

// Scratch of one task: converted tiles (bfloat16/half inputs) and the products of a chunk.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> q, k, v, dout, block, out_m, out_dv, state, dstate, dstate_chunk;
  Scratch(const LinearParams& p)
      : q(p.chunk * p.M), k(p.chunk * p.M), v(p.chunk * p.Dva), dout(p.chunk * p.Dva), block(p.chunk * p.chunk),
        out_m(p.chunk * p.M), out_dv(p.chunk * p.Dva), state(p.M * p.Dva), dstate(p.M * p.Dva),
        dstate_chunk(p.M * p.Dva) {}
};

template <typename acc_t>
void load_state(const acc_t* src, int64_t offset, int64_t size, std::vector<acc_t>& dst) {
  if (src == nullptr) std::fill(dst.begin(), dst.begin() + size, acc_t(0));
  else std::copy(src + offset, src + offset + size, dst.begin());
}

// --------------------------------------------------------------------------- forward
template <typename scalar_t>
void linear_forward(const LinearParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor* s0, at::Tensor& out, at::Tensor& state, at::Tensor& den) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t M = p.M, Dv = p.Dva, T = p.chunk, num_chunks = ceil_div_i64(p.L, T);
  const auto Q = head_view<const scalar_t>(q), K = head_view<const scalar_t>(k), V = head_view<const scalar_t>(v);
  const auto O = head_view<scalar_t>(out);
  const acc_t* s0_data = s0 ? s0->const_data_ptr<acc_t>() : nullptr;  // contiguous (B, Hkv, M, Dv)
  acc_t* st_data = state.mutable_data_ptr<acc_t>();                   // contiguous (B, Hkv, M, Dva)
  acc_t* den_data = p.normalize ? den.mutable_data_ptr<acc_t>() : nullptr;  // contiguous (B, Hq, L)

  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> w(p);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.Hkv, hk = task % p.Hkv;
      acc_t* S = w.state.data();  // [M, Dv]
      load_state(s0_data, task * M * Dv, M * Dv, w.state);
      if (!p.causal) {  // the whole sequence's state first; then every query reads it
        for (int64_t c = 0; c < num_chunks; ++c) {
          const int64_t l0 = c * T, n = std::min(T, p.L - l0);
          int64_t ldk, ldv;
          const acc_t* Kc = feature_tile<scalar_t, acc_t>(p, K.at(b, hk, l0), n, K.sl, w.k.data(), &ldk);
          const acc_t* Vc = value_tile<scalar_t, acc_t>(p, V.at(b, hk, l0), n, V.sl, w.v.data(), &ldv);
          gemm(Trans::kYes, Trans::kNo, M, Dv, n, acc_t(1), Kc, ldk, Vc, ldv, acc_t(1), S, Dv);
        }
      }
      for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t l0 = c * T, n = std::min(T, p.L - l0);
        int64_t ldk = 0, ldv = 0;
        const acc_t *Kc = nullptr, *Vc = nullptr;
        if (p.causal) {
          Kc = feature_tile<scalar_t, acc_t>(p, K.at(b, hk, l0), n, K.sl, w.k.data(), &ldk);  // [n, M]
          Vc = value_tile<scalar_t, acc_t>(p, V.at(b, hk, l0), n, V.sl, w.v.data(), &ldv);    // [n, Dva]
        }
        for (int64_t g = 0; g < p.group; ++g) {
          const int64_t h = hk * p.group + g;
          int64_t ldq;
          const acc_t* Qc = feature_tile<scalar_t, acc_t>(p, Q.at(b, h, l0), n, Q.sl, w.q.data(), &ldq);  // [n, M]
          acc_t* Oc = w.out_dv.data();                                                                    // [n, Dva]
          gemm(Trans::kNo, Trans::kNo, n, Dv, M, acc_t(1), Qc, ldq, S, Dv, acc_t(0), Oc, Dv);
          if (p.causal) {
            acc_t* A = w.block.data();  // [n, n]
            gemm(Trans::kNo, Trans::kYes, n, n, M, acc_t(1), Qc, ldq, Kc, ldk, acc_t(0), A, n);
            keep_lower_triangle(A, n);
            gemm(Trans::kNo, Trans::kNo, n, Dv, n, acc_t(1), A, n, Vc, ldv, acc_t(1), Oc, Dv);
          }
          store_output(p, Oc, n, O.at(b, h, l0), O.sl, den_data ? den_data + (b * p.Hq + h) * p.L + l0 : nullptr);
        }
        if (p.causal) gemm(Trans::kYes, Trans::kNo, M, Dv, n, acc_t(1), Kc, ldk, Vc, ldv, acc_t(1), S, Dv);
      }
      std::copy(S, S + M * Dv, st_data + task * M * Dv);
    }
  });
}

// --------------------------------------------------------------------------- backward
template <typename scalar_t>
void linear_backward(const LinearParams& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor* out, const at::Tensor* den, const at::Tensor* s0,
                     const at::Tensor* dstate, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& ds0) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t M = p.M, Dv = p.Dva, T = p.chunk, num_chunks = ceil_div_i64(p.L, T);
  const auto Q = head_view<const scalar_t>(q), K = head_view<const scalar_t>(k), V = head_view<const scalar_t>(v);
  const auto dO = head_view<const scalar_t>(dout);
  const auto O = head_view<const scalar_t>(p.normalize ? *out : dout);  // read only when normalising
  const acc_t* den_data = p.normalize ? den->const_data_ptr<acc_t>() : nullptr;  // contiguous (B, Hq, L)
  const auto dQ = head_view<scalar_t>(dq), dK = head_view<scalar_t>(dk), dV = head_view<scalar_t>(dv);
  const acc_t* s0_data = s0 ? s0->const_data_ptr<acc_t>() : nullptr;
  const acc_t* dst_data = dstate ? dstate->const_data_ptr<acc_t>() : nullptr;
  acc_t* ds0_data = ds0.mutable_data_ptr<acc_t>();

  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> w(p);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.Hkv, hk = task % p.Hkv;
      acc_t *S = w.state.data(), *dH = w.dstate.data();  // [M, Dv] each
      load_state(s0_data, task * M * Dv, M * Dv, w.state);
      load_state(dst_data, task * M * Dv, M * Dv, w.dstate);
      auto kv_tiles = [&](int64_t l0, int64_t n, int64_t* ldk, int64_t* ldv) {
        return std::pair{feature_tile<scalar_t, acc_t>(p, K.at(b, hk, l0), n, K.sl, w.k.data(), ldk),
                         value_tile<scalar_t, acc_t>(p, V.at(b, hk, l0), n, V.sl, w.v.data(), ldv)};
      };
      auto do_tile = [&](int64_t h, int64_t l0, int64_t n, int64_t* lddo) {
        const acc_t* d = den_data ? den_data + (b * p.Hq + h) * p.L + l0 : nullptr;
        return dout_tile<scalar_t, acc_t>(p, dO.at(b, h, l0), dO.sl, O.at(b, h, l0), O.sl, d, n, w.dout.data(), lddo);
      };
      auto q_do_tiles = [&](int64_t h, int64_t l0, int64_t n, int64_t* ldq, int64_t* lddo) {
        return std::pair{feature_tile<scalar_t, acc_t>(p, Q.at(b, h, l0), n, Q.sl, w.q.data(), ldq),
                         do_tile(h, l0, n, lddo)};
      };

      if (!p.causal) {
        // S = S0 + K^T V and dH = dS + sum_group Q^T dO over the whole sequence
        for (int64_t c = 0; c < num_chunks; ++c) {
          const int64_t l0 = c * T, n = std::min(T, p.L - l0);
          int64_t ldk, ldv, ldq, lddo;
          auto [Kc, Vc] = kv_tiles(l0, n, &ldk, &ldv);
          gemm(Trans::kYes, Trans::kNo, M, Dv, n, acc_t(1), Kc, ldk, Vc, ldv, acc_t(1), S, Dv);
          for (int64_t g = 0; g < p.group; ++g) {
            auto [Qc, dOc] = q_do_tiles(hk * p.group + g, l0, n, &ldq, &lddo);
            gemm(Trans::kYes, Trans::kNo, M, Dv, n, acc_t(1), Qc, ldq, dOc, lddo, acc_t(1), dH, Dv);
          }
        }
        for (int64_t c = 0; c < num_chunks; ++c) {
          const int64_t l0 = c * T, n = std::min(T, p.L - l0);
          int64_t ldk, ldv, ldq, lddo;
          for (int64_t g = 0; g < p.group; ++g) {
            const int64_t h = hk * p.group + g;
            auto [Qc, dOc] = q_do_tiles(h, l0, n, &ldq, &lddo);
            gemm(Trans::kNo, Trans::kYes, n, M, Dv, acc_t(1), dOc, lddo, S, Dv, acc_t(0), w.out_m.data(), M);
            store_feature_grad(p, w.out_m.data(), Qc, ldq, n, dQ.at(b, h, l0), dQ.sl);
          }
          auto [Kc, Vc] = kv_tiles(l0, n, &ldk, &ldv);
          gemm(Trans::kNo, Trans::kYes, n, M, Dv, acc_t(1), Vc, ldv, dH, Dv, acc_t(0), w.out_m.data(), M);
          gemm(Trans::kNo, Trans::kNo, n, Dv, M, acc_t(1), Kc, ldk, dH, Dv, acc_t(0), w.out_dv.data(), Dv);
          store_feature_grad(p, w.out_m.data(), Kc, ldk, n, dK.at(b, hk, l0), dK.sl);
          store_tile(w.out_dv.data(), n, p.Dv, dV.at(b, hk, l0), dV.sl, Dv);
        }
        std::copy(dH, dH + M * Dv, ds0_data + task * M * Dv);
        continue;
      }

      // causal, forwards: dQ_c = dO_c S^T + tril(dO_c V_c^T) K_c with S the state before chunk c
      for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t l0 = c * T, n = std::min(T, p.L - l0);
        int64_t ldk, ldv, ldq, lddo;
        auto [Kc, Vc] = kv_tiles(l0, n, &ldk, &ldv);
        for (int64_t g = 0; g < p.group; ++g) {
          const int64_t h = hk * p.group + g;
          auto [Qc, dOc] = q_do_tiles(h, l0, n, &ldq, &lddo);  // Qc: phi(q) for the feature map's derivative
          acc_t* A = w.block.data();  // [n, n]: dO_i . v_j, kept for j <= i
          gemm(Trans::kNo, Trans::kYes, n, M, Dv, acc_t(1), dOc, lddo, S, Dv, acc_t(0), w.out_m.data(), M);
          gemm(Trans::kNo, Trans::kYes, n, n, Dv, acc_t(1), dOc, lddo, Vc, ldv, acc_t(0), A, n);
          keep_lower_triangle(A, n);
          gemm(Trans::kNo, Trans::kNo, n, M, n, acc_t(1), A, n, Kc, ldk, acc_t(1), w.out_m.data(), M);
          store_feature_grad(p, w.out_m.data(), Qc, ldq, n, dQ.at(b, h, l0), dQ.sl);
        }
        gemm(Trans::kYes, Trans::kNo, M, Dv, n, acc_t(1), Kc, ldk, Vc, ldv, acc_t(1), S, Dv);
      }
      // causal, backwards: dK, dV from dH (later chunks) plus the chunk's own block
      for (int64_t c = num_chunks - 1; c >= 0; --c) {
        const int64_t l0 = c * T, n = std::min(T, p.L - l0);
        int64_t ldk, ldv, ldq, lddo;
        auto [Kc, Vc] = kv_tiles(l0, n, &ldk, &ldv);
        acc_t *dKc = w.out_m.data(), *dVc = w.out_dv.data(), *dHc = w.dstate_chunk.data();
        gemm(Trans::kNo, Trans::kYes, n, M, Dv, acc_t(1), Vc, ldv, dH, Dv, acc_t(0), dKc, M);
        gemm(Trans::kNo, Trans::kNo, n, Dv, M, acc_t(1), Kc, ldk, dH, Dv, acc_t(0), dVc, Dv);
        std::fill(dHc, dHc + M * Dv, acc_t(0));
        for (int64_t g = 0; g < p.group; ++g) {
          auto [Qc, dOc] = q_do_tiles(hk * p.group + g, l0, n, &ldq, &lddo);
          acc_t* A = w.block.data();  // [n, n] over (query i, key j), kept for j <= i
          gemm(Trans::kNo, Trans::kYes, n, n, Dv, acc_t(1), dOc, lddo, Vc, ldv, acc_t(0), A, n);
          keep_lower_triangle(A, n);
          gemm(Trans::kYes, Trans::kNo, n, M, n, acc_t(1), A, n, Qc, ldq, acc_t(1), dKc, M);
          gemm(Trans::kNo, Trans::kYes, n, n, M, acc_t(1), Qc, ldq, Kc, ldk, acc_t(0), A, n);
          keep_lower_triangle(A, n);
          gemm(Trans::kYes, Trans::kNo, n, Dv, n, acc_t(1), A, n, dOc, lddo, acc_t(1), dVc, Dv);
          gemm(Trans::kYes, Trans::kNo, M, Dv, n, acc_t(1), Qc, ldq, dOc, lddo, acc_t(1), dHc, Dv);
        }
        store_feature_grad(p, dKc, Kc, ldk, n, dK.at(b, hk, l0), dK.sl);
        store_tile(dVc, n, p.Dv, dV.at(b, hk, l0), dV.sl, Dv);
        for (int64_t e = 0; e < M * Dv; ++e) dH[e] += dHc[e];
      }
      std::copy(dH, dH + M * Dv, ds0_data + task * M * Dv);
    }
  });
}

// --------------------------------------------------------------------------- ops: checks and allocation
// The kernels index rows through their stride but need unit-stride rows: other layouts are copied.
at::Tensor unit_last_stride(const at::Tensor& t) { return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous(); }

at::ScalarType state_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

LinearParams check_linear_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                 int64_t chunk_size, int64_t feature_map = kIdentity, bool normalize = false,
                                 double scale = 1.0) {
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the CPU kernel, got ", q.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "q must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(q.dim() == 4, "q must be 4-D (batch, heads, seqlen, features), got ", q.dim(), "-D");
  TORCH_CHECK(k.dim() == 4, "k must be 4-D (batch, heads, seqlen, features), got ", k.dim(), "-D");
  TORCH_CHECK(v.dim() == 4, "v must be 4-D (batch, heads, seqlen, head_dim_v), got ", v.dim(), "-D");
  TORCH_CHECK(k.scalar_type() == dtype, "k must have q's dtype ", dtype, ", got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == dtype, "v must have q's dtype ", dtype, ", got ", v.scalar_type());
  check_same_device(k, q, "k");
  check_same_device(v, q, "v");
  LinearParams p;
  p.B = q.size(0), p.Hq = q.size(1), p.L = q.size(2), p.M = q.size(3);
  p.Hkv = k.size(1), p.Dv = v.size(3), p.causal = causal;
  TORCH_CHECK(k.size(0) == p.B && k.size(2) == p.L && k.size(3) == p.M, "k must be (B, Hkv, L, M) = (", p.B,
              ", Hkv, ", p.L, ", ", p.M, "), got ", k.sizes());
  TORCH_CHECK(v.size(0) == p.B && v.size(1) == p.Hkv && v.size(2) == p.L, "v must be (B, Hkv, L, Dv) = (", p.B, ", ",
              p.Hkv, ", ", p.L, ", Dv), got ", v.sizes());
  TORCH_CHECK(p.Hkv > 0 && p.Hq % p.Hkv == 0, "the number of query heads (", p.Hq,
              ") must be a multiple of the number of key/value heads (", p.Hkv, ")");
  TORCH_CHECK(chunk_size > 0, "chunk_size must be positive, got ", chunk_size);
  p.group = p.Hq / p.Hkv;
  p.chunk = std::min<int64_t>(chunk_size, std::max<int64_t>(p.L, 1));  // a decode step stays O(M Dv)
  TORCH_CHECK(feature_map == kIdentity || feature_map == kEluPlusOne || feature_map == kRelu,
              "feature_map must be 0 (identity), 1 (elu+1) or 2 (relu), got ", feature_map);
  TORCH_CHECK(scale > 0, "scale must be positive, got ", scale);
  p.fmap = feature_map, p.normalize = normalize, p.root = std::sqrt(scale), p.Dva = p.Dv + (normalize ? 1 : 0);
  return p;
}

// A (B, Hkv, M, Dv) state argument as a contiguous tensor in the accumulation type.
OptTensor state_argument(const OptTensor& t, const LinearParams& p, const at::Tensor& q, const char* name) {
  if (!t.has_value()) return std::nullopt;
  check_same_device(*t, q, name);
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), name, " must be floating, got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == at::IntArrayRef({p.B, p.Hkv, p.M, p.Dva}), name,
              " must have shape (B, Hkv, M, Dv (+ 1 with normalize)) = (", p.B, ", ", p.Hkv, ", ", p.M, ", ", p.Dva,
              "), got ", t->sizes());
  return t->to(state_dtype(q)).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_fused_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const OptTensor& initial_state,
    bool causal, int64_t chunk_size, int64_t feature_map, bool normalize, double scale) {
  const LinearParams p = check_linear_inputs(q_in, k_in, v_in, causal, chunk_size, feature_map, normalize, scale);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const OptTensor s0 = state_argument(initial_state, p, q, "initial_state");
  at::Tensor out = at::empty({p.B, p.Hq, p.L, p.Dv}, q.options());
  at::Tensor state = at::empty({p.B, p.Hkv, p.M, p.Dva}, q.options().dtype(state_dtype(q)));
  at::Tensor den = at::empty({p.B, p.Hq, normalize ? p.L : 0}, q.options().dtype(state_dtype(q)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn_linear_attention_fwd_cpu", [&] {
    linear_forward<scalar_t>(p, q, k, v, s0 ? &*s0 : nullptr, out, state, den);
  });
  return {out, state, den};
}

std::tuple<at::Tensor, at::Tensor> linear_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const OptTensor& initial_state,
                                                            bool causal, int64_t chunk_size) {
  auto [out, state, den] = linear_attention_fused_fwd_cpu(q, k, v, initial_state, causal, chunk_size, kIdentity,
                                                          false, 1.0);
  return {out, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_attention_fused_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& den_in, const OptTensor& initial_state, const OptTensor& dstate,
    bool causal, int64_t chunk_size, int64_t feature_map, bool normalize, double scale) {
  const LinearParams p = check_linear_inputs(q_in, k_in, v_in, causal, chunk_size, feature_map, normalize, scale);
  TORCH_CHECK(dout_in.scalar_type() == q_in.scalar_type(), "dout must have q's dtype ", q_in.scalar_type(), ", got ",
              dout_in.scalar_type());
  check_same_device(dout_in, q_in, "dout");
  TORCH_CHECK(dout_in.sizes() == at::IntArrayRef({p.B, p.Hq, p.L, p.Dv}), "dout must have shape (B, Hq, L, Dv) = (",
              p.B, ", ", p.Hq, ", ", p.L, ", ", p.Dv, "), got ", dout_in.sizes());
  at::Tensor out, den;
  if (normalize) {
    check_same_device(out_in, q_in, "out");
    check_same_device(den_in, q_in, "denom");
    TORCH_CHECK(out_in.scalar_type() == q_in.scalar_type() && out_in.sizes() == dout_in.sizes(),
                "out must be the forward's output, (B, Hq, L, Dv) in q's dtype, got ", out_in.sizes(), " ",
                out_in.scalar_type());
    TORCH_CHECK(den_in.sizes() == at::IntArrayRef({p.B, p.Hq, p.L}), "denom must have shape (B, Hq, L) = (", p.B,
                ", ", p.Hq, ", ", p.L, "), got ", den_in.sizes());
    out = unit_last_stride(out_in);
    den = den_in.to(state_dtype(q_in)).contiguous();
  }
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor dout = unit_last_stride(dout_in);
  const OptTensor s0 = state_argument(initial_state, p, q, "initial_state");
  const OptTensor dst = state_argument(dstate, p, q, "dstate");
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor ds0 = at::empty({p.B, p.Hkv, p.M, p.Dva}, q.options().dtype(state_dtype(q)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn_linear_attention_bwd_cpu", [&] {
    linear_backward<scalar_t>(p, dout, q, k, v, normalize ? &out : nullptr, normalize ? &den : nullptr,
                              s0 ? &*s0 : nullptr, dst ? &*dst : nullptr, dq, dk, dv, ds0);
  });
  return {dq, dk, dv, ds0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const OptTensor& initial_state, const OptTensor& dstate, bool causal, int64_t chunk_size) {
  return linear_attention_fused_bwd_cpu(dout, q, k, v, dout, dout, initial_state, dstate, causal, chunk_size,
                                        kIdentity, false, 1.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("linear_attention_fwd", &linear_attention_fwd_cpu);
  m.impl("linear_attention_bwd", &linear_attention_bwd_cpu);
  m.impl("linear_attention_fused_fwd", &linear_attention_fused_fwd_cpu);
  m.impl("linear_attention_fused_bwd", &linear_attention_fused_bwd_cpu);
}

}  // namespace fastattn::cpu
