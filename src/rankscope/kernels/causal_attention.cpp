// Causal GQA attention with a head dim of 8, forward and backward, for rankscope.kernels.causal_attention.
// Exact softmax attention (no approximation): forward keeps the log-sum-exp per query, backward recomputes
// the probabilities from it (as flash attention does). q, dq (B, H, T, D); k, v and their gradients transposed
// and zero padded, (B, KV, D, Tp) with Tp a multiple of 16. Vectors are 64 bytes (16 fp32 or 8 fp64 lanes, GCC/
// Clang vector extensions: AVX-512 where the CPU has it, two AVX2 halves elsewhere); exp is a polynomial on them
// (`vexp`). Forward: a block of consecutive queries of one head in the lanes, the keys one at a time (their 8
// values broadcast), so no horizontal sums; the scores of the first pass (their running max) are kept for the
// second (probabilities, their sum, the weighted values). Backward: the keys in the lanes, whole blocks of them
// (no scalar remainders; a query's future lanes are zeroed), one pass per block doing all of its work (scores,
// probabilities, dP, dV, dS, dQ, dK) for 4 consecutive query rows at once, which share the block's loads and
// one read-modify-write of dK^T and dV^T. Query head h reads key/value head
// h / (H / KV). Backward runs parallel over (batch, KV head), so each task owns its dk, dv rows (no races);
// forward over (batch, head).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <algorithm>
#include <vector>

constexpr int D = 8;
constexpr int PAD = 16;  // keys padded to a multiple of this (a multiple of every lane count below)
constexpr int ROWS = 4;  // backward: consecutive query rows per pass over the keys (by hand, fp32, T = 128: 2 rows took
                         // 0.88x the time of 1, 4 rows 0.75x, 8 no less than 4)

template <typename S> struct V;  // one 64-byte vector of S, and the constants of its exp
template <> struct V<float> {
  typedef float v __attribute__((vector_size(64)));
  typedef int32_t vi __attribute__((vector_size(64)));
  static constexpr int N = 16;
  static constexpr float lo = -87.0f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;  // Cephes' split of ln 2
  static constexpr int bias = 127, mantissa = 23, degree = 7;
};
template <> struct V<double> {
  typedef double v __attribute__((vector_size(64)));
  typedef int64_t vi __attribute__((vector_size(64)));
  static constexpr int N = 8;
  static constexpr double lo = -708.0, ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  static constexpr int bias = 1023, mantissa = 52, degree = 13;
};

template <typename S> static inline typename V<S>::v load(const S* p) { typename V<S>::v x; std::memcpy(&x, p, sizeof x); return x; }
template <typename S> static inline void store(S* p, typename V<S>::v x) { std::memcpy(p, &x, sizeof x); }
template <typename S> static inline S hsum(typename V<S>::v x) { S a = 0; for (int l = 0; l < V<S>::N; ++l) a += x[l]; return a; }

