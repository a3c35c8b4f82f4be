// Few-row matmuls y[T, N] = x[T, K] @ W^T over int8 / int4 weights held [N, K] (out, in), on the CPU: XLA FFI
// handlers that ktjax/cpu_kernels.py builds and ktjax/weight_quant.py calls for up to cpu_kernels.MAX_ROWS rows
// (decode steps, the routed experts' blocks of a prefill chunk).
//
// Why: XLA's CPU dot turns an int8/int4 weight into a float32 copy before multiplying (a matrix-vector product
// over int8 ran at ~5 GB/s of weights here, int4 at ~2), and a decode step is a few rows against every
// weight. These kernels read the stored bytes once, front to back, widen them in registers and multiply: the
// weight held [out, in] makes each output one contiguous dot product, and a thread's outputs one contiguous
// block of memory (benchmarks/RESULTS.md, "CPU kernels").
//
// Formats (ktjax/weight_quant.py, transposed): int8 values [N, K] with scales [N, 1] applied to the finished
// sum; int4 values [N, P/2] (two per byte: packed column k g/2 + j holds input k g + j in its low nibble and
// k g + g/2 + j in its high one, value + 8) with group scales [N, P/g], each group's sum scaled, then added.
//
// Each output's sum runs in one order (16 lanes over k, then the lanes added in a fixed tree) whatever T is and
// whichever thread computes it, so a row's result does not depend on its batch: the server's greedy tokens
// equal the CLI's.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace ktjax_simd;

// Outputs per block: each a weight row read front to back. A block's rows are short streams (a few KiB) that
// the hardware prefetcher does not follow far, so each read also asks for the same place in the next block.
constexpr int kOut = 4;
constexpr int kRowsMax = 4; // x rows per block

// int8: y[t, o] = scale[o] * sum_k x[t, k] q[o, k] for O outputs and R rows of x.
template <int O, int R>
void int8_block(const float* x, int64_t k_len, const int8_t* q, const float* scale, float* y, int64_t n) {
  f32v acc[O][R] = {};
  int64_t k = 0;
  for (; k + kLanes <= k_len; k += kLanes) {
    f32v w[O], xv[R];
    for (int o = 0; o < O; ++o) {
      __builtin_prefetch(q + (o + kOut) * k_len + k);  // the next block's rows (see kOut)
      w[o] = widen_s8(q + o * k_len + k);
    }
    for (int r = 0; r < R; ++r) xv[r] = load_f32(x + r * k_len + k);
    for (int o = 0; o < O; ++o)
      for (int r = 0; r < R; ++r) acc[o][r] += w[o] * xv[r];
  }
  for (int o = 0; o < O; ++o)
    for (int r = 0; r < R; ++r) {
      float sum = lane_sum(acc[o][r]);
      for (int64_t kk = k; kk < k_len; ++kk) sum = __builtin_fmaf(x[r * k_len + kk], float(q[o * k_len + kk]), sum);
      y[r * n + o] = sum * scale[o];
    }
}

// int4: per group, the sum over its g inputs (low nibbles: the group's first half, high: its second), scaled
// by the group's scale and added.
template <int O, int R>
void int4_block(const float* x, int64_t p, const uint8_t* q, const float* scale, int64_t groups, float* y,
                int64_t n) {
  int64_t half_g = p / groups / 2, packed = p / 2;  // half_g: a multiple of kLanes (g a multiple of 32)
  f32v acc[O][R] = {};
  for (int64_t gi = 0; gi < groups; ++gi) {
    f32v part[O][R] = {};
    for (int64_t j = 0; j < half_g; j += kLanes) {
      f32v lo[O], hi[O], x_lo[R], x_hi[R];
      for (int o = 0; o < O; ++o) {
        __builtin_prefetch(q + (o + kOut) * packed + gi * half_g + j);  // the next block's rows (see kOut)
        widen_u4(q + o * packed + gi * half_g + j, lo[o], hi[o]);
      }
      for (int r = 0; r < R; ++r) {
        x_lo[r] = load_f32(x + r * p + gi * 2 * half_g + j);
        x_hi[r] = load_f32(x + r * p + gi * 2 * half_g + half_g + j);
      }
      for (int o = 0; o < O; ++o)
        for (int r = 0; r < R; ++r) {
          part[o][r] += lo[o] * x_lo[r];
          part[o][r] += hi[o] * x_hi[r];
        }
    }
    for (int o = 0; o < O; ++o) {
      float s = scale[o * groups + gi];
      for (int r = 0; r < R; ++r) acc[o][r] += part[o][r] * s;
    }
  }
  for (int o = 0; o < O; ++o)
    for (int r = 0; r < R; ++r) y[r * n + o] = lane_sum(acc[o][r]);
}

