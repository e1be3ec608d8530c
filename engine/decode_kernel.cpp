// A whole decode step of a Llama-family model with int8 / int4 weight-only linears, in one C++ call,
// and the Python bindings of the extension (linear_kernel.cpp, attention_kernel.cpp).
//
// Why: a decode step of a 135M model on CPU is bound by per-op dispatch (hundreds of small torch ops
// per token) and by torch's M=1 int8 kernels, which stream well below memory bandwidth. Here every
// layer is plain loops: RMSNorm, the linears of linear_kernel.cpp, RoPE on interleaved pairs, the new
// K/V written to the paged cache, attention_kernel.cpp's attention over the sequence's slots, SwiGLU.
//
// Layouts (same as engine/model.py): qkv rows are [q (nh*hd) | k (nkv*hd) | v (nkv*hd)] with q/k in
// interleaved RoPE pair order; gate_up rows are [gate (I) | up (I)]; the cache is
// [layers, slots, nkv, hd] float32.
#include <torch/extension.h>

#include "kernels.h"

#include <vector>

using agentrt::Lin;

namespace {

void rms_norm(const float* x, const float* w, float* y, int64_t M, int64_t H, double eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * H;
    float ss = agentrt::dot_f32(xm, xm, H);
    const float r = 1.f / std::sqrt(ss / float(H) + float(eps));
    for (int64_t i = 0; i < H; ++i) y[m * H + i] = xm[i] * r * w[i];
  }
}

}  // namespace

// One decode step for B one-token sequences; writes each layer's new K/V into the cache.
//   x [B, H] float32: the new tokens' embeddings (overwritten: the residual stream)
//   positions [B] int64 (= earlier tokens of each sequence); new_slots [B] int64: the new tokens' slots
//   kv_slots [B, Lp] int64: slots of each sequence's earlier tokens (only the first positions[b] are read)
//   rope_cos / rope_sin [max_len, hd/2] float32; k_cache / v_cache [layers, slots, nkv, hd] float32
//   layers: 15 tensors per layer: qkv (w, s, z, bias), o (w, s, z), gate_up (w, s, z), down (w, s, z),
//           input_norm, post_attention_norm (see Lin; empty tensors where there is none)
// Returns the final-normed hidden states [B, H].
constexpr size_t kPerLayer = 15;

