// Dropout keep masks from Philox4x32-10 (Salmon, Moraes, Dror & Shaw, SC'11; Random123's algorithm and constants),
// for rankscope.kernels.dropout_mask. Counter based: element e of a mask depends only on (seed, e), so the mask is
// written in one vectorised pass with no generator state. The key is (seed & 0xffffffff, seed >> 32).
// Element e is kept (value `scale`) iff its 24-bit uniform U = u2 2^16 + u1 2^8 + u0 is >= `threshold`, else 0:
// with threshold = ceil(p 2^24) that is exactly the distribution of `torch.rand(...) >= p` in fp32 (a 24-bit
// uniform), element by element independent. U's three bytes come from three independent Philox streams, and the
// comparison reads them most significant first, stopping at the first byte that differs from the threshold's,
// so one byte decides 255 elements in 256 and a 32-bit word serves 4 elements:
//   layout: the elements come in blocks of 256; block b, lane l (0-15) at level k (0, 1, 2 for u2, u1, u0) is the
//   counter (16 b + l as 64 bits, low word first, then k, 0); byte j (bits 8 j to 8 j + 7) of its output word w
//   is that level's byte of element 256 b + 64 w + 16 j + l. Levels 1 and 2 are computed only for blocks where
//   some element is still undecided (about 63% and 0.4% of blocks at thresholds below 2^24).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>

typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint64_t u64x8 __attribute__((vector_size(64)));

constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;

// (hi, lo) of the 32 x 32 -> 64-bit products m * a, lane by lane: even lanes zero-extended in place, odd ones
// shifted down, each a 64-bit multiply of two 32-bit values (one vpmuludq on AVX-512 or AVX2).
static inline void mulhilo(uint32_t m, u32x16 a, u32x16& hi, u32x16& lo) {
  const u64x8 w = (u64x8)a, low = u64x8{} + 0xffffffffull;
  const u64x8 pe = (w & low) * (uint64_t)m, po = (w >> 32) * (uint64_t)m;
  lo = (u32x16)((pe & low) | (po << 32));
  hi = (u32x16)((pe >> 32) | (po & ~low));
}

// Philox4x32-10 of 16 counters at once: c0..c3 the counters' words, (k0, k1) the key; the outputs in place.
static inline void philox16(u32x16& c0, u32x16& c1, u32x16& c2, u32x16& c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    u32x16 hi0, lo0, hi1, lo1;
    mulhilo(M0, c0, hi0, lo0);
    mulhilo(M1, c2, hi1, lo1);
    const u32x16 n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += W0; k1 += W1;
  }
}

// dst[l] = scale where keep[l] (all ones), else 0, for 16 lanes.
template <typename S> static inline void store_kept(S* dst, u32x16 keep, S scale) {
  for (int l = 0; l < 16; ++l) dst[l] = keep[l] ? scale : S(0);
}
template <> inline void store_kept<float>(float* dst, u32x16 keep, float scale) {
  uint32_t bits; std::memcpy(&bits, &scale, 4);
  const u32x16 out = keep & bits;
  std::memcpy(dst, &out, sizeof out);
}

// Level k's 64 words of block b (16 lanes x 4 words).
static inline void block_words(uint64_t b, uint32_t level, uint32_t k0, uint32_t k1, u32x16 words[4]) {
  const uint64_t base = b * 16;
  const u32x16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  u32x16 c0 = (uint32_t)base + iota, c1 = u32x16{} + (uint32_t)(base >> 32), c2 = u32x16{} + level, c3 = {};
  philox16(c0, c1, c2, c3, k0, k1);
  words[0] = c0; words[1] = c1; words[2] = c2; words[3] = c3;
}

template <typename S>
static void fill_mask(S* out, int64_t n, uint64_t seed, uint32_t threshold, S scale) {
  const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  const uint32_t t[3] = {threshold >> 16, (threshold >> 8) & 0xff, threshold & 0xff};  // threshold 2^24: t[0] = 256, none kept
  const int64_t blocks = (n + 255) / 256;
  at::parallel_for(0, blocks, 64, [&](int64_t begin, int64_t end) {
    S tail[256];
    u32x16 keep[16], open[16];  // per group g = 4 w + j: decided-kept lanes, lanes still equal to the threshold so far
    for (int64_t b = begin; b < end; ++b) {
      u32x16 any = {};
      for (uint32_t level = 0; level < 3; ++level) {
        if (level > 0) {  // a later byte only where an element is still undecided
          uint32_t undecided = 0;
          for (int l = 0; l < 16; ++l) undecided |= any[l];
          if (!undecided) break;
          any = u32x16{};
        }
        u32x16 words[4];
        block_words((uint64_t)b, level, k0, k1, words);
        const bool last = level == 2;  // the last byte: equal means kept (U >= threshold)
        for (int g = 0; g < 16; ++g) {
          const u32x16 byte = (words[g >> 2] >> (8 * (g & 3))) & 0xffu;
          const u32x16 above = (u32x16)(byte > t[level]), equal = (u32x16)(byte == t[level]);
          if (level == 0) {
            keep[g] = above;
            open[g] = equal;
          } else {
            keep[g] |= open[g] & above;
            open[g] &= equal;
          }
          if (last) keep[g] |= open[g];
          any |= open[g];
        }
      }
      S* dst = (b * 256 + 256 <= n) ? out + b * 256 : tail;
      for (int g = 0; g < 16; ++g) store_kept(dst + 16 * g, keep[g], scale);
      if (dst == tail) std::memcpy(out + b * 256, tail, sizeof(S) * (n - b * 256));
    }
  });
}

torch::Tensor mask(int64_t n, int64_t seed, int64_t threshold, double scale, torch::ScalarType dtype) {
  TORCH_CHECK(n >= 0 && threshold >= 0 && threshold <= (1 << 24), "dropout_mask: n >= 0, threshold in [0, 2^24]");
  auto out = torch::empty({n}, torch::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, dtype, "dropout_mask", [&] {
    fill_mask<scalar_t>(out.data_ptr<scalar_t>(), n, (uint64_t)seed, (uint32_t)threshold, (scalar_t)scale);
  });
  return out;
}

// Philox4x32-10 of single counters (n x 4 words) under one key, for the known-answer tests.
torch::Tensor philox(torch::Tensor counters, int64_t k0, int64_t k1) {
  TORCH_CHECK(counters.scalar_type() == torch::kInt64 && counters.dim() == 2 && counters.size(1) == 4, "philox: (n, 4) int64 counters");
  auto c = counters.contiguous();
  auto out = torch::empty_like(c);
  const int64_t* src = c.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.size(0); ++i) {
    u32x16 c0 = {}, c1 = {}, c2 = {}, c3 = {};
    c0[0] = (uint32_t)src[4 * i]; c1[0] = (uint32_t)src[4 * i + 1]; c2[0] = (uint32_t)src[4 * i + 2]; c3[0] = (uint32_t)src[4 * i + 3];
    philox16(c0, c1, c2, c3, (uint32_t)k0, (uint32_t)k1);
    dst[4 * i] = c0[0]; dst[4 * i + 1] = c1[0]; dst[4 * i + 2] = c2[0]; dst[4 * i + 3] = c3[0];
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mask", &mask);
  m.def("philox", &philox);
}
