// Torch binding of the QINS CPU kernels: argument checks, ISA dispatch, and the one
// at::parallel_for region per call (batch <= the ISA's max_gemv_batch: LUT-GEMV straight from the codes;
// larger batches: the ISA's GEMM straight from the codes where it has one (AVX2) and own_gemm picks it,
// else per-thread blocks of rows decoded into a reused thread-local scratch, then a single-threaded
// GEMM into y[:, rows]).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>

#include "qins_kernels.h"

namespace qins {
namespace {

enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

bool supported(int64_t isa) {
  switch (isa) {
    case kScalar: return true;
#if defined(QINS_X86)
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vbmi");
#endif
    default: return false;
  }
}

int64_t best_isa() {
  for (int64_t isa : {kAvx512, kAvx2})
    if (supported(isa)) return isa;
  return kScalar;
}

const IsaKernels& kernels(int64_t isa) {
  if (isa == kAuto) isa = best_isa();
  TORCH_CHECK(supported(isa), "qins: ISA path ", isa, " is not supported by this CPU/build");
  switch (isa) {
#if defined(QINS_X86)
    case kAvx512: return kAvx512Kernels;
    case kAvx2: return kAvx2Kernels;
#endif
    default: return kScalarKernels;
  }
}

// Per-thread scratch for decoded row blocks, reused across calls (never a weight-sized buffer).
std::atomic<int64_t> g_scratch_max{0};
float* scratch(int64_t floats) {
  struct Buf {
    float* p = nullptr;
    int64_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf buf;
  if (buf.n < floats) {
    std::free(buf.p);
    buf.p = static_cast<float*>(std::aligned_alloc(64, ((floats * 4 + 63) / 64) * 64));
    TORCH_CHECK(buf.p, "qins: scratch allocation failed");
    buf.n = floats;
    int64_t prev = g_scratch_max.load();
    while (prev < floats * 4 && !g_scratch_max.compare_exchange_weak(prev, floats * 4)) {}
  }
  return buf.p;
}

bool is_intel() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
#else
  return true;
#endif
}

int64_t default_own_gemm() { return is_intel() ? 1 : 2; }

// Tuning knobs (set_tuning; perf/kernel_bench.py explores them).
struct Tuning {
  int64_t gemv_col_block = 1 << 30;  // gemv column block (no blocking by default, see notes)
  // Decoded blocks for batch > kMaxGemvBatch: gemm_rows rows (twice that for batch > 64), and a
  // scratch of at most gemm_rows x gemm_cols fp32 (1.5 MiB, fits L2). Measured at batch 32,
  // 3072x3072 split: 128x3072 0.94-0.98x of F.linear, 256x2048 1.14x.
  int64_t gemm_rows = 128;
  int64_t gemm_cols = 3072;
  // gemv software prefetch distance (bytes; 0 = off). Measured at 3072x8192, batch 1, cold:
  // none 12 G weights/s, 2 KiB 17, 4 KiB 21, 8 KiB 24-26, 16 KiB 27-29, 32 KiB 26-28 (tables built
  // 16 rows at a time). With 2 rows at a time (row_chunk below; AMD EPYC, 2026-11-28, per-row packed,
  // % of the streaming floor): 4 KiB 62-76%, 8 KiB 73-77%, 12 KiB 77-78%, 16 KiB 71%.
  int64_t prefetch = 12288;
  int64_t pipeline = 1;              // gemv: next row's table built inside the row loop (0 off, 1 split, 2 all)
  // Batches above max_gemv_batch: 0 at::mm on decoded blocks; 1 the ISA's own GEMM (if it has one: AVX2's
  // from the codes, AVX-512's on decoded blocks) up to kOwnGemmMaxBatch, at::mm above; 2 the own GEMM at
  // every batch. ATen's fp32 GEMM is MKL's, whose fastest kernels run on Intel CPUs: on AMD EPYC family
  // 26 the own AVX-512 GEMM was ~0.74x nn.Linear at batch 512 and at::mm on the decoded blocks ~0.97x;
  // on family 25 model 1 (Zen 3, AVX2) MKL runs batches 9-64 at 20-40 GFLOP/s and AVX2's code GEMM at
  // 45-70 (docs/perf.md), so the default depends on the vendor. AVX2's code GEMM runs up to
  // kCodeGemmMaxBatch rows, decoded blocks above; on Intel it is unmeasured.
  int64_t own_gemm = default_own_gemm();
  // gemv: rows whose per-row tables are built before their column loop (1..kMaxRowChunk). A burst of
  // table work stalls the memory stream; measured (3072x3072 / 3072x8192 per-row packed, batch 1,
  // cold, % of the streaming floor, same runs): 16 rows 61-69%, 4 rows 71-75%, 2 rows 73-77%, 1 row 70-75%.
  int64_t row_chunk = 2;
  // AVX2 table lookups: 1 half by vgatherdps and half by scalar loads, 0 all by scalar loads.
  // Measured (3072x3072 packed, batch 1, 1 thread, docs/perf.md): on an Intel Xeon 6/207 the mix
  // wins (1.8-1.9 ms a pass; scalar only 2.6); on AMD EPYC family 25 model 1 (Zen 3, AVX2 only) the
  // gathers lose (mix 3.2 ms, scalar only 2.1-2.4), so the default depends on the vendor.
  int64_t gather = is_intel() ? 1 : 0;
};
// Written by set_tuning, read by every call: each call takes one snapshot under the lock, so a call
// never sees half of a set_tuning (and the kernels read their own copy, not the global).
std::mutex g_tuning_mutex;
Tuning g_tuning;

// Whether batch B runs the ISA's own GEMM (Tuning::own_gemm) rather than ATen's on decoded blocks.
bool own_gemm(const Tuning& t, int64_t B) { return t.own_gemm == 2 || (t.own_gemm == 1 && B <= kOwnGemmMaxBatch); }

Tuning tuning_snapshot() {
  std::lock_guard<std::mutex> lock(g_tuning_mutex);
  return g_tuning;
}

// The range each knob is accepted in: wide enough for any experiment, narrow enough that no product
// or sum of knobs in linear() can overflow int64 (gemm_rows * gemm_cols <= 2**44) nor any divisor
// become 0.
void check_tuning(const Tuning& t) {
  auto in = [](const char* name, int64_t v, int64_t lo, int64_t hi) {
    TORCH_CHECK(v >= lo && v <= hi, "qins: ", name, " must be in [", lo, ", ", hi, "], got ", v);
  };
  in("col_block", t.gemv_col_block, 1, int64_t{1} << 40);
  in("gemm_rows", t.gemm_rows, 1, int64_t{1} << 20);
  in("gemm_cols", t.gemm_cols, 1, int64_t{1} << 24);
  in("prefetch", t.prefetch, 0, int64_t{1} << 20);
  in("pipeline", t.pipeline, 0, 2);
  in("own_gemm", t.own_gemm, 0, 2);
  in("row_chunk", t.row_chunk, 1, kMaxRowChunk);
  in("gather", t.gather, 0, 1);
}

// Every tensor the kernels read through a raw pointer is checked for device, dtype, shape and
// contiguity: a CUDA or meta tensor's pointer read as host memory, or a short buffer read past its
// end, would be garbage or a crash rather than an error. x, the logs and the bias are converted to
// contiguous float32 copies by the callers (so any strides and, for x and the bias, any floating
// dtype are fine); codes and sign are read in place.
void check_args(const at::Tensor& x, const at::Tensor& codes, const c10::optional<at::Tensor>& sign,
                const at::Tensor& log_min, const at::Tensor& log_max, const c10::optional<at::Tensor>& bias,
                const c10::optional<at::Tensor>& row_table = c10::nullopt) {
  TORCH_CHECK(codes.device().is_cpu(), "qins native linear: CPU tensors only, codes is on ", codes.device());
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous(),
              "qins: codes must be a contiguous uint8 [out, in] tensor");
  TORCH_CHECK(x.device().is_cpu(), "qins native linear: CPU tensors only, x is on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == codes.size(1), "qins: x.shape[-1] must equal in_features");
  TORCH_CHECK(x.is_floating_point(), "qins: x must be floating point");
  if (sign.has_value()) {
    TORCH_CHECK(sign->device().is_cpu(), "qins native linear: CPU tensors only, sign is on ", sign->device());
    TORCH_CHECK(sign->scalar_type() == at::kChar && sign->sizes() == codes.sizes() && sign->is_contiguous(),
                "qins: sign must be a contiguous int8 tensor shaped like codes");
  }
  TORCH_CHECK(log_min.device().is_cpu() && log_max.device().is_cpu(), "qins native linear: CPU tensors only, log_min/log_max are on ",
              log_min.device(), "/", log_max.device());
  TORCH_CHECK(log_min.scalar_type() == at::kFloat && log_max.scalar_type() == at::kFloat,
              "qins: log_min/log_max must be float32");
  TORCH_CHECK(log_min.sizes() == log_max.sizes(), "qins: log_min and log_max must have the same shape");
  if (row_table.has_value()) {
    // shared tables: every index is read as an offset into the call's tables, so each is checked
    TORCH_CHECK(row_table->device().is_cpu(), "qins native linear: CPU tensors only, row_table is on ", row_table->device());
    TORCH_CHECK(row_table->scalar_type() == at::kByte && row_table->dim() == 1 && row_table->size(0) == codes.size(0) &&
                row_table->is_contiguous(), "qins: row_table must be a contiguous uint8 [out] tensor");
    TORCH_CHECK(log_min.dim() == 1 && log_min.size(0) >= 1 && log_min.size(0) <= kMaxTables,
                "qins: with row_table, log_min/log_max must be [n] with 1 <= n <= ", kMaxTables);
    const uint8_t* t = row_table->data_ptr<uint8_t>();
    uint8_t top = 0;
    for (int64_t r = 0; r < row_table->size(0); ++r) top = std::max(top, t[r]);
    TORCH_CHECK(row_table->size(0) == 0 || top < log_min.size(0), "qins: row_table names table ", int(top), " of ",
                log_min.size(0));
  } else {
    TORCH_CHECK(log_min.dim() == 0 || (log_min.dim() == 1 && log_min.size(0) == codes.size(0)),
                "qins: log_min/log_max must be 0-d or [out]");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu(), "qins native linear: CPU tensors only, bias is on ", bias->device());
    TORCH_CHECK(bias->is_floating_point(), "qins: bias must be floating point");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == codes.size(0), "qins: bias must be a [out_features] tensor");
  }
}

