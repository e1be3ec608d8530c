// A whole engine step of a Llama-family model (decode rows and prefill chunks alike) with int8 / int4
// weight-only linears, in one C++ call, and the Python bindings of the extension (linear_kernel.cpp,
// attention_kernel.cpp).
//
// Why: a decode step of a 135M model on CPU is bound by per-op dispatch (hundreds of small torch ops
// per token) and by torch's M=1 int8 kernels, which stream well below memory bandwidth; a prefill
// chunk spends its time in the linears and attention, and its elementwise ops (norms, RoPE, SwiGLU,
// residual adds) cost another ~7% in torch's many passes over memory. Here every layer is plain
// loops: RMSNorm, the linears of linear_kernel.cpp, RoPE on interleaved pairs, the new K/V written to the paged cache,
// attention_kernel.cpp's causal attention over each sequence's slots, SwiGLU. The elementwise ops are
// AVX2 and split over threads by rows when the step has many.
//
// Layouts (same as engine/model.py): qkv rows are [q (nh*hd) | k (nkv*hd) | v (nkv*hd)] with q/k in
// interleaved RoPE pair order; gate_up rows are [gate (I) | up (I)]; the cache is
// [layers, slots, nkv, hd] float32, slot = block * block_size + offset.
#include <torch/extension.h>

#include "kernels.h"

#include <algorithm>
#include <chrono>
#include <optional>
#include <vector>

using agentrt::Lin;

namespace {

// Rows per thread task so that each task has about this many floats of work: a parallel region
// costs microseconds, so a decode step's few rows run inline on the calling thread.
constexpr int64_t kGrainFloats = 1 << 15;

template <class F>
void parallel_rows(int64_t M, int64_t floats_per_row, const F& f) {
  agentrt::parallel_for(0, M, std::max<int64_t>(1, kGrainFloats / std::max<int64_t>(1, floats_per_row)), f);
}

#ifdef AGENTRT_AVX2
// exp on 8 floats: 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 split in two constants (Cody-Waite),
// p the Cephes expf polynomial (relative error ~1e-7 on the clamped range, where 2^n stays normal).
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// y [M, H] = x * rsqrt(mean(x^2) + eps) * w, row by row (torch's F.rms_norm in float32).
void rms_norm(const float* x, const float* w, float* y, int64_t M, int64_t H, double eps) {
  parallel_rows(M, 2 * H, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xm = x + m * H;
      float* ym = y + m * H;
      const float r = 1.f / std::sqrt(agentrt::dot_f32(xm, xm, H) / float(H) + float(eps));
      int64_t i = 0;
#ifdef AGENTRT_AVX2
      const __m256 rv = _mm256_set1_ps(r);
      for (; i + 8 <= H; i += 8)
        _mm256_storeu_ps(ym + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xm + i), rv), _mm256_loadu_ps(w + i)));
#endif
      for (; i < H; ++i) ym[i] = xm[i] * r * w[i];
    }
  });
}

