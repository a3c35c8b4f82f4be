// Few-row matmuls y[T, N] = x[T, K] @ W[K, N] on the CPU, reading W's stored bytes once (XLA FFI handlers).
//
// Why: XLA's CPU dot reads a row-major [in, out] weight at about half the memory bandwidth in a matrix-vector
// product, converts an int8/int4 weight into a float32 copy before the dot, and runs a 16-row product at
// under half the speed of a large one (benchmarks/RESULTS.md). Decode is a few rows against large weights, so
// it pays all three. These kernels stream W once, convert narrow values in registers and keep one
// accumulator per output element.
//
// Each output y[t, n] is accumulated over k in order 0, 1, ..., K-1 with a fused multiply-add whatever T is
// and however the outputs are split across threads, so a row's result does not depend on its batch (the
// server's greedy tokens equal the CLI's). Formats (ktjax/weight_quant.py):
//   float32 / bfloat16 W [K, N];  int8 W [K, N] with scales [1, N] applied to the finished sum;
//   int4 W packed [P/2, N] with group scales [P/g, N]: packed row k g/2 + j holds input k g + j in its low
//   nibble and k g + g/2 + j in its high one (value + 8); each group's partial sum is scaled, then added.
#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;              // floats per vector (one 64-byte cache line)
constexpr int kMaxRows = 16;            // rows per call (ktjax/cpu_kernels.py MAX_ROWS)

typedef float f32v __attribute__((vector_size(64)));
typedef int8_t s8v __attribute__((vector_size(16)));
typedef uint8_t u8v __attribute__((vector_size(16)));
typedef uint16_t u16v __attribute__((vector_size(32)));
typedef uint32_t u32v __attribute__((vector_size(64)));
typedef int32_t s32v __attribute__((vector_size(64)));

template <typename V>
inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

inline void store(float* p, f32v v) { std::memcpy(p, &v, sizeof(v)); }

// 16 narrow integers as floats. GCC's generic vector conversions scalarize these, so the widening is spelled
// with intrinsics where the CPU has them (-march=native), and as a plain loop elsewhere.
inline f32v widen_s8(const int8_t* p) {
#if defined(__AVX512F__)
  return (f32v)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  __m128i b = _mm_loadu_si128((const __m128i*)p);
  __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  f32v out;
  std::memcpy(&out, &lo, 32);
  std::memcpy((char*)&out + 32, &hi, 32);
  return out;
#else
  f32v out;
  for (int i = 0; i < kLanes; ++i) out[i] = float(p[i]);
  return out;
#endif
}

// 16 bytes of packed int4 -> (low nibbles - 8, high nibbles - 8) as floats.
inline void widen_u4(const uint8_t* p, f32v& lo, f32v& hi) {
#if defined(__AVX512F__)
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  __m512i eight = _mm512_set1_epi32(8);
  lo = (f32v)_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, _mm512_set1_epi32(15)), eight));
  hi = (f32v)_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight));
#else
  for (int i = 0; i < kLanes; ++i) {
    lo[i] = float(p[i] & 15) - 8.f;
    hi[i] = float(p[i] >> 4) - 8.f;
  }
#endif
}

inline f32v widen_bf16(const uint16_t* p) {
#if defined(__AVX512F__)
  __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return (f32v)_mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
#else
  u32v wide = __builtin_convertvector(load<u16v>(p), u32v) << 16;
  return (f32v)wide;
#endif
}