// y[b, r] *= s[r] for rows [r0, r1) of B outputs with leading dimension ld: the shared tables
// formats' per-row scale, applied to each finished dot product (one rounding, after the sum).
void scale_rows(float* y, int64_t ld, int64_t B, const float* s, int64_t r0, int64_t r1) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = r0; r < r1; ++r) y[b * ld + r] *= s[r];
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& codes, const c10::optional<at::Tensor>& sign,
                  const at::Tensor& log_min, const at::Tensor& log_max, const c10::optional<at::Tensor>& bias,
                  int64_t spacing, int64_t isa, const c10::optional<at::Tensor>& row_table,
                  const c10::optional<at::Tensor>& row_scale) {
  TORCH_CHECK(spacing == 0 || spacing == 1, "qins: spacing must be 0 (log) or 1 (mulaw), got ", spacing);
  TORCH_CHECK(row_table.has_value() == row_scale.has_value(), "qins: row_table and row_scale come together");
  check_args(x, codes, sign, log_min, log_max, bias, row_table);
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->device().is_cpu(), "qins native linear: CPU tensors only, row_scale is on ", row_scale->device());
    TORCH_CHECK(row_scale->scalar_type() == at::kFloat && row_scale->dim() == 1 && row_scale->size(0) == codes.size(0) &&
                row_scale->is_contiguous(), "qins: row_scale must be a contiguous float32 [out] tensor");
  }
  const float* rs = row_scale.has_value() ? row_scale->data_ptr<float>() : nullptr;
  const IsaKernels& K = kernels(isa);
  const Tuning tune = tuning_snapshot();
  const int64_t out = codes.size(0), in = codes.size(1);
  const int64_t B = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor x2 = x.reshape({B, in}).to(at::kFloat).contiguous();
  const at::Tensor lmin = log_min.contiguous(), lmax = log_max.contiguous();
  const int64_t kpad = K.kpad(in);
  at::Tensor xp = K.xprep_identity ? x2 : at::empty({B, kpad}, x2.options());
  at::Tensor y = at::empty({B, out}, x2.options());
  if (in == 0) y.zero_();
  if (B > 0 && out > 0 && in > 0) {
    if (!K.xprep_identity) K.xprep(x2.data_ptr<float>(), B, in, kpad, xp.data_ptr<float>());
    Args a{codes.data_ptr<uint8_t>(), sign.has_value() ? sign->data_ptr<int8_t>() : nullptr,
           lmin.data_ptr<float>(), lmax.data_ptr<float>(), lmin.dim() == 1, in, out, kpad,
           xp.data_ptr<float>(), B, y.data_ptr<float>(), std::max<int64_t>(64, tune.gemv_col_block / 64 * 64),
           tune.prefetch, tune.pipeline, tune.row_chunk, static_cast<int>(spacing),
           row_table.has_value() ? row_table->data_ptr<uint8_t>() : nullptr, row_table.has_value() ? lmin.size(0) : 1};
    if (row_table.has_value()) a.per_row = 0;
    a.gather = tune.gather;
    if (B <= K.max_gemv_batch) {
      const int64_t grain = std::max<int64_t>(16, (1 << 16) / std::max<int64_t>(in, 1));
      // x rows in passes of <= the ISA's gemv_group (qins_kernels.h: 4 on AVX-512, where one pass of
      // 8 was slower than two of 4; 8 on AVX2, where each pass pays for its table lookups).
      at::parallel_for(0, out, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t b0 = 0; b0 < B; b0 += K.gemv_group) {
          Args g = a;
          g.xp += b0 * kpad;
          g.y += b0 * out;
          g.B = std::min(K.gemv_group, B - b0);
          K.gemv(g, r0, r1);
          if (rs) scale_rows(g.y, out, g.B, rs, r0, r1);
        }
      });
    } else if (K.code_gemm && B <= kCodeGemmMaxBatch && own_gemm(tune, B)) {
      // The ISA's GEMM straight from the codes (AVX2): x packed once, rows in tiles across threads.
      at::Tensor xt = at::empty({panel_floats(B, kpad)}, x2.options());
      K.pack_panels(xp.data_ptr<float>(), B, kpad, xt.data_ptr<float>());
      const int64_t grain = std::max<int64_t>(6, (1 << 16) / std::max<int64_t>(in, 1) / 6 * 6);
      at::parallel_for(0, out, grain, [&](int64_t r0, int64_t r1) {
        K.code_gemm(a, xt.data_ptr<float>(), r0, r1);
        if (rs) scale_rows(y.data_ptr<float>(), out, B, rs, r0, r1);
      });
    } else {
      // Blocks of rb rows x kb columns: rb = gemm_rows (2x for batches > 64, 8x above 256 on the BLAS path),
      // kb such that the scratch stays within gemm_rows x gemm_cols floats and the columns split
      // evenly; each thread gets the same number of blocks (of >= 16 rows). The BLAS path trades
      // columns for rows: every at::mm packs its slice of x again, so fewer, taller blocks pack x
      // fewer times (3072x3072, batch 512, 1 thread, Intel Xeon 6/207: 256x1536 blocks 1.15-1.17x
      // nn.Linear, 1024x384 1.09-1.10x; docs/perf.md).
      const int64_t budget = tune.gemm_rows * tune.gemm_cols;
      const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
      const int64_t per_thread = (out + threads - 1) / threads;
      const bool own = K.gemm && own_gemm(tune, B);
      const int64_t rows = !own && B > 256 ? 8 * tune.gemm_rows : (B > 64 ? 2 * tune.gemm_rows : tune.gemm_rows);
      const int64_t blocks_per_thread = (per_thread + rows - 1) / rows;
      const int64_t rb = std::max<int64_t>(16, ((per_thread + blocks_per_thread - 1) / blocks_per_thread + 15) / 16 * 16);
      const int64_t max_kb = std::max<int64_t>(64, budget / rb / 64 * 64);
      const int64_t nk = (kpad + max_kb - 1) / max_kb;
      const int64_t kb = std::min(kpad, ((kpad + nk - 1) / nk + 63) / 64 * 64);
      const int64_t nblocks = (out + rb - 1) / rb;
      // The BLAS path runs ATen ops (mm_out, addmm_) on the worker threads, which do not inherit the
      // caller's thread-local state: under torch.inference_mode() y is an inference tensor, and an
      // in-place update of it outside InferenceMode raises. Each worker takes the caller's state.
      const at::ThreadLocalState caller_state;
      at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
        const at::ThreadLocalStateGuard state_guard(caller_state);
        float* w = scratch(rb * kb);
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * rb, r1 = std::min(out, r0 + rb);
          at::Tensor ys = y.narrow(1, r0, r1 - r0);
          for (int64_t k0 = 0; k0 < kpad; k0 += kb) {
            const int64_t k1 = std::min(kpad, k0 + kb);
            K.decode(a, r0, r1, k0, k1, w);
            if (own) {
              K.gemm(xp.data_ptr<float>() + k0, kpad, B, w, r1 - r0, k1 - k0, y.data_ptr<float>() + r0, out, k0 > 0);
              continue;
            }
            at::Tensor wt = at::from_blob(w, {r1 - r0, k1 - k0}, x2.options());
            at::Tensor xs = xp.narrow(1, k0, k1 - k0);
            if (k0 == 0) at::mm_out(ys, xs, wt.t());
            else ys.addmm_(xs, wt.t());
          }
          if (rs) scale_rows(y.data_ptr<float>(), out, B, rs, r0, r1);
        }
      });
    }
  }
  if (bias.has_value()) y.add_(bias->reshape({1, out}).to(at::kFloat));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  return y.to(x.scalar_type()).reshape(shape);
}

