// A whole decode step of a Llama-family model with int8 weight-only linears, in one C++ call.
//
// Why: a decode step of a 135M model on CPU is bound by per-op dispatch (hundreds of small torch ops
// per token) and by torch's M=1 int8 kernels, which stream well below memory bandwidth. Here every
// layer is plain loops: RMSNorm, an AVX2 int8 GEMV (float32 activations, per-output-row scale, several
// rows and accumulators at once so FMA latency is hidden), RoPE on interleaved pairs, the new K/V
// written to the paged cache, attention over the sequence's slots, SwiGLU. Output rows are split over
// threads with at::parallel_for (torch's own thread pool and thread count).
//
// Layouts (same as engine/model.py): qkv rows are [q (nh*hd) | k (nkv*hd) | v (nkv*hd)] with q/k in
// interleaved RoPE pair order; gate_up rows are [gate (I) | up (I)]; the cache is
// [layers, slots, nkv, hd] float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define AGENTRT_AVX2 1
#endif

namespace {

#ifdef AGENTRT_AVX2
inline __m256 load_i8(const int8_t* p) {  // 8 int8 -> 8 float
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

inline float dot_i8(const int8_t* w, const float* x, int64_t k0, int64_t K) {
  float s = 0.f;
  for (int64_t k = k0; k < K; ++k) s += float(w[k]) * x[k];
  return s;
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef AGENTRT_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
  }
  s = hsum(_mm256_add_ps(a0, a1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy_f32(float a, const float* x, float* y, int64_t n) {  // y += a * x
  int64_t i = 0;
#ifdef AGENTRT_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

// Y[m, n] (+)= S[n] * dot(W[n, :], X[m, :]) + bias[n] for rows n in [n0, n1); W [N, K] int8, X [M, K].
void gemv_rows(const int8_t* W, const float* S, const float* bias, const float* X, float* Y, int64_t M,
               int64_t K, int64_t ldy, bool accumulate, int64_t n0, int64_t n1) {
  int64_t n = n0;
  auto put = [&](int64_t m, int64_t row, float dot) {
    float v = dot * S[row] + (bias ? bias[row] : 0.f);
    float& y = Y[m * ldy + row];
    y = accumulate ? y + v : v;
  };
#ifdef AGENTRT_AVX2
  const int64_t K16 = K & ~int64_t(15);
  for (; n + 4 <= n1; n += 4) {  // 4 rows x 2 accumulators: 8 independent FMA chains
    const int8_t* w0 = W + n * K;
    const int8_t* w1 = w0 + K;
    const int8_t* w2 = w1 + K;
    const int8_t* w3 = w2 + K;
    for (int64_t m = 0; m < M; ++m) {  // the 4 rows (4K bytes) stay in L1 across the batch rows
      const float* x = X + m * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      for (int64_t k = 0; k < K16; k += 16) {
        const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        a0 = _mm256_fmadd_ps(load_i8(w0 + k), x0, a0);
        a1 = _mm256_fmadd_ps(load_i8(w0 + k + 8), x1, a1);
        a2 = _mm256_fmadd_ps(load_i8(w1 + k), x0, a2);
        a3 = _mm256_fmadd_ps(load_i8(w1 + k + 8), x1, a3);
        a4 = _mm256_fmadd_ps(load_i8(w2 + k), x0, a4);
        a5 = _mm256_fmadd_ps(load_i8(w2 + k + 8), x1, a5);
        a6 = _mm256_fmadd_ps(load_i8(w3 + k), x0, a6);
        a7 = _mm256_fmadd_ps(load_i8(w3 + k + 8), x1, a7);
      }
      put(m, n, hsum(_mm256_add_ps(a0, a1)) + dot_i8(w0, x, K16, K));
      put(m, n + 1, hsum(_mm256_add_ps(a2, a3)) + dot_i8(w1, x, K16, K));
      put(m, n + 2, hsum(_mm256_add_ps(a4, a5)) + dot_i8(w2, x, K16, K));
      put(m, n + 3, hsum(_mm256_add_ps(a6, a7)) + dot_i8(w3, x, K16, K));
    }
  }
#endif
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) put(m, n, dot_i8(W + n * K, X + m * K, 0, K));
}

// Y [M, N] (+)= X [M, K] @ (W * S[:, None]).T + bias, output rows split over threads.
void gemv(const torch::Tensor& W, const torch::Tensor& S, const torch::Tensor& bias, const float* X, float* Y,
          int64_t M, bool accumulate) {
  const int64_t N = W.size(0), K = W.size(1);
  const int8_t* w = W.data_ptr<int8_t>();
  const float* s = S.data_ptr<float>();
  const float* b = bias.defined() && bias.numel() ? bias.data_ptr<float>() : nullptr;
  const int64_t blocks = (N + 3) / 4;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    gemv_rows(w, s, b, X, Y, M, K, N, accumulate, b0 * 4, std::min(b1 * 4, N));
  });
}

void rms_norm(const float* x, const float* w, float* y, int64_t M, int64_t H, double eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * H;
    float ss = dot_f32(xm, xm, H);
    const float r = 1.f / std::sqrt(ss / float(H) + float(eps));
    for (int64_t i = 0; i < H; ++i) y[m * H + i] = xm[i] * r * w[i];
  }
}

void check_i8(const torch::Tensor& w, const torch::Tensor& s, const char* what) {
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous() && w.dim() == 2, what, ": weight must be contiguous int8 [N, K]");
  TORCH_CHECK(s.scalar_type() == torch::kFloat && s.is_contiguous() && s.numel() == w.size(0), what, ": scales must be float32 [N]");
}

}  // namespace