// exp(x) for x <= about 0 (scores minus their max or log-sum-exp): x = n ln2 + r, |r| <= ln2 / 2, e^r by its
// Taylor series (degree 7 in fp32, 13 in fp64: truncation under the type's epsilon; Horner, 1 / k! rounded to
// S), times 2^n built in the exponent bits. Clamped below where 2^n stays normal (e^-87 in fp32, e^-708 in fp64):
// the callers zero the masked lanes themselves. A NaN stays NaN (r is NaN).
template <typename S>
static inline typename V<S>::v vexp(typename V<S>::v x) {
  using T = V<S>; using v = typename T::v; using vi = typename T::vi;
  x = x < T::lo ? v{} + T::lo : x;
  const vi n = __builtin_convertvector(x * S(1.4426950408889634) - S(0.5), vi);
  const v nf = __builtin_convertvector(n, v);
  const v r = (x - nf * T::ln2_hi) - nf * T::ln2_lo;
  S fact = 1;
  for (int k = 2; k <= T::degree; ++k) fact *= S(k);
  v p = v{} + S(1) / fact;
  for (int k = T::degree; k >= 1; --k) {
    fact /= S(k);  // (k - 1)!
    p = p * r + S(1) / fact;
  }
  const vi bits = (n + T::bias) << T::mantissa;
  v scale; std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Forward with the queries in the vector lanes (a block of N consecutive queries of one head; keys one at a
// time, their 8 values broadcast): no horizontal sums. Two passes over the keys: the scores and each query's
// running max (kept in sbuf), then the probabilities, their sum and the weighted values. Query lanes before a
// key's position are masked.
template <typename S>
static void fwd_kernel(const S* q, const S* kt, const S* vt, S* o, S* lse, int64_t B, int64_t H, int64_t KV, int64_t T,
                       int64_t Tp, S scale) {
  using v = typename V<S>::v; constexpr int N = V<S>::N;
  const int64_t g = H / KV;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<v> sbuf(T);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, kv = h / g;
      const S* K = kt + (b * KV + kv) * D * Tp;
      const S* Vt = vt + (b * KV + kv) * D * Tp;
      const S* Q = q + (b * H + h) * T * D;
      S* O = o + (b * H + h) * T * D;
      S* L = lse + (b * H + h) * T;
      for (int64_t i0 = 0; i0 < T; i0 += N) {
        const int nq = (int)std::min<int64_t>(N, T - i0);
        v qv[D] = {};
        for (int l = 0; l < nq; ++l)
          for (int d = 0; d < D; ++d) qv[d][l] = Q[(i0 + l) * D + d] * scale;
        const int64_t nk = i0 + nq;  // keys 0 .. nk - 1 reach some query of the block
        v iq;  // each lane's query position
        for (int l = 0; l < N; ++l) iq[l] = S(i0 + l);
        v m = v{} - S(1e30);
        for (int64_t j = 0; j < nk; ++j) {
          v s0 = qv[0] * K[j], s1 = qv[1] * K[Tp + j];
          for (int d = 2; d < D; d += 2) { s0 += qv[d] * K[d * Tp + j]; s1 += qv[d + 1] * K[(d + 1) * Tp + j]; }
          v s = s0 + s1;
          if (j > i0) s = iq >= S(j) ? s : v{} - S(1e30);
          sbuf[j] = s;
          m = s > m ? s : m;
        }
        v lsum = {}, acc[D] = {};
        for (int64_t j = 0; j < nk; ++j) {
          v p = vexp<S>(sbuf[j] - m);
          if (j > i0) p = iq >= S(j) ? p : v{};
          lsum += p;
          for (int d = 0; d < D; ++d) acc[d] += p * Vt[d * Tp + j];
        }
        const v inv = S(1) / lsum;
        for (int d = 0; d < D; ++d) acc[d] *= inv;
        for (int l = 0; l < nq; ++l) {
          for (int d = 0; d < D; ++d) O[(i0 + l) * D + d] = acc[d][l];
          L[i0 + l] = m[l] + std::log(lsum[l]);
        }
      }
    }
  });
}