// Outputs [o0, o1) for all rows: blocks of kOut outputs x kRowsMax rows, then what is left.
template <template <int, int> class Block, typename Args>
void run_outputs(const Args& a, int64_t rows, int64_t o0, int64_t o1) {
  for (int64_t t = 0; t < rows; t += kRowsMax) {
    int64_t r = std::min<int64_t>(kRowsMax, rows - t);
    for (int64_t o = o0; o < o1; o += kOut) {
      int64_t m = std::min<int64_t>(kOut, o1 - o);
      // one instantiation per (outputs, rows) shape: the arithmetic of each output is the same in all of them
#define KTJAX_CASE(M, R) \
  if (m == M && r == R) { Block<M, R>::run(a, t, o); continue; }
      KTJAX_CASE(4, 4) KTJAX_CASE(4, 3) KTJAX_CASE(4, 2) KTJAX_CASE(4, 1)
      KTJAX_CASE(3, 4) KTJAX_CASE(3, 3) KTJAX_CASE(3, 2) KTJAX_CASE(3, 1)
      KTJAX_CASE(2, 4) KTJAX_CASE(2, 3) KTJAX_CASE(2, 2) KTJAX_CASE(2, 1)
      KTJAX_CASE(1, 4) KTJAX_CASE(1, 3) KTJAX_CASE(1, 2) KTJAX_CASE(1, 1)
#undef KTJAX_CASE
    }
  }
}

struct Int8Args {
  const float* x;
  const int8_t* q;
  const float* scale;
  float* y;
  int64_t k_len, n;
};

template <int O, int R>
struct Int8Block {
  static void run(const Int8Args& a, int64_t t, int64_t o) {
    int8_block<O, R>(a.x + t * a.k_len, a.k_len, a.q + o * a.k_len, a.scale + o, a.y + t * a.n + o, a.n);
  }
};

struct Int4Args {
  const float* x;
  const uint8_t* q;
  const float* scale;
  float* y;
  int64_t p, groups, n;
};

template <int O, int R>
struct Int4Block {
  static void run(const Int4Args& a, int64_t t, int64_t o) {
    int4_block<O, R>(a.x + t * a.p, a.p, a.q + o * (a.p / 2), a.scale + o * a.groups, a.groups, a.y + t * a.n + o,
                     a.n);
  }
};

// The N outputs split into one contiguous range per thread (each a contiguous block of the weight), the first
// on the calling thread and the others on XLA's intra-op pool; the future completes when all are done. A
// weight under kMinSplitBytes runs on one thread: a task costs more than it saves.
constexpr int64_t kMinSplitBytes = 256 << 10;

template <typename F>
ffi::Future run_split(ffi::ThreadPool pool, int64_t n, int64_t bytes, F outputs) {
  int64_t blocks = (n + kOut - 1) / kOut;
  int64_t tasks = std::max<int64_t>(1, std::min<int64_t>({pool.num_threads(), blocks, bytes / kMinSplitBytes}));
  int64_t per = (blocks + tasks - 1) / tasks * kOut;
  tasks = (n + per - 1) / per;
  ffi::CountDownPromise done(tasks);
  for (int64_t i = 1; i < tasks; ++i) {
    int64_t o0 = i * per, o1 = std::min(n, o0 + per);
    pool.Schedule([outputs, o0, o1, done]() mutable {
      outputs(o0, o1);
      done.CountDown();
    });
  }
  outputs(0, std::min(n, per));
  done.CountDown();
  return ffi::Future(done);
}

ffi::Future int8_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto dims = q.dimensions();  // [N, K]
  int64_t n = dims[0], k_len = dims[1], rows = x.element_count() / k_len;
  Int8Args a{x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(), k_len, n};
  return run_split(pool, n, n * k_len, [a, rows](int64_t o0, int64_t o1) {
    run_outputs<Int8Block>(a, rows, o0, o1);
  });
}

ffi::Future int4_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto dims = q.dimensions();  // [N, P/2]
  int64_t n = dims[0], p = 2 * dims[1], groups = scale.dimensions()[1], rows = x.element_count() / p;
  Int4Args a{x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(), p, groups, n};
  return run_split(pool, n, n * p / 2, [a, rows](int64_t o0, int64_t o1) {
    run_outputs<Int4Block>(a, rows, o0, o1);
  });
}

}  // namespace

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
