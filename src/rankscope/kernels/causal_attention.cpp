// Causal GQA attention with a head dim of 8, forward and backward, for rankscope.kernels.causal_attention.
// Exact softmax attention (no approximation): forward keeps the log-sum-exp per query, backward recomputes
// the probabilities from it (as flash attention does). q, dq (B, H, T, D); k, v and their gradients transposed,
// (B, KV, D, T), so that the loops over keys run over contiguous memory and vectorise (forward: the D = 8
// products unrolled inside them; backward: one row of K^T or V^T per pass, measured faster there). Query head h reads key/value head h / (H / KV). Parallel over (batch, KV head): each
// task owns its dk, dv rows (no races).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

constexpr int D = 8;

template <typename scalar_t>
static void fwd_kernel(const scalar_t* q, const scalar_t* kt, const scalar_t* vt, scalar_t* o, scalar_t* lse,
                       int64_t B, int64_t H, int64_t KV, int64_t T, scalar_t scale) {
  const int64_t g = H / KV;
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> s(T);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KV, kv = task % KV;
      const scalar_t* K = kt + (b * KV + kv) * D * T;
      const scalar_t* V = vt + (b * KV + kv) * D * T;
      for (int64_t h = kv * g; h < (kv + 1) * g; ++h) {
        const scalar_t* Q = q + (b * H + h) * T * D;
        scalar_t* O = o + (b * H + h) * T * D;
        scalar_t* L = lse + (b * H + h) * T;
        for (int64_t i = 0; i < T; ++i) {
          const int64_t n = i + 1;
          scalar_t qi[D];
          for (int d = 0; d < D; ++d) qi[d] = Q[i * D + d] * scale;
          scalar_t m = -1e30;
          for (int64_t j = 0; j < n; ++j) {
            scalar_t acc = 0;
            for (int d = 0; d < D; ++d) acc += qi[d] * K[d * T + j];
            s[j] = acc;
            m = acc > m ? acc : m;
          }
          scalar_t l = 0;
          for (int64_t j = 0; j < n; ++j) { s[j] = std::exp(s[j] - m); l += s[j]; }
          const scalar_t inv = scalar_t(1) / l;
          scalar_t acc[D] = {0};
          for (int64_t j = 0; j < n; ++j)
            for (int d = 0; d < D; ++d) acc[d] += s[j] * V[d * T + j];
          for (int d = 0; d < D; ++d) O[i * D + d] = acc[d] * inv;
          L[i] = m + std::log(l);
        }
      }
    }
  });
}

template <typename scalar_t>
static void bwd_kernel(const scalar_t* q, const scalar_t* kt, const scalar_t* vt, const scalar_t* o, const scalar_t* lse,
                       const scalar_t* dout, scalar_t* dq, scalar_t* dkt, scalar_t* dvt,
                       int64_t B, int64_t H, int64_t KV, int64_t T, scalar_t scale) {
  const int64_t g = H / KV;
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> p(T), ds(T);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KV, kv = task % KV;
      const scalar_t* K = kt + (b * KV + kv) * D * T;
      const scalar_t* V = vt + (b * KV + kv) * D * T;
      scalar_t* dK = dkt + (b * KV + kv) * D * T;
      scalar_t* dV = dvt + (b * KV + kv) * D * T;
      for (int64_t h = kv * g; h < (kv + 1) * g; ++h) {
        const scalar_t* Q = q + (b * H + h) * T * D;
        const scalar_t* O = o + (b * H + h) * T * D;
        const scalar_t* L = lse + (b * H + h) * T;
        const scalar_t* dO = dout + (b * H + h) * T * D;
        scalar_t* dQ = dq + (b * H + h) * T * D;
        for (int64_t i = 0; i < T; ++i) {
          const int64_t n = i + 1;
          scalar_t qs[D], qi[D], doi[D];
          scalar_t Di = 0;
          for (int d = 0; d < D; ++d) {
            qi[d] = Q[i * D + d]; qs[d] = qi[d] * scale; doi[d] = dO[i * D + d]; Di += doi[d] * O[i * D + d];
          }
          const scalar_t li = L[i];
          for (int64_t j = 0; j < n; ++j) p[j] = 0;
          for (int d = 0; d < D; ++d) {  // scores, one contiguous row of K^T at a time
            const scalar_t* Kd = K + d * T; const scalar_t qd = qs[d];
            for (int64_t j = 0; j < n; ++j) p[j] += qd * Kd[j];
          }
          for (int64_t j = 0; j < n; ++j) p[j] = std::exp(p[j] - li);
          for (int64_t j = 0; j < n; ++j) ds[j] = 0;
          for (int d = 0; d < D; ++d) {  // dP = dO V^T and dV += p dO
            const scalar_t* Vd = V + d * T; scalar_t* dVd = dV + d * T; const scalar_t dd = doi[d];
            for (int64_t j = 0; j < n; ++j) { ds[j] += dd * Vd[j]; dVd[j] += p[j] * dd; }
          }
          for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - Di) * scale;
          scalar_t acc[D];
          for (int d = 0; d < D; ++d) {  // dQ = dS K, dK += dS^T q
            const scalar_t* Kd = K + d * T; scalar_t* dKd = dK + d * T; const scalar_t qd = qi[d];
            scalar_t a = 0;
            for (int64_t j = 0; j < n; ++j) { a += ds[j] * Kd[j]; dKd[j] += ds[j] * qd; }
            acc[d] = a;
          }
          for (int d = 0; d < D; ++d) dQ[i * D + d] = acc[d];
        }
      }
    }
  });
}

std::vector<torch::Tensor> fwd(torch::Tensor q, torch::Tensor kt, torch::Tensor vt, double scale) {
  const auto B = q.size(0), H = q.size(1), T = q.size(2), KV = kt.size(1);
  TORCH_CHECK(q.size(3) == D && H % KV == 0 && q.is_contiguous() && kt.is_contiguous() && vt.is_contiguous(),
              "causal_attention: head dim 8, contiguous inputs");
  auto o = torch::empty_like(q);
  auto lse = torch::empty({B, H, T}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_attention_fwd", [&] {
    fwd_kernel<scalar_t>(q.data_ptr<scalar_t>(), kt.data_ptr<scalar_t>(), vt.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                         lse.data_ptr<scalar_t>(), B, H, KV, T, (scalar_t)scale);
  });
  return {o, lse};
}

std::vector<torch::Tensor> bwd(torch::Tensor q, torch::Tensor kt, torch::Tensor vt, torch::Tensor o, torch::Tensor lse,
                               torch::Tensor dout, double scale) {
  const auto B = q.size(0), H = q.size(1), T = q.size(2), KV = kt.size(1);
  TORCH_CHECK(dout.is_contiguous() && o.is_contiguous() && lse.is_contiguous(), "causal_attention: contiguous inputs");
  auto dq = torch::empty_like(q);
  auto dkt = torch::zeros_like(kt), dvt = torch::zeros_like(vt);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_attention_bwd", [&] {
    bwd_kernel<scalar_t>(q.data_ptr<scalar_t>(), kt.data_ptr<scalar_t>(), vt.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                         lse.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(), dkt.data_ptr<scalar_t>(),
                         dvt.data_ptr<scalar_t>(), B, H, KV, T, (scalar_t)scale);
  });
  return {dq, dkt, dvt};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd);
  m.def("bwd", &bwd);
}