// A row into the cache: copied, or rounded to float16 (to nearest even, as at::Half does it), clamped to
// float16's largest finite value: an outlier K or V beyond it would be inf, and every score of its head NaN
constexpr float kHalfMax = 65504.f;
inline void store_row(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void store_row(const float* src, at::Half* dst, int64_t n) {
  int64_t i = 0;
#ifdef AGENTRT_AVX2
  const __m256 hi = _mm256_set1_ps(kHalfMax), lo = _mm256_set1_ps(-kHalfMax);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_loadu_ps(src + i), lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
#endif
  for (; i < n; ++i) dst[i] = at::Half(std::min(std::max(src[i], -kHalfMax), kHalfMax));
}

// RoPE on the q and k heads of each qkv row (adjacent pairs (2i, 2i + 1) rotated by position * freq_i),
// then the row's new K/V stored in its cache slot (`store_row`).
//   qkv [T, nqkv]; pos [T], slot [T]; cos / sin [max_len, hd/2]; kc / vc: one layer [slots, nkv * hd]
template <class KV>
void rope_and_store(float* qkv, const int64_t* pos, const int64_t* slot, const float* cos, const float* sin,
                    KV* kc, KV* vc, int64_t T, int64_t nh, int64_t nkv, int64_t hd) {
  const int64_t qd = nh * hd, kvd = nkv * hd, nqkv = qd + 2 * kvd, half = hd / 2;
  parallel_rows(T, nqkv, [&](int64_t t0, int64_t t1) {
    // per row: cc = [c0, c0, c1, c1, ...] and ss = [-s0, s0, -s1, s1, ...], so that a head's rotated
    // values are e * cc + swap_pairs(e) * ss (x0 c - x1 s, x1 c + x0 s)
    std::vector<float> cc(hd), ss(hd);
    for (int64_t t = t0; t < t1; ++t) {
      float* r = qkv + t * nqkv;
      const float* c = cos + pos[t] * half;
      const float* s = sin + pos[t] * half;
      for (int64_t i = 0; i < half; ++i) cc[2 * i] = cc[2 * i + 1] = c[i], ss[2 * i] = -s[i], ss[2 * i + 1] = s[i];
      for (int64_t head = 0; head < nh + nkv; ++head) {
        float* e = r + head * hd;
        int64_t i = 0;
#ifdef AGENTRT_AVX2
        for (; i + 8 <= hd; i += 8) {
          const __m256 v = _mm256_loadu_ps(e + i);
          const __m256 sw = _mm256_permute_ps(v, 0xb1);  // [x1, x0, x3, x2, ...]
          _mm256_storeu_ps(e + i, _mm256_fmadd_ps(v, _mm256_loadu_ps(cc.data() + i),
                                                  _mm256_mul_ps(sw, _mm256_loadu_ps(ss.data() + i))));
        }
#endif
        for (; i < hd; i += 2) {
          const float x0 = e[i], x1 = e[i + 1];
          e[i] = x0 * cc[i] + x1 * ss[i];
          e[i + 1] = x1 * cc[i + 1] + x0 * ss[i + 1];
        }
      }
      store_row(r + qd, kc + slot[t] * kvd, kvd);
      store_row(r + qd + kvd, vc + slot[t] * kvd, kvd);
    }
  });
}

// act [T, I] = silu(gate) * up, gu [T, 2I] = [gate | up].
void swiglu(const float* gu, float* act, int64_t T, int64_t I) {
  parallel_rows(T, 3 * I, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* g = gu + t * 2 * I;
      const float* u = g + I;
      float* a = act + t * I;
      int64_t i = 0;
#ifdef AGENTRT_AVX2
      const __m256 one = _mm256_set1_ps(1.f);
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
      }
#endif
      for (; i < I; ++i) a[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
}

// Y [M, N] (+)= X [M, K] @ W.T + bias through linear_kernel.cpp; Y's rows are ldy floats apart.
void run_linear(const Lin& l, const at::Tensor& X, float* Y, int64_t ldy, bool accumulate, bool int16) {
  agentrt::linear(l, X.data_ptr<float>(), Y, X.size(0), X.size(1), accumulate, int16, ldy);
}

// Seconds spent per phase of a step, accumulated into a caller's float64 [3] tensor (linears,
// attention, the rest) when given: a steady_clock read costs ~20 ns, a phase at least microseconds.
struct PhaseClock {
  double* acc;
  std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
  void lap(int phase) {
    if (!acc) return;
    const auto now = std::chrono::steady_clock::now();
    acc[phase] += std::chrono::duration<double>(now - t).count();
    t = now;
  }
};
enum { kLinears = 0, kAttention = 1, kRest = 2 };

}  // namespace

// One step for B sequences, each with n_i >= 1 new rows (a decode token or a prefill chunk, possibly
// starting mid-sequence after a prefix-cache hit); writes each layer's new K/V into the cache.
//   x [T, H] float32: the new tokens' embeddings, sequence after sequence (overwritten: the residual)
//   seq_start [B + 1] int64: sequence i owns rows [seq_start[i], seq_start[i + 1])
//   ctx_len [B] int64: sequence i's tokens after this step (earlier ones + n_i); row j of sequence i
//     is at position ctx_len[i] - n_i + j
//   block_tables [B, W] int64: sequence i's KV blocks (the first ceil(ctx_len[i] / block_size) read);
//     position p's slot is block_tables[i, p / block_size] * block_size + p % block_size
//   out_rows [R] int64 or None (= all T rows): the rows whose final hidden state is returned
//   rope_cos / rope_sin [max_len, hd/2] float32; k_cache / v_cache [layers, slots, nkv, hd] float32 or float16
//   layers: 18 tensors per layer: qkv (w, s, z, bias), v (w, s, z), o (w, s, z), gate_up (w, s, z),
//           down (w, s, z), input_norm, post_attention_norm (see Lin; empty tensors where there is none).
//           v's are empty where qkv holds v; else (its weights came on another grid than q's and k's,
//           as a Q4_K_M file's Q6_K attn_v) qkv holds q and k only, and the bias is still q's, k's and v's
//   int16_activations: the linears' activation precision (see kernels.h `linear`), the same for every row
//   timings: None, or float64 [3] += seconds in the linears, attention and the rest of the step
// Returns the final-normed hidden states of out_rows [R, H].
constexpr size_t kPerLayer = 18;

torch::Tensor step(torch::Tensor x, torch::Tensor seq_start, torch::Tensor ctx_len, torch::Tensor block_tables,
                   int64_t block_size, std::optional<torch::Tensor> out_rows, torch::Tensor rope_cos,
                   torch::Tensor rope_sin, torch::Tensor k_cache, torch::Tensor v_cache,
                   std::vector<torch::Tensor> layers,
                   torch::Tensor final_norm, int64_t nh, int64_t nkv, int64_t hd, double eps, bool int16_activations,
                   std::optional<torch::Tensor> timings) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2, "step: x must be contiguous float32 [T, H]");
  TORCH_CHECK((k_cache.scalar_type() == torch::kFloat || k_cache.scalar_type() == torch::kHalf) &&
              v_cache.scalar_type() == k_cache.scalar_type() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "step: the KV cache must be contiguous float32 or float16 [layers, slots, nkv, hd], K and V alike");
  TORCH_CHECK(layers.size() % kPerLayer == 0 && int64_t(layers.size() / kPerLayer) == k_cache.size(0),
              "step: 18 tensors per layer, one layer per cache layer");
  TORCH_CHECK(k_cache.size(2) == nkv && k_cache.size(3) == hd && nkv > 0 && nh % nkv == 0 && hd % 2 == 0,
              "step: cache shape does not match the heads");
  TORCH_CHECK(rope_cos.scalar_type() == torch::kFloat && rope_sin.scalar_type() == torch::kFloat && rope_cos.is_contiguous() &&
              rope_sin.is_contiguous() && rope_cos.dim() == 2 && rope_cos.size(1) == hd / 2 && rope_sin.sizes() == rope_cos.sizes(),
              "step: RoPE tables must be contiguous float32 [max_len, hd/2]");
  seq_start = seq_start.to(torch::kLong).contiguous();
  ctx_len = ctx_len.to(torch::kLong).contiguous();
  block_tables = block_tables.to(torch::kLong).contiguous();
  const int64_t T = x.size(0), H = x.size(1), L = layers.size() / kPerLayer, S = k_cache.size(1), B = ctx_len.numel();
  const int64_t I = layers[10].size(0) / 2, qd = nh * hd, kvd = nkv * hd, nqkv = qd + 2 * kvd;
  TORCH_CHECK(B >= 1 && seq_start.numel() == B + 1 && block_tables.dim() == 2 && block_tables.size(0) == B && block_size >= 1,
              "step: seq_start [B + 1], ctx_len [B], block_tables [B, W], block_size >= 1");
  const int64_t* st = seq_start.data_ptr<int64_t>();
  const int64_t* cl = ctx_len.data_ptr<int64_t>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t W = block_tables.size(1), max_len = rope_cos.size(0);
  TORCH_CHECK(st[0] == 0 && st[B] == T, "step: seq_start must run from 0 to T = x.size(0)");
  // each sequence's key slots [B, Lmax] (what attention reads), and each row's position and new slot
  int64_t Lmax = 0;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t n = st[i + 1] - st[i];
    TORCH_CHECK(n >= 1 && cl[i] >= n && cl[i] <= max_len && (cl[i] + block_size - 1) / block_size <= W, "step: sequence ", i,
                " has ", n, " rows and ctx_len ", cl[i], " (need 1 <= rows <= ctx_len <= RoPE table length, and its blocks)");
    Lmax = std::max(Lmax, cl[i]);
  }
  std::vector<int64_t> slots(B * Lmax), pos(T), new_slot(T);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t p = 0; p < cl[i]; ++p) {
      const int64_t blk = bt[i * W + p / block_size];
      TORCH_CHECK(blk >= 0 && (blk + 1) * block_size <= S, "step: block ", blk, " of sequence ", i, " is outside the cache");
      slots[i * Lmax + p] = blk * block_size + p % block_size;
    }
    for (int64_t t = st[i]; t < st[i + 1]; ++t) {
      pos[t] = cl[i] - (st[i + 1] - t);
      new_slot[t] = slots[i * Lmax + pos[t]];
    }
  }
  std::vector<Lin> lins;  // 5 per layer: qkv (or q and k), v (empty weights: in qkv), o, gate_up, down
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* p = &layers[l * kPerLayer];
    const bool apart = p[4].numel() > 0;  // v runs apart
    const torch::Tensor& bias = p[3];
    TORCH_CHECK(bias.numel() == 0 || (bias.dim() == 1 && bias.size(0) == nqkv), "step: qkv bias must be [", nqkv, "]");
    lins.push_back({p[0], p[1], p[2], apart && bias.numel() ? bias.narrow(0, 0, qd + kvd) : bias});
    lins.push_back({p[4], p[5], p[6], apart && bias.numel() ? bias.narrow(0, qd + kvd, kvd) : torch::Tensor()});
    lins.push_back({p[7], p[8], p[9], torch::Tensor()});
    lins.push_back({p[10], p[11], p[12], torch::Tensor()});
    lins.push_back({p[13], p[14], p[15], torch::Tensor()});
    agentrt::check_lin(lins[l * 5], apart ? qd + kvd : nqkv, H, "qkv");
    if (apart) agentrt::check_lin(lins[l * 5 + 1], kvd, H, "v");
    agentrt::check_lin(lins[l * 5 + 2], H, qd, "o");
    agentrt::check_lin(lins[l * 5 + 3], 2 * I, H, "gate_up");
    agentrt::check_lin(lins[l * 5 + 4], H, I, "down");
    TORCH_CHECK(p[16].numel() == H && p[17].numel() == H && p[16].scalar_type() == torch::kFloat &&
                p[17].scalar_type() == torch::kFloat && p[16].is_contiguous() && p[17].is_contiguous(),
                "step: norm weights must be float32 [H]");
  }
  TORCH_CHECK(final_norm.numel() == H && final_norm.scalar_type() == torch::kFloat && final_norm.is_contiguous(),
              "step: final norm must be float32 [H]");
  auto opt = x.options();
  auto h = torch::empty({T, H}, opt);
  auto qkv = torch::empty({T, nqkv}, opt);
  auto att = torch::empty({T, qd}, opt);
  auto gu = torch::empty({T, 2 * I}, opt);
  auto act = torch::empty({T, I}, opt);
  float *xp = x.data_ptr<float>(), *hp = h.data_ptr<float>(), *qkvp = qkv.data_ptr<float>();
  float *attp = att.data_ptr<float>(), *gup = gu.data_ptr<float>(), *actp = act.data_ptr<float>();
  const float *cosp = rope_cos.data_ptr<float>(), *sinp = rope_sin.data_ptr<float>();
  const bool half_cache = k_cache.scalar_type() == torch::kHalf;
  const int64_t layer_stride = S * kvd;
  if (timings.has_value())
    TORCH_CHECK(timings->scalar_type() == torch::kDouble && timings->is_contiguous() && timings->numel() == 3,
                "step: timings must be a contiguous float64 [3]");
  PhaseClock clock{timings.has_value() ? timings->data_ptr<double>() : nullptr};

  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* p = &layers[l * kPerLayer];
    const Lin* lin = &lins[l * 5];
    rms_norm(xp, p[16].data_ptr<float>(), hp, T, H, eps);
    clock.lap(kRest);
    run_linear(lin[0], h, qkvp, nqkv, false, int16_activations);
    if (lin[1].w.numel()) run_linear(lin[1], h, qkvp + qd + kvd, nqkv, false, int16_activations);
    clock.lap(kLinears);
    auto attend = [&](auto* kc, auto* vc) {  // this layer's cache, float or at::Half
      rope_and_store(qkvp, pos.data(), new_slot.data(), cosp, sinp, kc, vc, T, nh, nkv, hd);
      clock.lap(kRest);
      agentrt::attention(qkvp, nqkv, kc, vc, st, cl, slots.data(), Lmax, B, nh, nkv, hd, attp);
      clock.lap(kAttention);
    };
    if (half_cache) attend(k_cache.data_ptr<at::Half>() + l * layer_stride, v_cache.data_ptr<at::Half>() + l * layer_stride);
    else attend(k_cache.data_ptr<float>() + l * layer_stride, v_cache.data_ptr<float>() + l * layer_stride);
    run_linear(lin[2], att, xp, H, true, int16_activations);  // x += o_proj(att)
    clock.lap(kLinears);
    rms_norm(xp, p[17].data_ptr<float>(), hp, T, H, eps);
    clock.lap(kRest);
    run_linear(lin[3], h, gup, 2 * I, false, int16_activations);
    clock.lap(kLinears);
    swiglu(gup, actp, T, I);
    clock.lap(kRest);
    run_linear(lin[4], act, xp, H, true, int16_activations);  // x += down(silu(gate) * up)
    clock.lap(kLinears);
  }
  // the final norm only for the rows the caller reads (the sampled ones: one per finished prompt)
  if (out_rows.has_value()) {
    auto rows = out_rows->to(torch::kLong).contiguous();
    const int64_t R = rows.numel();
    const int64_t* rp = rows.data_ptr<int64_t>();
    for (int64_t r = 0; r < R; ++r) TORCH_CHECK(rp[r] >= 0 && rp[r] < T, "step: out_rows out of range");
    auto sel = torch::empty({R, H}, opt);
    for (int64_t r = 0; r < R; ++r) std::copy(xp + rp[r] * H, xp + (rp[r] + 1) * H, sel.data_ptr<float>() + r * H);
    auto out = torch::empty({R, H}, opt);
    rms_norm(sel.data_ptr<float>(), final_norm.data_ptr<float>(), out.data_ptr<float>(), R, H, eps);
    return out;
  }
  auto out = torch::empty({T, H}, opt);
  rms_norm(xp, final_norm.data_ptr<float>(), out.data_ptr<float>(), T, H, eps);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &agentrt::linear_op, "x [M, K] float32 through an int8 (rows or groups of 32), int6 or int4 linear -> [M, N]",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("s"), pybind11::arg("z"), pybind11::arg("bias"),
        pybind11::arg("int16") = false);
  m.def("attention", &agentrt::attention_op,
        "causal paged attention: q [T, nh*hd], caches [slots, nkv, hd], seq_start [B+1], ctx_len [B], slots [B, L]");
  m.def("step", &step,
        "one fused engine step (decode rows and prefill chunks; int8/int6/int5/int4 weights; float32 activations; "
        "float32 or float16 cache)");
  m.def("set_num_threads", &agentrt::set_num_threads,
        "set the kernels' thread count (n >= 1; 0: follow torch's intra-op count, the start); returns the setting "
        "it replaced");
  m.def("num_threads", &agentrt::num_threads, "the kernels' thread count");
  m.def("isa", []() {  // the instruction set this build's kernels use
#if defined(AGENTRT_VNNI)
    return "avx512-vnni";
#elif defined(AGENTRT_AVX2)
    return "avx2";
#else
    return "scalar";
#endif
  });
}