// Backward of R consecutive query rows i .. i + R - 1 of one head: they share each key block's loads of K^T and
// V^T and one read-modify-write of dK^T and dV^T.
template <typename S, int R>
static inline void bwd_rows(const S* Q, const S* O, const S* L, const S* dO, S* dQ, const S* K, const S* Vt, S* dK, S* dV,
                            int64_t i, int64_t Tp, S scale) {
  using v = typename V<S>::v; constexpr int N = V<S>::N;
  const int64_t last = i + R - 1, nb = last / N + 1;
  S qs[R][D], qi[R][D], doi[R][D], Di[R], li[R];
  for (int r = 0; r < R; ++r) {
    Di[r] = 0;
    for (int d = 0; d < D; ++d) {
      qi[r][d] = Q[(i + r) * D + d]; qs[r][d] = qi[r][d] * scale; doi[r][d] = dO[(i + r) * D + d];
      Di[r] += doi[r][d] * O[(i + r) * D + d];
    }
    li[r] = L[i + r];
  }
  v acc[R][D] = {};
  for (int64_t bj = 0; bj < nb; ++bj) {
    const int64_t j0 = bj * N;
    v p[R], ds[R];
    for (int r = 0; r < R; ++r) {
      v s0 = qs[r][0] * load(K + j0), s1 = qs[r][1] * load(K + Tp + j0);
      for (int d = 2; d < D; d += 2) { s0 += qs[r][d] * load(K + d * Tp + j0); s1 += qs[r][d + 1] * load(K + (d + 1) * Tp + j0); }
      p[r] = vexp<S>(s0 + s1 - li[r]);
      if (j0 + N - 1 > i + r) for (int l = 0; l < N; ++l) if (j0 + l > i + r) p[r][l] = 0;
    }
    for (int r = 0; r < R; ++r) {
      v d0 = doi[r][0] * load(Vt + j0), d1 = doi[r][1] * load(Vt + Tp + j0);
      for (int d = 2; d < D; d += 2) { d0 += doi[r][d] * load(Vt + d * Tp + j0); d1 += doi[r][d + 1] * load(Vt + (d + 1) * Tp + j0); }
      ds[r] = p[r] * (d0 + d1 - Di[r]) * scale;
    }
    for (int d = 0; d < D; ++d) {
      const v kd = load(K + d * Tp + j0);
      v dv = load(dV + d * Tp + j0), dk = load(dK + d * Tp + j0);
      for (int r = 0; r < R; ++r) { dv += p[r] * doi[r][d]; dk += ds[r] * qi[r][d]; acc[r][d] += ds[r] * kd; }
      store(dV + d * Tp + j0, dv);
      store(dK + d * Tp + j0, dk);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int d = 0; d < D; ++d) dQ[(i + r) * D + d] = hsum<S>(acc[r][d]);
}

template <typename S>
static void bwd_kernel(const S* q, const S* kt, const S* vt, const S* o, const S* lse, const S* dout, S* dq, S* dkt, S* dvt,
                       int64_t B, int64_t H, int64_t KV, int64_t T, int64_t Tp, S scale) {
  const int64_t g = H / KV;
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KV, kv = task % KV;
      const S* K = kt + (b * KV + kv) * D * Tp;
      const S* Vt = vt + (b * KV + kv) * D * Tp;
      S* dK = dkt + (b * KV + kv) * D * Tp;
      S* dV = dvt + (b * KV + kv) * D * Tp;
      for (int64_t h = kv * g; h < (kv + 1) * g; ++h) {
        const int64_t off = (b * H + h) * T;
        int64_t i = 0;
        for (; i + ROWS <= T; i += ROWS)
          bwd_rows<S, ROWS>(q + off * D, o + off * D, lse + off, dout + off * D, dq + off * D, K, Vt, dK, dV, i, Tp, scale);
        for (; i < T; ++i)
          bwd_rows<S, 1>(q + off * D, o + off * D, lse + off, dout + off * D, dq + off * D, K, Vt, dK, dV, i, Tp, scale);
      }
    }
  });
}

std::vector<torch::Tensor> fwd(torch::Tensor q, torch::Tensor kt, torch::Tensor vt, double scale) {
  const auto B = q.size(0), H = q.size(1), T = q.size(2), KV = kt.size(1), Tp = kt.size(3);
  TORCH_CHECK(q.size(3) == D && H % KV == 0 && Tp % PAD == 0 && Tp >= T && q.is_contiguous() && kt.is_contiguous() && vt.is_contiguous(),
              "causal_attention: head dim 8, keys padded to a multiple of 16, contiguous inputs");
  auto o = torch::empty_like(q);
  auto lse = torch::empty({B, H, T}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_attention_fwd", [&] {
    fwd_kernel<scalar_t>(q.data_ptr<scalar_t>(), kt.data_ptr<scalar_t>(), vt.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                         lse.data_ptr<scalar_t>(), B, H, KV, T, Tp, (scalar_t)scale);
  });
  return {o, lse};
}

std::vector<torch::Tensor> bwd(torch::Tensor q, torch::Tensor kt, torch::Tensor vt, torch::Tensor o, torch::Tensor lse,
                               torch::Tensor dout, double scale) {
  const auto B = q.size(0), H = q.size(1), T = q.size(2), KV = kt.size(1), Tp = kt.size(3);
  TORCH_CHECK(dout.is_contiguous() && o.is_contiguous() && lse.is_contiguous(), "causal_attention: contiguous inputs");
  auto dq = torch::empty_like(q);
  auto dkt = torch::zeros_like(kt), dvt = torch::zeros_like(vt);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_attention_bwd", [&] {
    bwd_kernel<scalar_t>(q.data_ptr<scalar_t>(), kt.data_ptr<scalar_t>(), vt.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                         lse.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(), dkt.data_ptr<scalar_t>(),
                         dvt.data_ptr<scalar_t>(), B, H, KV, T, Tp, (scalar_t)scale);
  });
  return {dq, dkt, dvt};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd);
  m.def("bwd", &bwd);
}