torch::Tensor decode_step(torch::Tensor x, torch::Tensor positions, torch::Tensor new_slots, torch::Tensor kv_slots,
                          torch::Tensor rope_cos, torch::Tensor rope_sin, torch::Tensor k_cache, torch::Tensor v_cache,
                          std::vector<torch::Tensor> layers, torch::Tensor final_norm, int64_t nh, int64_t nkv,
                          int64_t hd, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2, "decode_step: x must be contiguous float32 [B, H]");
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat && v_cache.scalar_type() == torch::kFloat && k_cache.is_contiguous() &&
              v_cache.is_contiguous(), "decode_step: the KV cache must be contiguous float32");
  TORCH_CHECK(layers.size() % kPerLayer == 0 && int64_t(layers.size() / kPerLayer) == k_cache.size(0),
              "decode_step: 15 tensors per layer, one layer per cache layer");
  TORCH_CHECK(k_cache.size(2) == nkv && k_cache.size(3) == hd && nh % nkv == 0, "decode_step: cache shape does not match the heads");
  positions = positions.contiguous();
  new_slots = new_slots.contiguous();
  kv_slots = kv_slots.contiguous();
  const int64_t B = x.size(0), H = x.size(1), L = layers.size() / kPerLayer, S = k_cache.size(1);
  const int64_t I = layers[7].size(0) / 2, qd = nh * hd, kvd = nkv * hd, nqkv = qd + 2 * kvd, half = hd / 2;
  const int64_t Lp = kv_slots.dim() == 2 ? kv_slots.size(1) : 0;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* nslot = new_slots.data_ptr<int64_t>();
  const int64_t* slots = kv_slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] < rope_cos.size(0) && pos[b] <= Lp && nslot[b] >= 0 && nslot[b] < S,
                "decode_step: position or slot out of range");
    for (int64_t j = 0; j < pos[b]; ++j) TORCH_CHECK(slots[b * Lp + j] >= 0 && slots[b * Lp + j] < S, "decode_step: kv slot out of range");
  }
  // one query row per sequence; its keys: the earlier tokens' slots, then the new token's
  std::vector<int64_t> seq_start(B + 1), ctx_len(B), all_slots(B * (Lp + 1));
  for (int64_t b = 0; b < B; ++b) {
    seq_start[b + 1] = b + 1, ctx_len[b] = pos[b] + 1;
    std::copy(slots + b * Lp, slots + b * Lp + pos[b], all_slots.begin() + b * (Lp + 1));
    all_slots[b * (Lp + 1) + pos[b]] = nslot[b];
  }
  std::vector<Lin> lins;  // 4 per layer: qkv, o, gate_up, down
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* p = &layers[l * kPerLayer];
    lins.push_back({p[0], p[1], p[2], p[3]});
    lins.push_back({p[4], p[5], p[6], torch::Tensor()});
    lins.push_back({p[7], p[8], p[9], torch::Tensor()});
    lins.push_back({p[10], p[11], p[12], torch::Tensor()});
    agentrt::check_lin(lins[l * 4], nqkv, H, "qkv");
    agentrt::check_lin(lins[l * 4 + 1], H, qd, "o");
    agentrt::check_lin(lins[l * 4 + 2], 2 * I, H, "gate_up");
    agentrt::check_lin(lins[l * 4 + 3], H, I, "down");
    TORCH_CHECK(p[13].numel() == H && p[14].numel() == H && p[13].scalar_type() == torch::kFloat &&
                p[14].scalar_type() == torch::kFloat, "decode_step: norm weights must be float32 [H]");
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
  const int64_t layer_stride = S * kvd;

  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* p = &layers[l * kPerLayer];
    const Lin* lin = &lins[l * 4];
    float* kc = kc0 + l * layer_stride;
    float* vc = vc0 + l * layer_stride;
    rms_norm(xp, p[13].data_ptr<float>(), hp, B, H, eps);
    agentrt::linear(lin[0], hp, qkvp, B, H, false);
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
    agentrt::attention(qkvp, nqkv, kc, vc, seq_start.data(), ctx_len.data(), all_slots.data(), Lp + 1, B, nh, nkv, hd, attp);
    agentrt::linear(lin[1], attp, xp, B, qd, true);  // x += o_proj(att)
    rms_norm(xp, p[14].data_ptr<float>(), hp, B, H, eps);
    agentrt::linear(lin[2], hp, gup, B, H, false);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < I; ++i) {
        const float g = gup[b * 2 * I + i];
        actp[b * I + i] = g / (1.f + std::exp(-g)) * gup[b * 2 * I + I + i];
      }
    agentrt::linear(lin[3], actp, xp, B, I, true);  // x += down(silu(gate) * up)
  }
  auto out = torch::empty({B, H}, opt);
  rms_norm(xp, final_norm.data_ptr<float>(), out.data_ptr<float>(), B, H, eps);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &agentrt::linear_op, "x [M, K] float32 through an int8 (rows or groups of 32) or int4 linear -> [M, N]");
  m.def("attention", &agentrt::attention_op,
        "causal paged attention: q [T, nh*hd], caches [slots, nkv, hd], seq_start [B+1], ctx_len [B], slots [B, L]");
  m.def("decode_step", &decode_step, "one fused decode step (int8 or int4 weights, float32 activations and cache)");
  m.def("has_avx2", []() {
#ifdef AGENTRT_AVX2
    return true;
#else
    return false;
#endif
  });
}