// One weight row's 16 values as floats, for each stored type.
struct F32 {
  using T = float;
  static f32v get(const float* p) { return load<f32v>(p); }
  static float one(const float* p) { return *p; }
};
struct BF16 {
  using T = uint16_t;
  static f32v get(const uint16_t* p) { return widen_bf16(p); }
  static float one(const uint16_t* p) {
    uint32_t bits = uint32_t(*p) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};
struct S8 {
  using T = int8_t;
  static f32v get(const int8_t* p) { return widen_s8(p); }
  static float one(const int8_t* p) { return float(*p); }
};

// Loop order: y is a small buffer of T x kChunk outputs (L1/L2), and each weight row's slice of the chunk is
// read front to back, kRows rows at a time: long sequential reads that the prefetcher follows, where a
// register tile over a few outputs would jump a whole row's bytes between short reads. For each output the
// updates still come in the order k = 0, 1, ..., K-1.
constexpr int kRows = 4;                // weight rows per pass over the chunk
constexpr int64_t kAccFloats = 1 << 16;  // the chunk's accumulators: 256 KiB, within L2

// Outputs per chunk: as long as the rows' accumulators fit kAccFloats (reads of 64 KiB and more per weight row
// run at ~30 GB/s here, 4 KiB ones at ~15), a multiple of 256 (so that rows chunk + kLanes apart never sit a
// multiple of 4 KiB apart).
inline int64_t chunk_width(int64_t rows) { return std::max<int64_t>(256, (kAccFloats / rows - kLanes) / 256 * 256); }

// Per-thread accumulators (kept off the stack: XLA's pool threads need not have large stacks). A row's
// accumulators start kLanes floats past a multiple of the chunk width: rows 4 KiB apart would share L1 sets.
inline float* chunk_buffer(int which) {
  alignas(64) static thread_local float buffers[2][kAccFloats + kMaxRows * kLanes];
  return buffers[which];
}

// acc[t][c, c + 16 V) += sum over r < R of x[t, r] * w[r][c, c + 16 V), in order r = 0, 1, ...: V vectors at
// a time, so that each x value loaded serves V fused multiply-adds.
template <typename W, int R, int V>
inline void dense_vectors(const float* x, int64_t ldx, int64_t rows, const typename W::T* w, int64_t n,
                          int64_t c, float* acc, int64_t ld) {
  f32v wv[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) wv[r][v] = W::get(w + r * n + c + v * kLanes);
  for (int64_t t = 0; t < rows; ++t) {
    f32v a[V];
    for (int v = 0; v < V; ++v) a[v] = load<f32v>(acc + t * ld + c + v * kLanes);
    for (int r = 0; r < R; ++r) {
      float xs = x[t * ldx + r];
      for (int v = 0; v < V; ++v) a[v] += xs * wv[r][v];
    }
    for (int v = 0; v < V; ++v) store(acc + t * ld + c + v * kLanes, a[v]);
  }
}

template <typename W, int R>
inline void dense_pass(const float* x, int64_t ldx, int64_t rows, const typename W::T* w, int64_t n,
                       int64_t width, float* acc, int64_t ld) {
  int64_t c = 0;
  for (; c + 4 * kLanes <= width; c += 4 * kLanes) dense_vectors<W, R, 4>(x, ldx, rows, w, n, c, acc, ld);
  for (; c < width; c += kLanes) dense_vectors<W, R, 1>(x, ldx, rows, w, n, c, acc, ld);
}

// Outputs [n0, n1) of a dense (float32, bfloat16, int8) weight; int8's scales multiply the finished sums.
template <typename W>
void dense_range(const float* x, int64_t rows, int64_t k_len, const typename W::T* w, int64_t n, float* y,
                 const float* scale, int64_t n0, int64_t n1) {
  float* acc = chunk_buffer(0);
  int64_t chunk = chunk_width(rows), ld = chunk + kLanes;
  for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
    int64_t width = std::min(chunk, n1 - c0), vec = width / kLanes * kLanes;
    std::memset(acc, 0, sizeof(float) * rows * ld);
    int64_t k = 0;
    for (; k + kRows <= k_len; k += kRows) dense_pass<W, kRows>(x + k, k_len, rows, w + k * n + c0, n, vec, acc, ld);
    for (; k < k_len; ++k) dense_pass<W, 1>(x + k, k_len, rows, w + k * n + c0, n, vec, acc, ld);
    for (int64_t t = 0; t < rows; ++t) {
      for (int64_t c = vec; c < width; ++c) {  // the < 16 outputs left at the end of a row
        float a = 0.f;
        for (int64_t kk = 0; kk < k_len; ++kk) a = __builtin_fmaf(x[t * k_len + kk], W::one(w + kk * n + c0 + c), a);
        acc[t * ld + c] = a;
      }
      for (int64_t c = 0; c < width; ++c) {
        float a = acc[t * ld + c];
        y[t * n + c0 + c] = scale ? a * scale[c0 + c] : a;
      }
    }
  }
}

