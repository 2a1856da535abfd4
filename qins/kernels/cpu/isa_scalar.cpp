// Portable scalar kernels (any CPU). Compiled without ISA flags and with -ffp-contract=off.
#include "qins_kernels.h"

#include <algorithm>

namespace qins {
namespace {

void scalar_table(float lo, float hi, int packed, int mulaw, float* t) {
  const int K = packed ? 127 : 255;
  const float delta = (hi - lo) / table_steps(K, mulaw), z = table_offset(lo, mulaw);
  t[0] = 0.0f;
  for (int j = 0; j < K; ++j) t[j + 1] = qins_exp_scalar(hi - static_cast<float>(j) * delta) - z;
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
  float tabs[kMaxTables][256];
  const int packed = a.sign == nullptr;
  auto build = [&](float lo, float hi, float* t) { scalar_table(lo, hi, packed, a.mulaw, t); };
  shared_tables(a, tabs, build);
  for (int64_t r = r0; r < r1; ++r) {
    const float* t = row_tab(a, tabs, r, build);
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
  float tabs[kMaxTables][256];
  const int packed = a.sign == nullptr;
  auto build = [&](float lo, float hi, float* t) { scalar_table(lo, hi, packed, a.mulaw, t); };
  shared_tables(a, tabs, build);
  for (int64_t r = r0; r < r1; ++r) {
    const float* t = row_tab(a, tabs, r, build);
    const uint8_t* c = a.codes + r * a.in;
    const int8_t* s = a.sign ? a.sign + r * a.in : nullptr;
    float* wr = w + (r - r0) * (k1 - k0) - k0;
    for (int64_t k = k0; k < k1; ++k) wr[k] = weight(t, c[k], s, k);
  }
}

// |t - rint(t)| (rint: ties to even, the default rounding mode) without a libm call or a branch,
// so the loop vectorises: for m = |t| < 2^23, (m + 2^23) - 2^23 is m rounded; floats of 2^23 and
// more are integers, and min(m, 2^23) = 2^23 gives their offset 0.
inline float offset(float t) {
  constexpr float kTwo23 = 8388608.0f;
  const float m = std::min(std::fabs(t), kTwo23);
  return m - ((m + kTwo23) - kTwo23);
}

// The block's weights and clamped gaps are computed once (padded with a = 0 to 16 columns), and
// each candidate's sum runs in 16 independent float32 lanes, as the AVX-512 path does.
void scalar_deviation(const DevArgs& a, int64_t r0, int64_t r1) {
  constexpr int64_t kLanes = 16;
  float wb[kDevBlock], gb[kDevBlock];
  for (int64_t r = r0; r < r1; ++r) {
    const float* inv = a.inv + r * a.C;
    double* dev = a.dev + r * a.C;
    double asum = 0.0;
    for (int64_t i = 0; i < a.C; ++i) dev[i] = 0.0;
    for (int64_t k0 = 0; k0 < a.cols; k0 += kDevBlock) {
      const int64_t n = std::min(kDevBlock, a.cols - k0);
      const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
      asum += dev_block(a, r, k0, n, padded, wb, gb);
      for (int64_t i = 0; i < a.C; ++i) {
        float acc[kLanes] = {};
        for (int64_t k = 0; k < padded; k += kLanes)
          for (int64_t l = 0; l < kLanes; ++l) {
            const float t = gb[k + l] * inv[i];
            const float d = offset(t);
            acc[l] += wb[k + l] * (d * d);
          }
        float total = 0.0f;
        for (int64_t l = 0; l < kLanes; ++l) total += acc[l];
        dev[i] += total;
      }
    }
    for (int64_t i = 0; i < a.C; ++i) dev[i] -= asum / 12.0;
  }
}

void scalar_range_codes(const CodeArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t s = 0; s < a.S; ++s) {
      a.err[r * a.S + s] = 0.0;
      range_codes_tail(a, r, s, 0, a.cols);
    }
}

}  // namespace

const IsaKernels kScalarKernels = {"scalar", 1, scalar_table, scalar_kpad, scalar_xprep, scalar_gemv, scalar_decode, nullptr,
                                   nullptr, nullptr, scalar_deviation, scalar_range_codes, kGemvGroup, kMaxGemvBatch};

}  // namespace qins
