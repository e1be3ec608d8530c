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

}  // namespace agentrt
