// Portable scalar kernels (any CPU). Compiled without ISA flags and with -ffp-contract=off.
#include "qins_kernels.h"

#include <algorithm>

namespace qins {
namespace {

void scalar_table(float lo, float hi, int packed, float* t) {
  const int K = packed ? 127 : 255;
  const float delta = (hi - lo) / static_cast<float>(K - 1);
  t[0] = 0.0f;
  for (int j = 0; j < K; ++j) t[j + 1] = qins_exp_scalar(hi - static_cast<float>(j) * delta);
  if (packed)
    for (int i = 0; i < 128; ++i) t[128 + i] = -t[i];
}

int64_t scalar_kpad(int64_t in) { return in; }

void scalar_xprep(const float* x, int64_t B, int64_t in, int64_t kpad, float* xp) {
  std::copy(x, x + B * in, xp);
}

// Signed weight of (code, sign) with the row table t.
inline float weight(const float* t, uint8_t c, const int8_t* s, int64_t k) {
  float w = t[c];
  if (s && s[k] < 0) w = -w;
  return w;
}

void scalar_gemv(const Args& a, int64_t r0, int64_t r1) {
  float t[256];
  const int packed = a.sign == nullptr;
  if (!a.per_row) scalar_table(a.log_min[0], a.log_max[0], packed, t);
  for (int64_t r = r0; r < r1; ++r) {
    if (a.per_row) scalar_table(a.log_min[r], a.log_max[r], packed, t);
    const uint8_t* c = a.codes + r * a.in;
    const int8_t* s = a.sign ? a.sign + r * a.in : nullptr;
    for (int64_t b = 0; b < a.B; ++b) {
      const float* x = a.xp + b * a.kpad;
      float acc = 0.0f;
      for (int64_t k = 0; k < a.in; ++k) acc += weight(t, c[k], s, k) * x[k];
      a.y[b * a.out + r] = acc;
    }
  }
}

void scalar_decode(const Args& a, int64_t r0, int64_t r1, int64_t k0, int64_t k1, float* w) {
  float t[256];
  const int packed = a.sign == nullptr;
  if (!a.per_row) scalar_table(a.log_min[0], a.log_max[0], packed, t);
  for (int64_t r = r0; r < r1; ++r) {
    if (a.per_row) scalar_table(a.log_min[r], a.log_max[r], packed, t);
    const uint8_t* c = a.codes + r * a.in;
    const int8_t* s = a.sign ? a.sign + r * a.in : nullptr;
    float* wr = w + (r - r0) * (k1 - k0) - k0;
    for (int64_t k = k0; k < k1; ++k) wr[k] = weight(t, c[k], s, k);
  }
}

}  // namespace

const IsaKernels kScalarKernels = {"scalar", 1, scalar_table, scalar_kpad, scalar_xprep, scalar_gemv, scalar_decode, nullptr};

}  // namespace qins