// x [M, K] float32 -> [M, N] float32 with an int8 [N, K] weight and float32 per-row scales [N].
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor s, torch::Tensor bias) {
  check_i8(w, s, "int8_linear");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.size(1) == w.size(1), "int8_linear: x must be float32 [M, K]");
  x = x.contiguous();
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  gemv(w, s, bias, x.data_ptr<float>(), y.data_ptr<float>(), x.size(0), false);
  return y;
}

// One decode step for B one-token sequences; writes each layer's new K/V into the cache.
//   x [B, H] float32: the new tokens' embeddings (overwritten: the residual stream)
//   positions [B] int64 (= earlier tokens of each sequence); new_slots [B] int64: the new tokens' slots
//   kv_slots [B, Lp] int64: slots of each sequence's earlier tokens (only the first positions[b] are read)
//   rope_cos / rope_sin [max_len, hd/2] float32; k_cache / v_cache [layers, slots, nkv, hd] float32
//   layers: 11 tensors per layer: qkv_w, qkv_s, qkv_b (empty = none), o_w, o_s, gu_w, gu_s, down_w, down_s,
//           input_norm, post_attention_norm
// Returns the final-normed hidden states [B, H].
torch::Tensor decode_step(torch::Tensor x, torch::Tensor positions, torch::Tensor new_slots, torch::Tensor kv_slots,
                          torch::Tensor rope_cos, torch::Tensor rope_sin, torch::Tensor k_cache, torch::Tensor v_cache,
                          std::vector<torch::Tensor> layers, torch::Tensor final_norm, int64_t nh, int64_t nkv,
                          int64_t hd, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2, "decode_step: x must be contiguous float32 [B, H]");
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat && v_cache.scalar_type() == torch::kFloat && k_cache.is_contiguous() &&
              v_cache.is_contiguous(), "decode_step: the KV cache must be contiguous float32");
  TORCH_CHECK(layers.size() % 11 == 0 && int64_t(layers.size() / 11) == k_cache.size(0), "decode_step: 11 tensors per layer");
  TORCH_CHECK(k_cache.size(2) == nkv && k_cache.size(3) == hd && nh % nkv == 0, "decode_step: cache shape does not match the heads");
  positions = positions.contiguous();
  new_slots = new_slots.contiguous();
  kv_slots = kv_slots.contiguous();
  const int64_t B = x.size(0), H = x.size(1), L = layers.size() / 11, S = k_cache.size(1);
  const int64_t I = layers[5].size(0) / 2, qd = nh * hd, kvd = nkv * hd, nqkv = qd + 2 * kvd, half = hd / 2;
  const int64_t Lp = kv_slots.dim() == 2 ? kv_slots.size(1) : 0;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* nslot = new_slots.data_ptr<int64_t>();
  const int64_t* slots = kv_slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] < rope_cos.size(0) && pos[b] <= Lp && nslot[b] >= 0 && nslot[b] < S,
                "decode_step: position or slot out of range");
    for (int64_t j = 0; j < pos[b]; ++j) TORCH_CHECK(slots[b * Lp + j] >= 0 && slots[b * Lp + j] < S, "decode_step: kv slot out of range");
  }
  for (int64_t l = 0; l < L; ++l) {
    check_i8(layers[l * 11], layers[l * 11 + 1], "qkv");
    check_i8(layers[l * 11 + 3], layers[l * 11 + 4], "o");
    check_i8(layers[l * 11 + 5], layers[l * 11 + 6], "gate_up");
    check_i8(layers[l * 11 + 7], layers[l * 11 + 8], "down");
    TORCH_CHECK(layers[l * 11].size(0) == nqkv && layers[l * 11].size(1) == H && layers[l * 11 + 7].size(0) == H,
                "decode_step: layer weight shapes do not match");
  }
  auto opt = x.options();
  auto h = torch::empty({B, H}, opt);
  auto qkv = torch::empty({B, nqkv}, opt);
  auto att = torch::empty({B, qd}, opt);
  auto gu = torch::empty({B, 2 * I}, opt);
  auto act = torch::empty({B, I}, opt);
  float *xp = x.data_ptr<float>(), *hp = h.data_ptr<float>(), *qkvp = qkv.data_ptr<float>();
  float *attp = att.data_ptr<float>(), *gup = gu.data_ptr<float>(), *actp = act.data_ptr<float>();
  const float *cosp = rope_cos.data_ptr<float>(), *sinp = rope_sin.data_ptr<float>();
  float *kc0 = k_cache.data_ptr<float>(), *vc0 = v_cache.data_ptr<float>();
  const float scale = 1.f / std::sqrt(float(hd));
  const int64_t group = nh / nkv, layer_stride = S * kvd;

  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* p = &layers[l * 11];
    float* kc = kc0 + l * layer_stride;
    float* vc = vc0 + l * layer_stride;
    rms_norm(xp, p[9].data_ptr<float>(), hp, B, H, eps);
    gemv(p[0], p[1], p[2], hp, qkvp, B, false);
    for (int64_t b = 0; b < B; ++b) {  // RoPE on q and k (adjacent pairs), then the new K/V to the cache
      float* r = qkvp + b * nqkv;
      const float* c = cosp + pos[b] * half;
      const float* sn = sinp + pos[b] * half;
      for (int64_t head = 0; head < nh + nkv; ++head) {
        float* e = r + head * hd;
        for (int64_t i = 0; i < half; ++i) {
          const float x0 = e[2 * i], x1 = e[2 * i + 1];
          e[2 * i] = x0 * c[i] - x1 * sn[i];
          e[2 * i + 1] = x0 * sn[i] + x1 * c[i];
        }
      }
      std::copy(r + qd, r + qd + kvd, kc + nslot[b] * kvd);
      std::copy(r + qd + kvd, r + nqkv, vc + nslot[b] * kvd);
    }
    at::parallel_for(0, B * nh, 1, [&](int64_t t0, int64_t t1) {  // one task per (sequence, head)
      std::vector<float> sc;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / nh, head = t % nh, g = head / group, n = pos[b] + 1;
        const float* q = qkvp + b * nqkv + head * hd;
        sc.resize(n);
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t s = j < pos[b] ? slots[b * Lp + j] : nslot[b];
          sc[j] = dot_f32(q, kc + s * kvd + g * hd, hd) * scale;
          mx = std::max(mx, sc[j]);
        }
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += (sc[j] = std::exp(sc[j] - mx));
        float* o = attp + b * qd + head * hd;
        std::fill(o, o + hd, 0.f);
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t s = j < pos[b] ? slots[b * Lp + j] : nslot[b];
          axpy_f32(sc[j] * inv, vc + s * kvd + g * hd, o, hd);
        }
      }
    });
    gemv(p[3], p[4], torch::Tensor(), attp, xp, B, true);  // x += o_proj(att)
    rms_norm(xp, p[10].data_ptr<float>(), hp, B, H, eps);
    gemv(p[5], p[6], torch::Tensor(), hp, gup, B, false);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < I; ++i) {
        const float g = gup[b * 2 * I + i];
        actp[b * I + i] = g / (1.f + std::exp(-g)) * gup[b * 2 * I + I + i];
      }
    gemv(p[7], p[8], torch::Tensor(), actp, xp, B, true);  // x += down(silu(gate) * up)
  }
  auto out = torch::empty({B, H}, opt);
  rms_norm(xp, final_norm.data_ptr<float>(), out.data_ptr<float>(), B, H, eps);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "x [M, K] f32 @ (int8 W [N, K] * scales [N]).T + bias -> [M, N] f32");
  m.def("decode_step", &decode_step, "one fused decode step (int8 weights, float32 activations and cache)");
  m.def("has_avx2", []() {
#ifdef AGENTRT_AVX2
    return true;
#else
    return false;
#endif
  });
}