// The mse search's rounding-deviation score [R, C] float64 (see DevArgs), rows in parallel.
at::Tensor rounding_deviation(const at::Tensor& mag, const at::Tensor& gap, const at::Tensor& inv, const at::Tensor& unit,
                              const at::Tensor& floor2, const at::Tensor& tau, int64_t isa) {
  const IsaKernels& K = kernels(isa);
  for (const at::Tensor* t : {&mag, &gap, &inv, &unit, &floor2, &tau})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "qins: rounding_deviation takes contiguous float32 CPU tensors");
  TORCH_CHECK(mag.dim() == 2 && gap.sizes() == mag.sizes(), "qins: mag and gap must be [R, cols] alike");
  const int64_t R = mag.size(0);
  TORCH_CHECK(inv.dim() == 2 && inv.size(0) == R, "qins: inv must be [R, C]");
  for (const at::Tensor* t : {&unit, &floor2, &tau}) TORCH_CHECK(t->numel() == R, "qins: unit/floor2/tau need R values");
  at::Tensor dev = at::empty({R, inv.size(1)}, mag.options().dtype(at::kDouble));
  DevArgs a{mag.data_ptr<float>(), gap.data_ptr<float>(), mag.size(1), inv.data_ptr<float>(), inv.size(1),
            unit.data_ptr<float>(), floor2.data_ptr<float>(), tau.data_ptr<float>(), dev.data_ptr<double>()};
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(mag.size(1), 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) { K.deviation(a, r0, r1); });
  return dev;
}

