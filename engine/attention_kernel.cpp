// Causal attention over a paged KV cache (see kernels.h's `attention` for the layout).
//
// One task per (query row, head): scores against the visible keys, softmax, weighted sum of values.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace agentrt {

void attention(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache, const int64_t* seq_start,
               const int64_t* ctx_len, const int64_t* slots, int64_t ld_slots, int64_t B, int64_t nh, int64_t nkv,
               int64_t hd, float* out) {
  const int64_t T = seq_start[B], group = nh / nkv, kvd = nkv * hd;
  const float scale = 1.f / std::sqrt(float(hd));
  std::vector<int64_t> seq_of(T);  // query row -> its sequence
  for (int64_t i = 0; i < B; ++i) std::fill(seq_of.begin() + seq_start[i], seq_of.begin() + seq_start[i + 1], i);
  at::parallel_for(0, T * nh, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sc;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = t / nh, head = t % nh, i = seq_of[row], g = head / group;
      const int64_t n = ctx_len[i] - (seq_start[i + 1] - 1 - row);  // keys this row sees
      const int64_t* sl = slots + i * ld_slots;
      const float* qr = q + row * q_stride + head * hd;
      sc.resize(n);
      float mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        sc[j] = dot_f32(qr, k_cache + sl[j] * kvd + g * hd, hd) * scale;
        mx = std::max(mx, sc[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) sum += (sc[j] = std::exp(sc[j] - mx));
      float* o = out + row * nh * hd + head * hd;
      std::fill(o, o + hd, 0.f);
      const float inv = 1.f / sum;
      for (int64_t j = 0; j < n; ++j) axpy_f32(sc[j] * inv, v_cache + sl[j] * kvd + g * hd, o, hd);
    }
  });
}

at::Tensor attention_op(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor seq_start, at::Tensor ctx_len,
                        at::Tensor slots, int64_t nh, int64_t nkv, int64_t hd) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 2 && q.stride(1) == 1 && q.size(1) >= nh * hd,
              "attention: q must be float32 [T, >= nh * hd] with unit column stride");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() &&
              v_cache.is_contiguous() && k_cache.dim() == 3 && k_cache.size(1) == nkv && k_cache.size(2) == hd &&
              v_cache.sizes() == k_cache.sizes(), "attention: caches must be contiguous float32 [slots, nkv, hd]");
  TORCH_CHECK(nkv > 0 && nh % nkv == 0, "attention: nh must be a multiple of nkv");
  seq_start = seq_start.to(at::kLong).contiguous();
  ctx_len = ctx_len.to(at::kLong).contiguous();
  slots = slots.to(at::kLong).contiguous();
  const int64_t B = ctx_len.numel(), S = k_cache.size(0);
  TORCH_CHECK(seq_start.numel() == B + 1 && slots.dim() == 2 && slots.size(0) == B, "attention: seq_start [B + 1], slots [B, L]");
  const int64_t* st = seq_start.data_ptr<int64_t>();
  const int64_t* cl = ctx_len.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  TORCH_CHECK(st[0] == 0 && st[B] == q.size(0), "attention: seq_start must run from 0 to T");
  for (int64_t i = 0; i < B; ++i) {
    const int64_t n = st[i + 1] - st[i];
    TORCH_CHECK(n >= 1 && cl[i] >= n && cl[i] <= slots.size(1), "attention: sequence ", i, " has ", n,
                " query rows and ctx_len ", cl[i], " (need 1 <= rows <= ctx_len <= slots.size(1))");
    for (int64_t j = 0; j < cl[i]; ++j)
      TORCH_CHECK(sl[i * slots.size(1) + j] >= 0 && sl[i * slots.size(1) + j] < S, "attention: slot out of range");
  }
  auto out = at::empty({q.size(0), nh * hd}, q.options());
  attention(q.data_ptr<float>(), q.stride(0), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), st, cl, sl,
            slots.size(1), B, nh, nkv, hd, out.data_ptr<float>());
  return out;
}

}  // namespace agentrt