// int4: each group's partial sums (two inputs per packed byte: low nibble, then high) are scaled and added.
// Two packed rows per pass, V vectors at a time as in dense_vectors.
template <int V>
inline void int4_vectors(const float* x_lo, const float* x_hi, int64_t ldx, int64_t rows, const uint8_t* w,
                         int64_t n, int64_t c, float* part, int64_t ld) {
  f32v lo[2][V], hi[2][V];
  for (int r = 0; r < 2; ++r)
    for (int v = 0; v < V; ++v) widen_u4(w + r * n + c + v * kLanes, lo[r][v], hi[r][v]);
  for (int64_t t = 0; t < rows; ++t) {
    f32v p[V];
    for (int v = 0; v < V; ++v) p[v] = load<f32v>(part + t * ld + c + v * kLanes);
    for (int r = 0; r < 2; ++r) {
      float xl = x_lo[t * ldx + r], xh = x_hi[t * ldx + r];
      for (int v = 0; v < V; ++v) {
        p[v] += xl * lo[r][v];
        p[v] += xh * hi[r][v];
      }
    }
    for (int v = 0; v < V; ++v) store(part + t * ld + c + v * kLanes, p[v]);
  }
}

inline void int4_pass(const float* x_lo, const float* x_hi, int64_t ldx, int64_t rows, const uint8_t* w,
                      int64_t n, int64_t width, float* part, int64_t ld) {
  int64_t c = 0;
  for (; c + 4 * kLanes <= width; c += 4 * kLanes) int4_vectors<4>(x_lo, x_hi, ldx, rows, w, n, c, part, ld);
  for (; c < width; c += kLanes) int4_vectors<1>(x_lo, x_hi, ldx, rows, w, n, c, part, ld);
}

inline float int4_one(const float* x, int64_t half_g, int64_t groups, const uint8_t* w, int64_t n,
                      const float* scale) {
  float acc = 0.f;
  for (int64_t gi = 0; gi < groups; ++gi) {
    float p = 0.f;
    for (int64_t j = 0; j < half_g; ++j) {
      uint8_t b = w[(gi * half_g + j) * n];
      p = __builtin_fmaf(x[gi * 2 * half_g + j], float(b & 15) - 8.f, p);
      p = __builtin_fmaf(x[gi * 2 * half_g + half_g + j], float(b >> 4) - 8.f, p);
    }
    acc = __builtin_fmaf(p, scale[gi * n], acc);
  }
  return acc;
}