// The mse search's final codes and exact errors (see CodeArgs): err [R, S] float64, and codes
// [R, cols] uint8 of range `write` (an empty tensor when write < 0), rows in parallel.
std::vector<at::Tensor> range_codes(const at::Tensor& mag, const at::Tensor& gap, const at::Tensor& delta,
                                    const at::Tensor& half, const at::Tensor& tables, int64_t K, int64_t write,
                                    int64_t isa) {
  const IsaKernels& K_ = kernels(isa);
  for (const at::Tensor* t : {&mag, &gap, &delta, &half, &tables})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "qins: range_codes takes contiguous float32 CPU tensors");
  TORCH_CHECK(mag.dim() == 2 && gap.sizes() == mag.sizes(), "qins: mag and gap must be [R, cols] alike");
  const int64_t R = mag.size(0), S = delta.size(-1);
  TORCH_CHECK(delta.dim() == 2 && delta.size(0) == R && half.sizes() == delta.sizes(), "qins: delta/half must be [R, S]");
  TORCH_CHECK(tables.dim() == 3 && tables.size(0) == S && tables.size(1) == R && tables.size(2) == 256,
              "qins: tables must be [S, R, 256]");
  TORCH_CHECK(K >= 1 && K <= 255, "qins: K must be in 1..255");
  TORCH_CHECK(write < S, "qins: write must name a range (or be negative)");
  at::Tensor err = at::empty({R, S}, mag.options().dtype(at::kDouble));
  at::Tensor codes = at::empty(write >= 0 ? mag.sizes() : at::IntArrayRef{0}, mag.options().dtype(at::kByte));
  CodeArgs a{mag.data_ptr<float>(), gap.data_ptr<float>(), mag.size(1), R, S, delta.data_ptr<float>(),
             half.data_ptr<float>(), tables.data_ptr<float>(), K, err.data_ptr<double>(),
             write >= 0 ? codes.data_ptr<uint8_t>() : nullptr, write};
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(mag.size(1), 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) { K_.range_codes(a, r0, r1); });
  return {err, codes};
}

