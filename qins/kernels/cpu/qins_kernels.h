// QINS CPU kernels: the plain C++ interface between the torch binding (ops.cpp) and the
// per-ISA translation units (isa_scalar.cpp, isa_avx2.cpp, isa_avx512.cpp). No torch headers
// here: the ISA units are compiled by g++ directly, each with its own -m flags, and always with
// -ffp-contract=off so that the level tables are bit-identical to qins.formats.level_table.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
#include <algorithm>

namespace qins {

// Constants of qins.formats.qins_exp, rounded to float32 exactly as torch does for a float32
// tensor times a Python float.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

// Scalar qins_exp: the reference operation sequence, one correctly rounded op at a time.
// 2**n for integral n in [-126, 127] (the normal exponents), exact. n is clamped into that range
// before the cast: casting an out-of-range float (or NaN) to int is undefined behaviour, and the
// vector paths clamp the same way, so every ISA computes the same table for any logs (validated
// logs never reach the clamp). The comparisons send NaN to -126.
inline float pow2_bits(float n) {
  n = n > -126.0f ? n : -126.0f;
  n = n < 127.0f ? n : 127.0f;
  int32_t i = (static_cast<int32_t>(n) + 127) << 23;
  float r;
  std::memcpy(&r, &i, 4);
  return r;
}
inline float qins_exp_scalar(float t) {
  float n = std::nearbyint(t * kLog2e);  // default rounding mode: ties to even
  float f = (t - n * kLn2Hi) - n * kLn2Lo;
  float p = kP0;
  p = p * f + kP1;
  p = p * f + kP2;
  p = p * f + kP3;
  p = p * f + kP4;
  p = p * f + kP5;
  float y = ((p * f) * f + f) + 1.0f;
  float a = std::floor(n * 0.5f);
  return (y * pow2_bits(a)) * pow2_bits(n - a);
}

// Whether every level t_j = hi - j * delta (j = 0 .. levels - 1, float32 as the kernels compute
// it) has n = rint(t_j * log2e) in [-124, 126]: there y * 2**n (y in [0.70, 1.42]) is a normal float,
// so the reference's two power-of-two products are exact and equal one scaling by 2**n, which the
// vector paths then use. t_j * log2e is monotone in j, so its two ends bound every level. NaN and
// infinities fail the comparisons (the reference sequence then runs, clamps included).
inline bool exp_scale_exact(float hi, float delta, int levels) {
  const float a = hi * kLog2e, b = (hi - static_cast<float>(levels - 1) * delta) * kLog2e;
  return a >= -124.0f && a <= 126.0f && b >= -124.0f && b <= 126.0f;
}

// kLevelIndex[i] = i - 1 (float): the j of table entry i (entry 0 is the zero code, level j = i - 1).
struct LevelIndex {
  alignas(64) float v[256];
  constexpr LevelIndex() : v() {
    for (int i = 0; i < 256; ++i) v[i] = static_cast<float>(i - 1);
  }
};
inline constexpr LevelIndex kLevelIndexTable{};
inline constexpr const float* kLevelIndex = kLevelIndexTable.v;

// Level spacing (qins.formats.level_table): log (0) divides the span by K - 1 steps and subtracts
// nothing; mulaw (1) divides by K steps and subtracts z = qins_exp(lo) from every level.
inline float table_steps(int K, int mulaw) { return static_cast<float>(mulaw ? K : K - 1); }
inline float table_offset(float lo, int mulaw) { return mulaw ? qins_exp_scalar(lo) : 0.0f; }

// One call: x (fp32) is first "prepared" by the ISA (xprep: [B, kpad] floats, possibly
// permuted within 64-column chunks and zero padded), then rows [r0, r1) are computed.
struct Args {
  const uint8_t* codes;   // [out, in]
  const int8_t* sign;     // [out, in] or nullptr (packed format)
  const float* log_min;   // [out] if per_row, [ntables] with row_table, else [1]
  const float* log_max;
  int per_row;
  int64_t in, out, kpad;
  const float* xp;        // [B, kpad], from xprep
  int64_t B;
  float* y;               // [B, out]; gemv writes y[b * out + r] (no bias)
  int64_t col_block;      // gemv: columns per block (multiple of 64; >= kpad: no blocking)
  int64_t prefetch = 0;   // gemv: software prefetch distance in bytes (0: none)
  int64_t pipeline = 1;   // gemv: next row's table built inside the row loop (0 off, 1 split only, 2 all)
  int64_t row_chunk = 2;  // gemv: rows whose per-row tables are built before their column loop (1..kMaxRowChunk)
  int mulaw = 0;          // level spacing: 0 log, 1 mulaw (table_steps, table_offset)
  // Shared tables (per_row = 0): row r decodes through table row_table[r] of the ntables built once
  // per call; nullptr: table 0. The per-row scale is applied by the caller, after the dot products.
  const uint8_t* row_table = nullptr;
  int64_t ntables = 1;
  // AVX2 table lookups: 1 half by vgatherdps, half by scalar loads; 0 all by scalar loads.
  int64_t gather = 1;
};
constexpr int64_t kMaxRowChunk = 16;
constexpr int64_t kMaxTables = 16;  // shared tables per layer (QinsConfig.shared_tables)

// The [256] float tables of the ISAs that read them from memory (scalar, AVX2): build(lo, hi, t)
// writes one. shared_tables builds every table of a call without per-row ranges, once; row_tab
// gives row r's: its own (built into tabs[0]) with per-row ranges, else its shared one.
template <class Build>
void shared_tables(const Args& a, float (*tabs)[256], Build build) {
  if (!a.per_row)
    for (int64_t g = 0; g < a.ntables; ++g) build(a.log_min[g], a.log_max[g], tabs[g]);
}

template <class Build>
const float* row_tab(const Args& a, float (*tabs)[256], int64_t r, Build build) {
  if (a.per_row) {
    build(a.log_min[r], a.log_max[r], tabs[0]);
    return tabs[0];
  }
  return tabs[a.row_table ? a.row_table[r] : 0];
}

// The rounding-deviation score of the mse range search (qins/encode.py), rows [r0, r1) of
// [R, cols] magnitudes and gaps: for candidate i of row r,
//   dev[r, i] = sum_k a_k * d_ki^2 - (sum_k a_k) / 12,
//   a_k = max((mag_k * unit_r)^2 - floor2_r, 0),  t = min(gap_k, tau_r) * inv[r, i],  d = t - rint(t)
// (rint: ties to even). Products in float32 as written (no FMA), sums in float32 over blocks of
// kDevBlock columns, then in double.
struct DevArgs {
  const float* mag;     // [R, cols]
  const float* gap;     // [R, cols]
  int64_t cols;
  const float* inv;     // [R, C]
  int64_t C;
  const float* unit;    // [R]
  const float* floor2;  // [R]
  const float* tau;     // [R]
  double* dev;          // [R, C]
};
constexpr int64_t kDevBlock = 1024;  // columns per float32 partial sum
constexpr int64_t kDevGroup = 8;     // candidates per pass over a block

// The codes and exact squared errors of the mse search's final comparison (qins/encode.py), rows
// [r0, r1), for S ranges per row: with j = min(max(rint(gap / delta[r, s]), 0), K),
//   code = j < K ? j + 1 : (mag >= half[r, s] ? K : 0),
//   err[r, s] = sum_k (double)(mag_k - table[s, r, code])^2  (the float32 difference is exact),
// and codes[r, :] = range `write`'s codes (write < 0: none written).
struct CodeArgs {
  const float* mag;     // [R, cols]
  const float* gap;     // [R, cols]
  int64_t cols, R, S;
  const float* delta;   // [R, S], > 0
  const float* half;    // [R, S]: table[s, r, K] * 0.5
  const float* tables;  // [S, R, 256]
  int64_t K;
  double* err;          // [R, S]
  uint8_t* codes;       // [R, cols] or nullptr
  int64_t write;
};

// One element's code (shared by every ISA's tail and the scalar path).
inline int32_t range_code(float mag, float gap, float delta, float half, int64_t K) {
  const float j = std::min(std::max(std::nearbyint(gap / delta), 0.0f), static_cast<float>(K));
  return j < static_cast<float>(K) ? static_cast<int32_t>(j) + 1 : (mag >= half ? static_cast<int32_t>(K) : 0);
}

struct IsaKernels {
  const char* name;
  int xprep_identity;  // xprep is a plain copy (kpad == in): x can be used as is
  // The full [256] float table of one (log_min, log_max) pair, computed the way the kernels do.
  void (*table)(float lo, float hi, int packed, int mulaw, float* out256);
  int64_t (*kpad)(int64_t in);
  void (*xprep)(const float* x, int64_t B, int64_t in, int64_t kpad, float* xp);
  // y[:, r0:r1] for B <= gemv_group, straight from the codes.
  void (*gemv)(const Args& a, int64_t r0, int64_t r1);
  // Decode rows [r0, r1), columns [k0, k1) (multiples of 64 or k1 == kpad) into w
  // ([r1 - r0, k1 - k0] fp32, in the column order of xprep).
  void (*decode)(const Args& a, int64_t r0, int64_t r1, int64_t k0, int64_t k1, float* w);
  // Optional single-threaded GEMM of a decoded block (nullptr: at::mm), see isa_avx512.cpp.
  void (*gemm)(const float* x, int64_t ldx, int64_t B, const float* w, int64_t R, int64_t kb, float* y,
               int64_t ldy, bool accumulate);
  // Optional (nullptr: none): batches above max_gemv_batch straight from the codes, no decoded block.
  // pack_panels writes x ([B, kpad] from xprep) transposed in panels of kPanel rows into xt
  // (panel_floats(B, kpad) floats); code_gemm then computes y[:, r0:r1] for every row of x from xt.
  void (*pack_panels)(const float* x, int64_t B, int64_t kpad, float* xt);
  void (*code_gemm)(const Args& a, const float* xt, int64_t r0, int64_t r1);
  // The mse search's rounding-deviation score, rows [r0, r1) (see DevArgs).
  void (*deviation)(const DevArgs& a, int64_t r0, int64_t r1);
  // The mse search's final codes and exact errors, rows [r0, r1) (see CodeArgs).
  void (*range_codes)(const CodeArgs& a, int64_t r0, int64_t r1);
  int64_t gemv_group;      // x rows per gemv pass (gemv takes B <= gemv_group)
  int64_t max_gemv_batch;  // batches up to this run gemv passes; larger ones decoded blocks + GEMM
};

// The scalar loop of range_codes over columns [k0, k1) of row r, range s (adds to err).
inline void range_codes_tail(const CodeArgs& a, int64_t r, int64_t s, int64_t k0, int64_t k1) {
  const float* mag = a.mag + r * a.cols;
  const float* gap = a.gap + r * a.cols;
  const float* t = a.tables + (s * a.R + r) * 256;
  const float delta = a.delta[r * a.S + s], half = a.half[r * a.S + s];
  double e = 0.0;
  for (int64_t k = k0; k < k1; ++k) {
    const int32_t c = range_code(mag[k], gap[k], delta, half, a.K);
    const double d = mag[k] - t[c];
    e += d * d;
    if (s == a.write) a.codes[r * a.cols + k] = static_cast<uint8_t>(c);
  }
  a.err[r * a.S + s] += e;
}

// a_k and the clamped gaps of one block of a row (shared by every ISA: the element-wise part).
inline float dev_weight(float mag, float unit, float floor2) {
  const float m = mag * unit;
  return std::max(m * m - floor2, 0.0f);
}

// The weights a_k and clamped gaps of columns [k0, k0 + n) of row r into wb / gb, zero-padded to
// `padded` columns (a = 0 adds nothing); returns the float32 sum of the weights, in column order.
inline float dev_block(const DevArgs& a, int64_t r, int64_t k0, int64_t n, int64_t padded, float* wb, float* gb) {
  const float* mag = a.mag + r * a.cols + k0;
  const float* gap = a.gap + r * a.cols + k0;
  float ws = 0.0f;
  for (int64_t k = 0; k < padded; ++k) {
    wb[k] = k < n ? dev_weight(mag[k], a.unit[r], a.floor2[r]) : 0.0f;
    gb[k] = k < n ? std::min(gap[k], a.tau[r]) : 0.0f;
    ws += wb[k];
  }
  return ws;
}

// Batches up to max_gemv_batch run the LUT-GEMV in passes of gemv_group rows of x (IsaKernels); larger
// ones decoded blocks + GEMM. AVX-512 and scalar: up to 8, in passes of 4 (AVX-512 at 3072x3072: batch
// 4 0.8 ms, 8 in one pass 3.0 ms, in two passes of 4 ~1.6 ms, the decoded-block path ~2.0 ms).
constexpr int64_t kMaxGemvBatch = 8;
// With own_gemm = 1, batches above this hand the decoded blocks to ATen's BLAS (at::mm / addmm)
// instead of the ISA's micro-GEMM, whose per-output dot products and reductions fall behind a blocked
// sgemm as the batch grows where the BLAS runs its best kernels. Measured at 3072x3072 packed, 1
// thread, Intel Xeon 6/207, own/BLAS vs nn.Linear: batch 64 1.05/1.43, 96 1.09/1.13, 128 1.13/1.08,
// 512 2.97/1.24. On AMD EPYC the BLAS is the slower one (own_gemm = 2 there, docs/perf.md).
constexpr int64_t kOwnGemmMaxBatch = 96;
constexpr int64_t kGemvGroup = 4;
// AVX2: up to 8 in one pass. Its lookups (scalar loads, ~2 weights a cycle) cost more than a pass's
// FMAs, so one pass of 5-8 rows costs little more than one of 4: AMD EPYC Zen 3, 3072x3072, 1 thread,
// batch 5-8 1.36-1.67x faster than passes of 4 (docs/perf.md). Past 8 the decoded blocks are faster
// than a pass of 8 and one of the rest (batches 9-16 measured there).
constexpr int64_t kAvx2GemvGroup = 8;
// code_gemm's panels: kPanel rows of x, each column's kPanel floats contiguous, zeros past B.
constexpr int64_t kPanel = 16;
inline int64_t panel_floats(int64_t B, int64_t kpad) { return (B + kPanel - 1) / kPanel * kPanel * kpad; }
// code_gemm up to this batch; above it the decoded blocks. Every tile streams all of x's panels
// (B x kpad floats), which outgrow the caches: AMD EPYC Zen 3, 3072x8192, 1 thread, code_gemm / ATen
// on decoded blocks, x nn.Linear: batch 96 0.78 / 0.94-1.06, 128 0.91-1.03 / 0.94-1.06, 512 2.2-2.4 / 0.94-1.2.
constexpr int64_t kCodeGemmMaxBatch = 96;
constexpr int64_t kAvx2MaxGemvBatch = 8;

extern const IsaKernels kScalarKernels;
#if defined(QINS_X86)
extern const IsaKernels kAvx2Kernels;
extern const IsaKernels kAvx512Kernels;
#endif

}  // namespace qins