void int4_range(const float* x, int64_t rows, int64_t p, const uint8_t* w, int64_t n, int64_t groups,
                const float* scale, float* y, int64_t n0, int64_t n1) {
  float* acc = chunk_buffer(0);
  float* part = chunk_buffer(1);
  int64_t chunk = chunk_width(rows), ld = chunk + kLanes;
  int64_t half_g = p / groups / 2;  // packed rows per group (g / 2: an even number, as g is a multiple of 4)
  for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
    int64_t width = std::min(chunk, n1 - c0), vec = width / kLanes * kLanes;
    std::memset(acc, 0, sizeof(float) * rows * ld);
    for (int64_t gi = 0; gi < groups; ++gi) {
      std::memset(part, 0, sizeof(float) * rows * ld);
      const float* xg = x + gi * 2 * half_g;
      for (int64_t j = 0; j < half_g; j += 2)
        int4_pass(xg + j, xg + half_g + j, p, rows, w + (gi * half_g + j) * n + c0, n, vec, part, ld);
      const float* s = scale + gi * n + c0;
      for (int64_t t = 0; t < rows; ++t)
        for (int64_t c = 0; c < vec; c += kLanes) {
          f32v a = load<f32v>(acc + t * ld + c);
          a += load<f32v>(part + t * ld + c) * load<f32v>(s + c);
          store(acc + t * ld + c, a);
        }
    }
    for (int64_t t = 0; t < rows; ++t) {
      for (int64_t c = vec; c < width; ++c) acc[t * ld + c] = int4_one(x + t * p, half_g, groups, w + c0 + c, n,
                                                                           scale + c0 + c);
      std::memcpy(y + t * n + c0, acc + t * ld, sizeof(float) * width);
    }
  }
}

// Split the N outputs into one range per thread (whole vectors, at least kMinPerTask outputs each), run the
// first range on the calling thread and the others on XLA's intra-op pool; the future completes when all are
// done. Ranges start at multiples of kLanes, so how an output is computed does not depend on the split.
constexpr int64_t kMinPerTask = 256;

template <typename F>
ffi::Future run_split(ffi::ThreadPool pool, int64_t n, F range) {
  int64_t vecs = (n + kLanes - 1) / kLanes;
  int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n / kMinPerTask));
  int64_t per = (vecs + tasks - 1) / tasks * kLanes;
  tasks = (n + per - 1) / per;
  ffi::CountDownPromise done(tasks);
  for (int64_t i = 1; i < tasks; ++i) {
    int64_t n0 = i * per, n1 = std::min(n, n0 + per);
    pool.Schedule([range, n0, n1, done]() mutable {
      range(n0, n1);
      done.CountDown();
    });
  }
  range(0, std::min(n, per));
  done.CountDown();
  return ffi::Future(done);
}

// Rows beyond kMaxRows (the chunk buffers' size) go kMaxRows at a time.
template <typename F>
void by_rows(int64_t rows, F rows_from) {
  for (int64_t t = 0; t < rows; t += kMaxRows) rows_from(t, std::min<int64_t>(kMaxRows, rows - t));
}

template <ffi::DataType D, typename W>
ffi::Future dense_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<D> w, const float* scale,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto dims = w.dimensions();
  int64_t k_len = dims[0], n = dims[1], rows = x.element_count() / k_len;
  const float* xp = x.typed_data();
  const typename W::T* wp = reinterpret_cast<const typename W::T*>(w.untyped_data());
  float* yp = y->typed_data();
  return run_split(pool, n, [=](int64_t n0, int64_t n1) {
    by_rows(rows, [&](int64_t t, int64_t m) {
      dense_range<W>(xp + t * k_len, m, k_len, wp, n, yp + t * n, scale, n0, n1);
    });
  });
}

ffi::Future int8_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  return dense_impl<ffi::S8, S8>(pool, x, w, scale.typed_data(), y);
}

ffi::Future int4_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto dims = w.dimensions();
  int64_t p = 2 * dims[0], n = dims[1], groups = scale.dimensions()[0], rows = x.element_count() / p;
  const float* xp = x.typed_data();
  const uint8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  return run_split(pool, n, [=](int64_t n0, int64_t n1) {
    by_rows(rows, [&](int64_t t, int64_t m) { int4_range(xp + t * p, m, p, wp, n, groups, sp, yp + t * n, n0, n1); });
  });
}

ffi::Future f32_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  return dense_impl<ffi::F32, F32>(pool, x, w, nullptr, y);
}

ffi::Future bf16_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  return dense_impl<ffi::BF16, BF16>(pool, x, w, nullptr, y);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMatmulF32, f32_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMatmulBF16, bf16_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMatmulInt8, int8_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMatmulInt4, int4_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