// Debug: the [R, 256] tables exactly as the chosen ISA computes them.
at::Tensor table(const at::Tensor& log_min, const at::Tensor& log_max, bool packed, int64_t spacing, int64_t isa) {
  const IsaKernels& K = kernels(isa);
  TORCH_CHECK(spacing == 0 || spacing == 1, "qins: spacing must be 0 (log) or 1 (mulaw), got ", spacing);
  TORCH_CHECK(log_min.device().is_cpu() && log_max.device().is_cpu(), "qins: table takes CPU tensors");
  TORCH_CHECK(log_min.is_floating_point() && log_max.is_floating_point(), "qins: table takes floating point logs");
  TORCH_CHECK(log_min.numel() == log_max.numel(), "qins: log_min and log_max must have as many values");
  at::Tensor lo = log_min.to(at::kFloat).reshape({-1}).contiguous(), hi = log_max.to(at::kFloat).reshape({-1}).contiguous();
  at::Tensor t = at::empty({lo.size(0), 256}, lo.options());
  for (int64_t r = 0; r < lo.size(0); ++r) K.table(lo.data_ptr<float>()[r], hi.data_ptr<float>()[r], packed, static_cast<int>(spacing), t.data_ptr<float>() + r * 256);
  return t;
}

// Debug: decoded weights [out, kpad] and the prepared x [B, kpad], in the ISA's column order.
std::vector<at::Tensor> decode_debug(const at::Tensor& codes, const c10::optional<at::Tensor>& sign,
                                     const at::Tensor& log_min, const at::Tensor& log_max, const at::Tensor& x,
                                     int64_t spacing, int64_t isa, const c10::optional<at::Tensor>& row_table) {
  TORCH_CHECK(spacing == 0 || spacing == 1, "qins: spacing must be 0 (log) or 1 (mulaw), got ", spacing);
  check_args(x, codes, sign, log_min, log_max, c10::nullopt, row_table);
  const IsaKernels& K = kernels(isa);
  const int64_t out = codes.size(0), in = codes.size(1), kpad = K.kpad(in);
  at::Tensor x2 = x.reshape({-1, in}).to(at::kFloat).contiguous();
  at::Tensor xp = at::empty({x2.size(0), kpad}, x2.options()), w = at::empty({out, kpad}, x2.options());
  K.xprep(x2.data_ptr<float>(), x2.size(0), in, kpad, xp.data_ptr<float>());
  at::Tensor lmin = log_min.contiguous(), lmax = log_max.contiguous();
  Args a{codes.data_ptr<uint8_t>(), sign.has_value() ? sign->data_ptr<int8_t>() : nullptr, lmin.data_ptr<float>(),
         lmax.data_ptr<float>(), lmin.dim() == 1, in, out, kpad, xp.data_ptr<float>(), x2.size(0), nullptr, kpad};
  a.mulaw = static_cast<int>(spacing);
  a.gather = tuning_snapshot().gather;
  if (row_table.has_value()) {
    a.per_row = 0;
    a.row_table = row_table->data_ptr<uint8_t>();
    a.ntables = lmin.size(0);
  }
  K.decode(a, 0, out, 0, kpad, w.data_ptr<float>());
  return {w, xp};
}

}  // namespace qins

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &qins::linear, "QINS linear (fp32 accumulation)", py::arg("x"), py::arg("codes"), py::arg("sign"),
        py::arg("log_min"), py::arg("log_max"), py::arg("bias"), py::arg("spacing"), py::arg("isa"),
        py::arg("row_table") = py::none(), py::arg("row_scale") = py::none());
  m.def("range_codes", &qins::range_codes, "the mse search's final codes and exact errors");
  m.def("rounding_deviation", &qins::rounding_deviation, "the mse search's rounding-deviation score [R, C]");
  m.def("table", &qins::table, "debug: the ISA's [R, 256] level tables");
  m.def("decode_debug", &qins::decode_debug, "debug: decoded weights (unscaled) and prepared x", py::arg("codes"),
        py::arg("sign"), py::arg("log_min"), py::arg("log_max"), py::arg("x"), py::arg("spacing"), py::arg("isa"),
        py::arg("row_table") = py::none());
  m.def("supported", &qins::supported, "whether an ISA path (1 scalar, 2 avx2, 3 avx512) runs here");
  m.def("best_isa", &qins::best_isa, "the ISA path chosen by default");
  m.def("set_tuning", [](int64_t col_block, int64_t gemm_rows, int64_t gemm_cols, int64_t prefetch, int64_t pipeline,
                         int64_t own_gemm, int64_t row_chunk, int64_t gather) {
    const qins::Tuning t{col_block, gemm_rows, gemm_cols, prefetch, pipeline, own_gemm, row_chunk, gather};
    qins::check_tuning(t);  // all checked before any is set: a refused call changes nothing
    std::lock_guard<std::mutex> lock(qins::g_tuning_mutex);
    qins::g_tuning = t;
  }, "tuning knobs (the Tuning struct's fields, in order; each range-checked)");
  m.def("get_tuning", []() {
    const qins::Tuning t = qins::tuning_snapshot();
    return std::vector<int64_t>{t.gemv_col_block, t.gemm_rows, t.gemm_cols, t.prefetch, t.pipeline, t.own_gemm, t.row_chunk, t.gather};
  });
  m.def("scratch_bytes_max", []() { return qins::g_scratch_max.load(); }, "largest per-thread scratch");
}
