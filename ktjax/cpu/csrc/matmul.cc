// Few-row matmuls y[T, N] = x[T, K] @ W^T over int8 / int4 / float32 weights held [N, K] (out, in), on the CPU: XLA FFI
// handlers that ktjax/cpu/kernels.py builds and ktjax/model/quantized.py calls for up to cpu_kernels.MAX_ROWS rows
// (decode steps), and for the routed experts of a prefill chunk (each expert's rows by its own weight, one call).
//
// Why: XLA's CPU dot turns an int8/int4 weight into a float32 copy before multiplying (a matrix-vector product
// over int8 ran at ~5 GB/s of weights here, int4 at ~2), and a decode step is a few rows against every
// weight. These kernels read the stored bytes once, front to back, widen them in registers and multiply: the
// weight held [out, in] makes each output one contiguous dot product, and a thread's outputs one contiguous
// block of memory (benchmarks/log/2026.md, "CPU kernels"). float32 weights: XLA's product of a few rows reads an
// [in, out] weight at 17-27 GB/s; held [out, in], the same loops read it at 28-34 ("Float32 weights in the CPU
// kernels").
//
// Formats (ktjax/model/quantized.py, transposed): int8 values [N, K] with scales [N, 1] applied to the finished
// sum; int4 values [N, P/2] (two per byte: packed column k g/2 + j holds input k g + j in its low nibble and
// k g + g/2 + j in its high one, value + 8) with group scales [N, P/g], each group's sum scaled, then added.
//
// Each output's sum runs in one order (16 lanes over k, then the lanes added in a fixed tree) whatever T is and
// whichever thread computes it, so a row's result does not depend on its batch: the server's greedy tokens
// equal the CLI's.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "pool.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace ktjax_simd;
using ktjax_pool::run_items;

// Outputs per block: each a weight row read front to back. A block's rows are short streams (a few KiB) that
// the hardware prefetcher does not follow far, so each read also asks for the same place in the next block.
// One row of x (a decode step) has little to share between outputs: it takes them one at a time instead, the
// weight as one stream front to back, which the hardware prefetcher follows best (1.3-1.5x the bandwidth of
// interleaved rows here: benchmarks/log/2026.md, "Integer activations").
// Weight rows of a page or more are read kOut at a time even for one row of x (1.2-1.4x faster for such rows:
// a stream crossing page boundaries one at a time leaves the prefetcher idle at each).
constexpr int kOut = 4;
constexpr int64_t kOneStreamBytes = 4096;
// An int4 weight's one stream is also asked for kAheadBytes ahead (a few rows on), once per group: the hardware
// prefetcher alone left the one-row int4 expert product with int8 activations at ~0.75x the rate of the same loop
// with it (6 of 64 V2-Lite experts, one thread: docs/results.md "One-row expert products"; the same prefetch
// slowed the int8 loops there).
constexpr int64_t kAheadBytes = 4096;
constexpr int kRowsMax = 4; // x rows per block
constexpr int kF32RowsMax = 6; // float32: 4 outputs x 6 rows = 24 sums in registers (1.0x-1.1x of 4 x 4)

// int8: y[t, o] = scale[o] * sum_k x[t, k] q[o, k] for O outputs and R rows of x.
template <int O, int R>
void int8_block(const float* x, int64_t k_len, const int8_t* q, const float* scale, float* y, int64_t n) {
  f32v acc[O][R] = {};
  int64_t k = 0;
  for (; k + kLanes <= k_len; k += kLanes) {
    f32v w[O], xv[R];
    for (int o = 0; o < O; ++o) {
      if (O > 1) __builtin_prefetch(q + (o + kOut) * k_len + k);  // the next block's rows (see kOut)
      w[o] = widen_s8(q + o * k_len + k);
    }
    for (int r = 0; r < R; ++r) xv[r] = in_register(load_f32(x + r * k_len + k));
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

// A float weight as stored: float32, or bfloat16 widened to float32 in registers (exact).
inline f32v load_weights(const float* w) { return load_f32(w); }
inline f32v load_weights(const uint16_t* w) { return widen_bf16(w); }
inline float weight_value(float w) { return w; }
inline float weight_value(uint16_t w) { return bf16_value(w); }

// float32 / bf16: y[t, o] = sum_k x[t, k] w[o, k], the same loop over stored float weights (no scale).
template <int O, int R, class W>
void float_block(const float* x, int64_t x_row, int64_t k_len, const W* w, float* y, int64_t n) {
  f32v acc[O][R] = {};
  int64_t k = 0;
  for (; k + kLanes <= k_len; k += kLanes) {
    f32v wv[O], xv[R];
    for (int o = 0; o < O; ++o) {
      // the next block's rows (see kOut); for more rows of x the prefetches cost more than they bring here (32-row
      // products 1.2-1.5x faster without: benchmarks/log/2026.md, "Float32 weights in the CPU kernels")
      if (O > 1 && R == 1) __builtin_prefetch(w + (o + kOut) * k_len + k);
      wv[o] = in_register(load_weights(w + o * k_len + k));
    }
    for (int r = 0; r < R; ++r) {
      xv[r] = in_register(load_f32(x + r * x_row + k));
      for (int o = 0; o < O; ++o) acc[o][r] += wv[o] * xv[r];
    }
  }
  for (int o = 0; o < O; ++o)
    for (int r = 0; r < R; ++r) {
      float sum = lane_sum(acc[o][r]);
      for (int64_t kk = k; kk < k_len; ++kk)
        sum = __builtin_fmaf(x[r * x_row + kk], weight_value(w[o * k_len + kk]), sum);
      y[r * n + o] = sum;
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
    if (O == 1) __builtin_prefetch(q + gi * half_g + kAheadBytes);  // see kAheadBytes (a group: 64 bytes)
    for (int64_t j = 0; j < half_g; j += kLanes) {
      f32v lo[O], hi[O], x_lo[R], x_hi[R];
      for (int o = 0; o < O; ++o) {
        if (O > 1) __builtin_prefetch(q + (o + kOut) * packed + gi * half_g + j);  // the next block's rows (see kOut)
        widen_u4(q + o * packed + gi * half_g + j, lo[o], hi[o]);
      }
      for (int r = 0; r < R; ++r) {
        x_lo[r] = in_register(load_f32(x + r * p + gi * 2 * half_g + j));
        x_hi[r] = in_register(load_f32(x + r * p + gi * 2 * half_g + half_g + j));
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

// Outputs per tile: a tile's weight rows (at most kTileBytes) serve every row of x before the next tile is read,
// so that a call of many rows reads its weight from memory once.
constexpr int64_t kTileBytes = 256 << 10;

// Outputs [o0, o1) for rows [t0, t0 + rows): tiles of outputs, each in blocks of kOut outputs x RowsMax rows (and what is
// left). row_bytes: the bytes of one weight row.
template <template <int, int> class Block, int RowsMax, typename Args>
void run_outputs(const Args& a, int64_t rows, int64_t o0, int64_t o1, int64_t row_bytes, int64_t t0 = 0) {
  int64_t tile = std::max<int64_t>(kOut, kTileBytes / std::max<int64_t>(1, row_bytes) / kOut * kOut);
  for (int64_t ot = o0; ot < o1; ot += tile) {
    int64_t ot1 = std::min(o1, ot + tile);
    const int64_t step = rows == 1 && row_bytes < kOneStreamBytes ? 1 : kOut;  // see kOut
    for (int64_t t = t0; t < t0 + rows; t += RowsMax) {
      int64_t r = std::min<int64_t>(RowsMax, t0 + rows - t);
      for (int64_t o = ot; o < ot1; o += step) {
        int64_t m = std::min<int64_t>(step, ot1 - o);
        // one instantiation per (outputs, rows) shape: the arithmetic of each output is the same in all of them
#define KTJAX_CASE(M, R) \
  if (m == M && r == R) { if constexpr (R <= RowsMax) Block<M, R>::run(a, t, o); continue; }
        KTJAX_CASE(4, 6) KTJAX_CASE(4, 5) KTJAX_CASE(3, 6) KTJAX_CASE(3, 5)
        KTJAX_CASE(2, 6) KTJAX_CASE(2, 5) KTJAX_CASE(1, 6) KTJAX_CASE(1, 5)
        KTJAX_CASE(4, 4) KTJAX_CASE(4, 3) KTJAX_CASE(4, 2) KTJAX_CASE(4, 1)
        KTJAX_CASE(3, 4) KTJAX_CASE(3, 3) KTJAX_CASE(3, 2) KTJAX_CASE(3, 1)
        KTJAX_CASE(2, 4) KTJAX_CASE(2, 3) KTJAX_CASE(2, 2) KTJAX_CASE(2, 1)
        KTJAX_CASE(1, 4) KTJAX_CASE(1, 3) KTJAX_CASE(1, 2) KTJAX_CASE(1, 1)
#undef KTJAX_CASE
      }
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

struct F32Args {
  const float* x;
  const float* w;
  float* y;
  int64_t k_len, n;
  int64_t x_row = k_len, y_row = n;  // strides between rows of x and of y (per-head products: H k_len, H n)
};

template <int O, int R>
struct F32Block {
  static void run(const F32Args& a, int64_t t, int64_t o) {
    float_block<O, R>(a.x + t * a.x_row, a.x_row, a.k_len, a.w + o * a.k_len, a.y + t * a.y_row + o, a.y_row);
  }
};

struct Bf16Args {
  const float* x;
  const uint16_t* w;
  float* y;
  int64_t k_len, n;
};

template <int O, int R>
struct Bf16Block {
  static void run(const Bf16Args& a, int64_t t, int64_t o) {
    float_block<O, R>(a.x + t * a.k_len, a.k_len, a.k_len, a.w + o * a.k_len, a.y + t * a.n + o, a.n);
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


// ---- int8 activations (the setting activation_quant int8) ----
//
// Each row of x is quantized per block of inputs as llama.cpp's Q8_0 does: a = rint(x * (127 / amax)) with scale
// amax / 127 (amax: the block's largest |x|; a block of zeros has scale 0). Blocks: cpu_kernels.Q8_BLOCK inputs
// (the last may be shorter) for int8 weights, the weight's group for int4. Each block's dot products then run in
// integers with AVX-512 VNNI (64 multiply-adds an instruction, where float32 FMA does 16), exactly: vpdpbusd
// multiplies unsigned by signed bytes, so the weight's bytes are made unsigned (int8 + 128; int4 is stored + 8)
// and each block's integer sum starts from -offset * sum(a) in lane 0. The block's sum, times the row's block
// scale (times the weight's group scale for int4), is added in float32: one order per output, as above.
struct Q8Rows {
  std::vector<int8_t> values;  // [rows, k_len]
  std::vector<float> scale;    // [rows, blocks]
  std::vector<i32v> start;     // [rows, blocks]: -offset * sum(a) in lane 0
  int64_t k_len, block, blocks;
};

// One block of a row -> its int8 values in q, their sum, and its scale. A block with a NaN or an infinity gets
// scale NaN (values 0), so that every output it feeds is NaN, as in the float product; an amax below
// 127 / FLT_MAX (where 127 / amax overflows) is divided in double.
float quantize_block(const float* x, int64_t len, int8_t* q, int32_t& sum) {
  f32v big = {}, probe = {};  // probe: x * 0, NaN where x is NaN or infinite
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    f32v v = load_f32(x + i);
    probe += v * 0.f;
    v = v < 0 ? -v : v;
    big = big > v ? big : v;
  }
  float amax = 0.f, bad = lane_sum(probe);
  for (int j = 0; j < kLanes; ++j) amax = std::max(amax, big[j]);
  for (; i < len; ++i) {
    bad += x[i] * 0.f;
    amax = std::max(amax, std::fabs(x[i]));
  }
  sum = 0;
  if (bad != 0.f) {
    std::memset(q, 0, len);
    return std::numeric_limits<float>::quiet_NaN();
  }
  float inv = amax > 0.f ? 127.f / amax : 0.f;
  i = 0;
  if (std::isinf(inv)) {
    for (; i < len; ++i) {
      int32_t v = int32_t(std::nearbyint(double(x[i]) * 127.0 / double(amax)));
      q[i] = int8_t(v);
      sum += v;
    }
    return amax / 127.f;
  }
#if defined(__AVX512F__)
  for (; i + kLanes <= len; i += kLanes) {  // round to nearest even (the default mode), as std::nearbyint
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(inv)));
    _mm_storeu_si128((__m128i*)(q + i), _mm512_cvtsepi32_epi8(v));
    sum += _mm512_reduce_add_epi32(v);
  }
#endif
  for (; i < len; ++i) {
    int32_t v = int32_t(std::nearbyint(x[i] * inv));
    q[i] = int8_t(v);
    sum += v;
  }
  return amax / 127.f;
}

Q8Rows quantize_rows(const float* x, int64_t rows, int64_t k_len, int64_t block, int32_t offset) {
  Q8Rows out;
  int64_t blocks = (k_len + block - 1) / block;
  out.values.resize(rows * k_len);
  out.scale.resize(rows * blocks);
  out.start.resize(rows * blocks);
  out.k_len = k_len, out.block = block, out.blocks = blocks;
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t b = 0; b < blocks; ++b) {
      int64_t k0 = b * block;
      int32_t sum;
      out.scale[t * blocks + b] = quantize_block(x + t * k_len + k0, std::min(block, k_len - k0),
                                                 out.values.data() + t * k_len + k0, sum);
      i32v start = {};
      start[0] = -offset * sum;
      out.start[t * blocks + b] = start;
    }
  return out;
}

constexpr int kQ8RowsMax = 4;

// int8 weight: y[t, o] = scale[o] * sum_b s[t, b] * (sum over block b of a[t, k] q[o, k]). Blocks of 128 inputs
// (cpu_kernels.Q8_BLOCK) are two vectors of each weight row and each x row, read once per block of outputs and
// rows; a shorter last block (or another block size) runs output by output.
template <int O, int R>
void int8_q8_block(const Q8Rows& a, int64_t t, const int8_t* q, const float* sw, float* y, int64_t n) {
  const int64_t k_len = a.k_len, whole = a.block == 2 * kBytes ? k_len / a.block : 0;
  f32v acc[O][R] = {};
  int64_t b = 0;
  for (; b < whole; ++b) {
    int64_t k0 = b * a.block;
    u8v w0[O], w1[O];
    for (int o = 0; o < O; ++o) {
      const int8_t* w = q + o * k_len + k0;
      if (O > 1) {  // the next block's rows (see kOut)
        __builtin_prefetch(w + kOut * k_len);
        __builtin_prefetch(w + kOut * k_len + kBytes);
      }
      w0[o] = load_bytes(w, kBytes) ^ 0x80;  // int8 + 128, as unsigned bytes
      w1[o] = load_bytes(w + kBytes, kBytes) ^ 0x80;
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* x = a.values.data() + (t + r) * k_len + k0;
      u8v x0 = load_bytes(x, kBytes), x1 = load_bytes(x + kBytes, kBytes);
      i32v start = a.start[(t + r) * a.blocks + b];
      f32v s = splat(a.scale[(t + r) * a.blocks + b]);
      for (int o = 0; o < O; ++o) acc[o][r] += to_f32(dot_u8s8(dot_u8s8(start, w0[o], x0), w1[o], x1)) * s;
    }
  }
  for (; b < a.blocks; ++b) {
    int64_t k0 = b * a.block, len = std::min(a.block, k_len - k0);
    for (int r = 0; r < R; ++r) {
      const int8_t* x = a.values.data() + (t + r) * k_len + k0;
      f32v s = splat(a.scale[(t + r) * a.blocks + b]);
      for (int o = 0; o < O; ++o) {
        i32v part = a.start[(t + r) * a.blocks + b];
        for (int64_t c = 0; c < len; c += kBytes)
          part = dot_u8s8(part, load_bytes(q + o * k_len + k0 + c, len - c) ^ 0x80, load_bytes(x + c, len - c));
        acc[o][r] += to_f32(part) * s;
      }
    }
  }
  for (int o = 0; o < O; ++o)
    for (int r = 0; r < R; ++r) y[r * n + o] = lane_sum(acc[o][r]) * sw[o];
}

// int4 weight (activation blocks = its groups): y[t, o] = sum_g scale[o, g] s[t, g] (sum over group g of a q).
// A group of 128 is one vector of packed bytes per weight row (its low nibbles the first half, high the second);
// other group sizes run output by output over masked vectors.
template <int O, int R>
void int4_q8_block(const Q8Rows& a, int64_t t, const uint8_t* q, const float* sw, float* y, int64_t n) {
  const int64_t p = a.k_len, groups = a.blocks, half_g = a.block / 2, packed = p / 2;
  f32v acc[O][R] = {};
  for (int64_t gi = 0; gi < groups; ++gi) {
    if (half_g == kBytes) {
      u8v lo[O], hi[O];
      for (int o = 0; o < O; ++o) {
        const uint8_t* w = q + o * packed + gi * half_g;
        __builtin_prefetch(O > 1 ? w + kOut * packed : w + kAheadBytes);  // the next block's rows (see kOut, kAheadBytes)
        split_nibbles(load_bytes(w, kBytes), lo[o], hi[o]);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* x = a.values.data() + (t + r) * p + gi * a.block;
        u8v x_lo = load_bytes(x, kBytes), x_hi = load_bytes(x + kBytes, kBytes);
        i32v start = a.start[(t + r) * groups + gi];
        float s = a.scale[(t + r) * groups + gi];
        for (int o = 0; o < O; ++o)
          acc[o][r] += to_f32(dot_u8s8(dot_u8s8(start, lo[o], x_lo), hi[o], x_hi)) * splat(sw[o * groups + gi] * s);
      }
      continue;
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* x = a.values.data() + (t + r) * p + gi * a.block;
      float s = a.scale[(t + r) * groups + gi];
      for (int o = 0; o < O; ++o) {
        i32v part = a.start[(t + r) * groups + gi];
        for (int64_t c = 0; c < half_g; c += kBytes) {
          u8v lo, hi;
          split_nibbles(load_bytes(q + o * packed + gi * half_g + c, half_g - c), lo, hi);
          part = dot_u8s8(dot_u8s8(part, lo, load_bytes(x + c, half_g - c)), hi, load_bytes(x + half_g + c, half_g - c));
        }
        acc[o][r] += to_f32(part) * splat(sw[o * groups + gi] * s);
      }
    }
  }
  for (int o = 0; o < O; ++o)
    for (int r = 0; r < R; ++r) y[r * n + o] = lane_sum(acc[o][r]);
}

struct Q8Args {
  const Q8Rows* x;  // the handler's, alive until run_split returns
  const void* q;
  const float* scale;
  float* y;
  int64_t n, groups;
};

template <int O, int R>
struct Int8Q8Block {
  static void run(const Q8Args& a, int64_t t, int64_t o) {
    int64_t k_len = a.x->k_len;
    int8_q8_block<O, R>(*a.x, t, (const int8_t*)a.q + o * k_len, a.scale + o, a.y + t * a.n + o, a.n);
  }
};

template <int O, int R>
struct Int4Q8Block {
  static void run(const Q8Args& a, int64_t t, int64_t o) {
    int64_t packed = a.x->k_len / 2;
    int4_q8_block<O, R>(*a.x, t, (const uint8_t*)a.q + o * packed, a.scale + o * a.groups, a.y + t * a.n + o, a.n);
  }
};

// The N outputs in one contiguous range per thread (each a contiguous block of the weight). A weight under
// kMinSplitBytes runs on one thread: a helper costs more than it saves.
constexpr int64_t kMinSplitBytes = 256 << 10;

template <typename F>
void run_split(ffi::ThreadPool pool, int64_t n, int64_t bytes, F outputs) {
  int64_t blocks = (n + kOut - 1) / kOut;
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>({pool.num_threads(), blocks, bytes / kMinSplitBytes}));
  int64_t per = (blocks + threads - 1) / threads * kOut;
  run_items(pool, (n + per - 1) / per, threads,
            [outputs, n, per](int64_t i) { outputs(i * per, std::min(n, (i + 1) * per)); });
}

ffi::Error int8_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto dims = q.dimensions();  // [N, K]
  int64_t n = dims[0], k_len = dims[1], rows = x.element_count() / k_len;
  Int8Args a{x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(), k_len, n};
  run_split(pool, n, n * k_len, [a, rows](int64_t o0, int64_t o1) {
    run_outputs<Int8Block, kRowsMax>(a, rows, o0, o1, a.k_len);
  });
  return ffi::Error::Success();
}

ffi::Error f32_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto dims = w.dimensions();  // [N, K]
  int64_t n = dims[0], k_len = dims[1], rows = x.element_count() / k_len;
  F32Args a{x.typed_data(), w.typed_data(), y->typed_data(), k_len, n};
  run_split(pool, n, 4 * n * k_len, [a, rows](int64_t o0, int64_t o1) {
    run_outputs<F32Block, kF32RowsMax>(a, rows, o0, o1, 4 * a.k_len);
  });
  return ffi::Error::Success();
}

ffi::Error int4_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto dims = q.dimensions();  // [N, P/2]
  int64_t n = dims[0], p = 2 * dims[1], groups = scale.dimensions()[1], rows = x.element_count() / p;
  Int4Args a{x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(), p, groups, n};
  run_split(pool, n, n * p / 2, [a, rows](int64_t o0, int64_t o1) {
    run_outputs<Int4Block, kRowsMax>(a, rows, o0, o1, a.p / 2);
  });
  return ffi::Error::Success();
}

ffi::Error int8_q8_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                         ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t block) {
  auto dims = q.dimensions();  // [N, K]
  int64_t n = dims[0], k_len = dims[1], rows = x.element_count() / k_len;
  Q8Rows xq = quantize_rows(x.typed_data(), rows, k_len, block, 128);
  Q8Args a{&xq, q.typed_data(), scale.typed_data(), y->typed_data(), n, 1};
  run_split(pool, n, n * k_len, [a, rows, k_len](int64_t o0, int64_t o1) {
    run_outputs<Int8Q8Block, kQ8RowsMax>(a, rows, o0, o1, k_len);
  });
  return ffi::Error::Success();
}

ffi::Error int4_q8_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                         ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto dims = q.dimensions();  // [N, P/2]
  int64_t n = dims[0], p = 2 * dims[1], groups = scale.dimensions()[1], rows = x.element_count() / p;
  Q8Rows xq = quantize_rows(x.typed_data(), rows, p, p / groups, 8);
  Q8Args a{&xq, q.typed_data(), scale.typed_data(), y->typed_data(), n, groups};
  run_split(pool, n, n * p / 2, [a, rows, p](int64_t o0, int64_t o1) {
    run_outputs<Int4Q8Block, kQ8RowsMax>(a, rows, o0, o1, p / 2);
  });
  return ffi::Error::Success();
}


// ---- per-head products: the absorbed attention's w_uk and w_uv (float32) ----
//
// x [T, H, K] -> y [T, H, N], head h by its own matrix. w_uv [H, N, K] is [out, in] per head: each head runs the
// float32 loops above on its rows of x (strided by H K). w_uk [H, K, N] is [in, out] per head, as the checkpoint's
// kv_b_proj gives it: kVecs vectors of outputs at a time, each output one lane that adds x[t, d] w[d, c] in the
// order of d (the same arithmetic whatever the rows or the thread), the rows of w read front to back. XLA's
// batched dot ran w_uk at 6-45 GFLOP/s for 4-64 rows (benchmarks/log/2026.md, "Float32 weights in the CPU
// kernels").
constexpr int kVecs = 4;

template <int R>
void in_out_block(const float* x, int64_t x_row, int64_t d_len, const float* w, int64_t n, float* y, int64_t y_row) {
  f32v acc[R][kVecs] = {};
  for (int64_t d = 0; d < d_len; ++d) {
    f32v wv[kVecs];
    for (int v = 0; v < kVecs; ++v) wv[v] = load_f32(w + d * n + v * kLanes);
    for (int r = 0; r < R; ++r) {
      f32v xs = splat(x[r * x_row + d]);
      for (int v = 0; v < kVecs; ++v) acc[r][v] += xs * wv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) store_f32(y + r * y_row + v * kLanes, acc[r][v]);
}

// One row of x over outputs [c0, c1) (whole vectors): the sums kept in y itself (a few KiB, in L1), so that w
// is read a whole row at a time, front to back (in registers, a group's 256 bytes of each row at a time read
// these weights at ~2/3 of XLA's rate from memory). The same arithmetic per output as in_out_block.
void in_out_row(const float* x, int64_t d_len, const float* w, int64_t n, int64_t c0, int64_t c1, float* y) {
  for (int64_t c = c0; c < c1; c += kLanes) store_f32(y + c, f32v{});
  for (int64_t d = 0; d < d_len; ++d) {
    f32v xs = splat(x[d]);
    const float* wd = w + d * n;
    for (int64_t c = c0; c < c1; c += kLanes) store_f32(y + c, load_f32(y + c) + xs * load_f32(wd + c));
  }
}

// Outputs [c0, c1) of one head for all rows: whole groups of kVecs vectors, then one output at a time.
void in_out_outputs(const float* x, int64_t x_row, int64_t rows, int64_t d_len, const float* w, int64_t n,
                    int64_t c0, int64_t c1, float* y, int64_t y_row) {
  constexpr int64_t group = kVecs * kLanes;
  int64_t c = c0;
  if (rows == 1) {  // the same outputs in vectors as below
    int64_t whole = c0 + (c1 - c0) / group * group;
    in_out_row(x, d_len, w, n, c0, whole, y);
    c = whole;
  }
  for (; c + group <= c1; c += group)
    for (int64_t t = 0; t < rows; t += kRowsMax) {
      const float* xt = x + t * x_row;
      float* yt = y + t * y_row + c;
      switch (std::min<int64_t>(kRowsMax, rows - t)) {
        case 4: in_out_block<4>(xt, x_row, d_len, w + c, n, yt, y_row); break;
        case 3: in_out_block<3>(xt, x_row, d_len, w + c, n, yt, y_row); break;
        case 2: in_out_block<2>(xt, x_row, d_len, w + c, n, yt, y_row); break;
        default: in_out_block<1>(xt, x_row, d_len, w + c, n, yt, y_row);
      }
    }
  for (; c < c1; ++c)
    for (int64_t t = 0; t < rows; ++t) {
      float sum = 0.0f;
      for (int64_t d = 0; d < d_len; ++d) sum = __builtin_fmaf(x[t * x_row + d], w[d * n + c], sum);
      y[t * y_row + c] = sum;
    }
}

ffi::Error heads_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y, bool in_out) {
  auto dims = w.dimensions();  // in_out: [H, K, N]; else [H, N, K]
  int64_t heads = dims[0], k_len = in_out ? dims[1] : dims[2], n = in_out ? dims[2] : dims[1];
  int64_t rows = x.element_count() / (heads * k_len);
  const float *xs = x.typed_data(), *ws = w.typed_data();
  float* ys = y->typed_data();
  constexpr int64_t group = kVecs * kLanes;
  // work items: (head, a group of outputs) for [in, out], (head, output) for [out, in]
  int64_t per_head = in_out ? (n + group - 1) / group : n;
  run_split(pool, heads * per_head, 4 * heads * n * k_len, [=](int64_t i0, int64_t i1) {
    for (int64_t h = i0 / per_head; h * per_head < i1; ++h) {
      int64_t lo = std::max(i0, h * per_head) - h * per_head, hi = std::min(i1, (h + 1) * per_head) - h * per_head;
      const float* xh = xs + h * k_len;
      float* yh = ys + h * n;
      if (in_out) {
        in_out_outputs(xh, heads * k_len, rows, k_len, ws + h * k_len * n, n, lo * group, std::min(n, hi * group), yh,
                       heads * n);
      } else {
        F32Args a{xh, ws + h * n * k_len, yh, k_len, n, heads * k_len, heads * n};
        run_outputs<F32Block, kF32RowsMax>(a, rows, lo, hi, 4 * k_len);
      }
    }
  });
  return ffi::Error::Success();
}



// ---- grouped products: the routed experts of a batch, each expert's rows by its own weight ----
//
// x [M, K] holds the rows sorted by group (expert), group_sizes [E] how many each has; the weights follow as E
// buffers (float32 [N, K]) or E (values, scales) pairs (int8 / int4, as above). Row t of group e is multiplied by
// weight e with the same loops as a single product, so each output is summed in the order it would be alone.
// One call runs every group: no padding of a group to a block of rows, and no switch per block (the routed experts
// of a 512-token prefill chunk ran at ~90 GFLOP/s as blocks of 32 rows: benchmarks/log/2026.md, "Prefill").
// Work items are (group, a range of outputs), taken in turn by the calling thread and the pool's helpers.
enum GroupedFormat : int64_t { kGroupedF32 = 0, kGroupedInt8 = 1, kGroupedInt4 = 2, kGroupedInt8Q8 = 3, kGroupedInt4Q8 = 4 };

enum { kGroupedBf16 = 5 };  // the host expert store's bf16 experts (not taken by KtjaxGroupedMatmul)

// Rows [start[e], start[e + 1]) of xs [rows, k_len] times weight e (values[e], scales[e]: float32 / bf16 [n, k_len],
// int8 [n, k_len] with [n, 1], int4 [n, k_len / 2] with [n, scale_groups]) -> those rows of ys [rows, n]. Work items
// are (group, a range of outputs), taken in turn by the calling thread and the pool's helpers.
template <typename Pool>
void run_grouped(Pool pool, int64_t format, const float* xs, const std::vector<int64_t>& start,
                 const std::vector<const void*>& values, const std::vector<const float*>& scales, float* ys,
                 int64_t n, int64_t k_len, int64_t scale_groups, int64_t block) {
  const int64_t groups = int64_t(values.size()), used_rows = start[groups];
  Q8Rows xq;
  if (format == kGroupedInt8Q8 || format == kGroupedInt4Q8)
    xq = quantize_rows(xs, used_rows, k_len, format == kGroupedInt8Q8 ? block : k_len / scale_groups,
                       format == kGroupedInt8Q8 ? 128 : 8);
  // each used group's outputs in `parts` ranges of whole kOut blocks (one per thread), taken in turn
  const int64_t parts = std::max<int64_t>(1, pool.num_threads());
  const int64_t per = ((n + parts - 1) / parts + kOut - 1) / kOut * kOut;
  std::vector<std::pair<int64_t, int64_t>> items;  // (group, first output)
  for (int64_t e = 0; e < groups; ++e)
    if (start[e + 1] > start[e])
      for (int64_t o = 0; o < n; o += per) items.emplace_back(e, o);
  run_items(pool, items.size(), parts, [&](int64_t i) {
    auto [e, o0] = items[i];
    int64_t o1 = std::min(n, o0 + per), t0 = start[e], count = start[e + 1] - start[e];
    switch (format) {
      case kGroupedF32: {
        F32Args a{xs, (const float*)values[e], ys, k_len, n};
        run_outputs<F32Block, kF32RowsMax>(a, count, o0, o1, 4 * k_len, t0);
        break;
      }
      case kGroupedBf16: {
        Bf16Args a{xs, (const uint16_t*)values[e], ys, k_len, n};
        run_outputs<Bf16Block, kF32RowsMax>(a, count, o0, o1, 2 * k_len, t0);
        break;
      }
      case kGroupedInt8: {
        Int8Args a{xs, (const int8_t*)values[e], scales[e], ys, k_len, n};
        run_outputs<Int8Block, kRowsMax>(a, count, o0, o1, k_len, t0);
        break;
      }
      case kGroupedInt4: {
        Int4Args a{xs, (const uint8_t*)values[e], scales[e], ys, k_len, scale_groups, n};
        run_outputs<Int4Block, kRowsMax>(a, count, o0, o1, k_len / 2, t0);
        break;
      }
      case kGroupedInt8Q8: {
        Q8Args a{&xq, values[e], scales[e], ys, n, 1};
        run_outputs<Int8Q8Block, kQ8RowsMax>(a, count, o0, o1, k_len, t0);
        break;
      }
      default: {
        Q8Args a{&xq, values[e], scales[e], ys, n, scale_groups};
        run_outputs<Int4Q8Block, kQ8RowsMax>(a, count, o0, o1, k_len / 2, t0);
      }
    }
  });
}

// The checks a caller's mistake needs before any buffer is read (cpu_kernels.grouped_matmul builds valid calls).
ffi::Error grouped_check(ffi::AnyBuffer v, ffi::DataType want, int64_t n, int64_t stored_k) {
  auto d = v.dimensions();
  if (v.element_type() != want || d.size() != 2 || d[0] != n || d[1] != stored_k)
    return ffi::Error::InvalidArgument("grouped matmul: every group's weight must have the first one's type and shape");
  return ffi::Error::Success();
}

ffi::Error grouped_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> group_sizes,
                        ffi::RemainingArgs weights, ffi::ResultBuffer<ffi::F32> y, int64_t format, int64_t block) {
  if (format < kGroupedF32 || format > kGroupedInt4Q8)
    return ffi::Error::InvalidArgument("grouped matmul: unknown format");
  const bool scaled = format != kGroupedF32, int4 = format == kGroupedInt4 || format == kGroupedInt4Q8;
  const ffi::DataType want = format == kGroupedF32 ? ffi::DataType::F32 : int4 ? ffi::DataType::U8 : ffi::DataType::S8;
  const int64_t groups = group_sizes.element_count();
  if (groups < 1 || int64_t(weights.size()) != groups * (scaled ? 2 : 1))
    return ffi::Error::InvalidArgument("grouped matmul: one weight (and scale) per group expected");
  auto first = weights.get<ffi::AnyBuffer>(0);
  if (first.has_error()) return first.error();
  auto wd = first.value().dimensions();  // [N, K] (int4: [N, P/2])
  if (wd.size() != 2 || wd[0] < 1 || wd[1] < 1)
    return ffi::Error::InvalidArgument("grouped matmul: weights must be [out, in] matrices");
  const int64_t n = wd[0], k_len = int4 ? 2 * wd[1] : wd[1];
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || xd[1] != k_len || yd.size() != 2 || yd[0] != xd[0] || yd[1] != n)
    return ffi::Error::InvalidArgument("grouped matmul: x must be [rows, in] and y [rows, out]");
  if (format == kGroupedInt8Q8 && block < 1) return ffi::Error::InvalidArgument("grouped matmul: block must be >= 1");
  const int64_t rows = xd[0];
  std::vector<int64_t> start(groups + 1, 0);
  const int32_t* sizes = group_sizes.typed_data();
  for (int64_t e = 0; e < groups; ++e) {
    if (sizes[e] < 0) return ffi::Error::InvalidArgument("grouped matmul: negative group size");
    start[e + 1] = start[e] + sizes[e];
    if (start[e + 1] > rows) return ffi::Error::InvalidArgument("grouped matmul: group sizes exceed the rows");
  }
  std::vector<const void*> values(groups);
  std::vector<const float*> scales(groups, nullptr);
  int64_t scale_groups = 1;
  for (int64_t e = 0; e < groups; ++e) {
    auto v = weights.get<ffi::AnyBuffer>(scaled ? 2 * e : e);
    if (v.has_error()) return v.error();
    if (auto bad = grouped_check(v.value(), want, n, wd[1]); bad.failure()) return bad;
    values[e] = v.value().untyped_data();
    if (scaled) {
      auto sc = weights.get<ffi::AnyBuffer>(2 * e + 1);
      if (sc.has_error()) return sc.error();
      auto sd = sc.value().dimensions();
      if (e == 0 && sd.size() == 2) scale_groups = sd[1];
      int64_t want_groups = int4 ? scale_groups : 1;  // int8: one scale per output; int4: whole groups of inputs
      if (auto bad = grouped_check(sc.value(), ffi::DataType::F32, n, want_groups); bad.failure()) return bad;
      if (int4 && (scale_groups < 1 || k_len % scale_groups != 0 || (k_len / scale_groups) % 32 != 0))
        return ffi::Error::InvalidArgument("grouped matmul: int4 scales must split the inputs into groups of 32k");
      scales[e] = (const float*)sc.value().untyped_data();
    }
  }
  float* ys = y->typed_data();
  std::fill(ys + start[groups] * n, ys + rows * n, 0.0f);  // rows past the groups' (padding) read as zero
  run_grouped(pool, format, x.typed_data(), start, values, scales, ys, n, k_len, scale_groups, block);
  return ffi::Error::Success();
}


// ---- the host expert store: each MoE layer's routed experts in host memory, summed in one call ----
//
// ktjax/cpu/host_experts.py owns the buffers (numpy, in the layouts above) and registers them here under a handle
// (KtjaxHostExpertsRegister): the compiled program names the handle as an attribute and never takes the experts as
// arguments. A layer's gate and up weights are one matrix per expert, [2f, d] (gate rows, then up rows), so that
// one pass over the rows makes both; down is [d, f]. One call (KtjaxHostExperts) sorts the layer's (token, expert)
// assignments by expert, runs gate/up, SwiGLU and down as grouped products, and adds each token's outputs times
// their routing weights in the order of its k slots. An expert id -1 - e (an expert kept on the device, summed
// there) is counted but not run: the counts (KtjaxHostExpertsCounts) pick the experts worth keeping.
struct HostLayer {
  int64_t format, experts, d, f, k_up, k_down, g_up, g_down;
  const uint8_t *up_values, *down_values;
  const float *up_scales, *down_scales;
  int64_t up_expert_bytes, down_expert_bytes;  // one expert's values
  std::unique_ptr<std::atomic<int64_t>[]> counts;
};

std::mutex host_mutex;
std::unordered_map<int64_t, std::shared_ptr<HostLayer>>& host_layers() {
  static auto* layers = new std::unordered_map<int64_t, std::shared_ptr<HostLayer>>();  // never destroyed at exit
  return *layers;
}

std::shared_ptr<HostLayer> host_layer(int64_t handle) {
  std::lock_guard<std::mutex> lock(host_mutex);
  auto it = host_layers().find(handle);
  return it == host_layers().end() ? nullptr : it->second;
}

int64_t stored_row_bytes(int64_t format, int64_t k_len) {
  switch (format) {
    case kGroupedF32: return 4 * k_len;
    case kGroupedBf16: return 2 * k_len;
    case kGroupedInt4: case kGroupedInt4Q8: return k_len / 2;
    default: return k_len;
  }
}

// The experts' pointers for one weight of the layer: expert e's values at base + e * bytes, scales at e * n * g.
void expert_pointers(const uint8_t* values, const float* scales, int64_t bytes, int64_t n, int64_t g, int64_t experts,
                     std::vector<const void*>& v, std::vector<const float*>& s) {
  v.resize(experts);
  s.assign(experts, nullptr);
  for (int64_t e = 0; e < experts; ++e) {
    v[e] = values + e * bytes;
    if (scales != nullptr) s[e] = scales + e * n * g;
  }
}

// One layer's call on raw host buffers (x [t_len, d], ids / wv [t_len, k], ys [t_len, d]): nullptr, or what is wrong.
template <typename Pool>
const char* host_experts_run(Pool pool, const HostLayer& L, const float* xv, const int32_t* idv, const float* wv,
                             float* ys, int64_t t_len, int64_t k) {
  const int64_t assignments = t_len * k, E = L.experts;
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t a = 0; a < assignments; ++a) {
    int64_t e = idv[a];
    if (e >= E || e < -E) return "host experts: expert id out of range";
    if (e < 0) {
      L.counts[-1 - e].fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    L.counts[e].fetch_add(1, std::memory_order_relaxed);
    ++start[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const int64_t rows = start[E];
  std::fill(ys, ys + t_len * L.d, 0.0f);
  if (rows == 0) return nullptr;
  // the assignments sorted by expert (in token order within one), and each one's row
  std::vector<int64_t> row_of(assignments, -1), next(start.begin(), start.end() - 1);
  std::vector<float> xs(rows * L.k_up, 0.0f);  // zero-padded to an int4 weight's P inputs
  for (int64_t a = 0; a < assignments; ++a)
    if (idv[a] >= 0) {
      int64_t r = next[idv[a]]++;
      row_of[a] = r;
      std::memcpy(xs.data() + r * L.k_up, xv + (a / k) * L.d, L.d * sizeof(float));
    }
  std::vector<const void*> v;
  std::vector<const float*> s;
  const int64_t two_f = 2 * L.f;
  std::vector<float> h(rows * two_f);
  expert_pointers(L.up_values, L.up_scales, L.up_expert_bytes, two_f, L.g_up, E, v, s);
  run_grouped(pool, L.format, xs.data(), start, v, s, h.data(), two_f, L.k_up, L.g_up, 128);
  std::vector<float> act(rows * L.k_down, 0.0f);  // SwiGLU: silu(gate) * up, zero-padded to down's inputs
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < L.f; ++j) {
      float g = h[r * two_f + j];
      act[r * L.k_down + j] = g / (1.0f + std::exp(-g)) * h[r * two_f + L.f + j];
    }
  std::vector<float> out(rows * L.d);
  expert_pointers(L.down_values, L.down_scales, L.down_expert_bytes, L.d, L.g_down, E, v, s);
  run_grouped(pool, L.format, act.data(), start, v, s, out.data(), L.d, L.k_down, L.g_down, 128);
  for (int64_t a = 0; a < assignments; ++a) {  // token by token, its slots in order
    if (row_of[a] < 0) continue;
    float w = wv[a], *yt = ys + (a / k) * L.d;
    const float* o = out.data() + row_of[a] * L.d;
    for (int64_t j = 0; j < L.d; ++j) yt[j] = __builtin_fmaf(w, o[j], yt[j]);
  }
  return nullptr;
}

// The checks of a call's shapes: nullptr, or what is wrong.
const char* host_experts_shapes(const HostLayer& L, ffi::Span<const int64_t> xd, ffi::Span<const int64_t> id,
                                ffi::Span<const int64_t> wd, ffi::Span<const int64_t> yd) {
  if (xd.size() != 2 || xd[1] != L.d || id.size() != 2 || id[0] != xd[0] || wd.size() != 2 || wd[0] != id[0] ||
      wd[1] != id[1] || yd.size() != 2 || yd[0] != xd[0] || yd[1] != L.d)
    return "host experts: x [t, d], ids and weights [t, k], y [t, d] expected";
  return nullptr;
}

ffi::Error host_experts_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> ids,
                             ffi::Buffer<ffi::F32> weights, ffi::ResultBuffer<ffi::F32> y, int64_t handle) {
  std::shared_ptr<HostLayer> layer = host_layer(handle);
  if (!layer) return ffi::Error::InvalidArgument("host experts: no layer registered under this handle");
  const char* bad = host_experts_shapes(*layer, x.dimensions(), ids.dimensions(), weights.dimensions(),
                                        y->dimensions());
  if (!bad)
    bad = host_experts_run(pool, *layer, x.typed_data(), ids.typed_data(), weights.typed_data(), y->typed_data(),
                           x.dimensions()[0], ids.dimensions()[1]);
  return bad ? ffi::Error::InvalidArgument(bad) : ffi::Error::Success();
}

}  // namespace

// The store's registry, called from Python (ctypes): 0 on success, else a negative code.
extern "C" int64_t KtjaxHostExpertsRegister(int64_t handle, int64_t format, int64_t experts, int64_t d, int64_t f,
                                            int64_t k_up, int64_t k_down, int64_t g_up, int64_t g_down,
                                            const void* up_values, const float* up_scales, const void* down_values,
                                            const float* down_scales) {
  if (format < kGroupedF32 || format > kGroupedBf16 || experts < 1 || d < 1 || f < 1 || k_up < d || k_down < f)
    return -1;
  auto layer = std::make_shared<HostLayer>();
  *layer = HostLayer{format, experts, d, f, k_up, k_down, g_up, g_down, (const uint8_t*)up_values,
                     (const uint8_t*)down_values, up_scales, down_scales, 2 * f * stored_row_bytes(format, k_up),
                     d * stored_row_bytes(format, k_down), nullptr};
  layer->counts.reset(new std::atomic<int64_t>[experts]);
  for (int64_t e = 0; e < experts; ++e) layer->counts[e].store(0);
  std::lock_guard<std::mutex> lock(host_mutex);
  host_layers()[handle] = std::move(layer);
  return 0;
}

extern "C" void KtjaxHostExpertsRelease(int64_t handle) {
  std::lock_guard<std::mutex> lock(host_mutex);
  host_layers().erase(handle);
}

// The routing counts of a layer since it was registered (or last reset): n of them into out; -> the experts, or -1.
extern "C" int64_t KtjaxHostExpertsCounts(int64_t handle, int64_t* out, int64_t n, int64_t reset) {
  std::shared_ptr<HostLayer> layer = host_layer(handle);
  if (!layer) return -1;
  for (int64_t e = 0; e < std::min(n, layer->experts); ++e)
    out[e] = reset ? layer->counts[e].exchange(0) : layer->counts[e].load();
  return layer->experts;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMatmulInt8, int8_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMatmulF32, f32_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMatmulInt4, int4_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMatmulInt8Q8, int8_q8_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMatmulInt4Q8, int4_q8_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxHeadsMatmulF32, heads_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("in_out"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxGroupedMatmul, grouped_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("format")
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxHostExperts, host_experts_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("handle"));

#ifdef KTJAX_CUDA
// ---- the GPU bridge (built with -DKTJAX_CUDA against the CUDA runtime; not run on a CPU-only machine) ----
//
// KtjaxHostExperts on the CUDA platform: the same call inside a GPU program. On XLA's stream it copies the layer's
// rows, expert ids and routing weights into pinned host buffers of its own (one slot per layer, grown as needed),
// starts the CPU's expert work with cudaLaunchHostFunc (it runs when the copies are done, and the stream waits for
// it, so that the call starts and ends in the stream's order with no round trip through Python) and copies the
// weighted sum back. The CPU work runs on the bridge's own threads (XLA's CPU pool is not at hand here).
#include <condition_variable>
#include <deque>
#include <functional>
#include <thread>

#include <cuda_runtime.h>

namespace {

// Worker threads with num_threads() and Schedule(fn), as ktjax_pool::run_items takes a pool.
class BridgeThreads {
 public:
  explicit BridgeThreads(int64_t n) {
    for (int64_t i = 1; i < n; ++i) workers_.emplace_back([this] { work(); });
  }
  int64_t num_threads() const { return int64_t(workers_.size()) + 1; }
  void Schedule(std::function<void()> fn) const {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(fn));
    }
    ready_.notify_one();
  }

 private:
  void work() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return !queue_.empty(); });
        fn = std::move(queue_.front());
        queue_.pop_front();
      }
      fn();
    }
  }
  std::vector<std::thread> workers_;
  mutable std::mutex mutex_;
  mutable std::condition_variable ready_;
  mutable std::deque<std::function<void()>> queue_;
};

const BridgeThreads* bridge_threads() {
  static auto* threads = new BridgeThreads(std::max(1u, std::thread::hardware_concurrency()));  // never destroyed
  return threads;
}

// Run by const pointer: run_items copies its pool argument.
struct BridgePool {
  const BridgeThreads* threads;
  int64_t num_threads() const { return threads->num_threads(); }
  template <typename F>
  void Schedule(F fn) const { threads->Schedule(std::function<void()>(std::move(fn))); }
};

// One layer's pinned buffers (the stream orders a layer's calls: one slot suffices, its buffers written and read
// in stream order); what each call's host task reads is its own BridgeCall, made at enqueue.
struct BridgeSlot {
  float *x = nullptr, *w = nullptr, *y = nullptr;
  int32_t* ids = nullptr;
  int64_t capacity = 0, k = 0;
  std::atomic<const char*> error{nullptr};  // from a host task, reported by the next call
};

struct BridgeCall {
  BridgeSlot* slot;
  std::shared_ptr<HostLayer> layer;
  int64_t rows, k;
};

std::mutex bridge_mutex;
std::unordered_map<int64_t, std::unique_ptr<BridgeSlot>>& bridge_slots() {
  static auto* slots = new std::unordered_map<int64_t, std::unique_ptr<BridgeSlot>>();
  return *slots;
}

bool grow(BridgeSlot& s, int64_t rows, int64_t k, int64_t d) {
  for (void* p : {(void*)s.x, (void*)s.w, (void*)s.y, (void*)s.ids})
    if (p) cudaFreeHost(p);
  s.capacity = rows, s.k = k;
  return cudaHostAlloc((void**)&s.x, rows * d * sizeof(float), cudaHostAllocDefault) == cudaSuccess &&
         cudaHostAlloc((void**)&s.y, rows * d * sizeof(float), cudaHostAllocDefault) == cudaSuccess &&
         cudaHostAlloc((void**)&s.w, rows * k * sizeof(float), cudaHostAllocDefault) == cudaSuccess &&
         cudaHostAlloc((void**)&s.ids, rows * k * sizeof(int32_t), cudaHostAllocDefault) == cudaSuccess;
}

void CUDART_CB bridge_task(void* data) {
  std::unique_ptr<BridgeCall> call(static_cast<BridgeCall*>(data));
  BridgeSlot& s = *call->slot;
  if (const char* bad = host_experts_run(BridgePool{bridge_threads()}, *call->layer, s.x, s.ids, s.w, s.y, call->rows,
                                         call->k))
    s.error.store(bad);
}

ffi::Error host_experts_cuda_impl(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> ids,
                                  ffi::Buffer<ffi::F32> weights, ffi::ResultBuffer<ffi::F32> y, int64_t handle) {
  std::shared_ptr<HostLayer> layer = host_layer(handle);
  if (!layer) return ffi::Error::InvalidArgument("host experts: no layer registered under this handle");
  if (const char* bad = host_experts_shapes(*layer, x.dimensions(), ids.dimensions(), weights.dimensions(),
                                            y->dimensions()))
    return ffi::Error::InvalidArgument(bad);
  BridgeSlot* slot;
  {
    std::lock_guard<std::mutex> lock(bridge_mutex);
    auto& s = bridge_slots()[handle];
    if (!s) s = std::make_unique<BridgeSlot>();
    slot = s.get();
  }
  if (const char* bad = slot->error.load()) return ffi::Error::Internal(bad);  // an earlier host task failed
  const int64_t rows = x.dimensions()[0], k = ids.dimensions()[1], d = layer->d;
  if (rows > slot->capacity || k != slot->k) {  // rare (the first call of a longer chunk): wait, then regrow
    if (cudaStreamSynchronize(stream) != cudaSuccess) return ffi::Error::Internal("host experts: the stream failed");
    if (!grow(*slot, rows, k, d)) return ffi::Error::Internal("host experts: cannot allocate pinned host memory");
  }
  auto* call = new BridgeCall{slot, layer, rows, k};  // the host task owns it
  auto to_host = [&](void* dst, const void* src, size_t bytes) {
    return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream) == cudaSuccess;
  };
  bool ok = to_host(slot->x, x.typed_data(), rows * d * sizeof(float)) &&
            to_host(slot->ids, ids.typed_data(), rows * k * sizeof(int32_t)) &&
            to_host(slot->w, weights.typed_data(), rows * k * sizeof(float));
  if (!ok || cudaLaunchHostFunc(stream, bridge_task, call) != cudaSuccess) {
    delete call;
    return ffi::Error::Internal("host experts: a copy to pinned memory or the host launch failed");
  }
  if (cudaMemcpyAsync(y->typed_data(), slot->y, rows * d * sizeof(float), cudaMemcpyHostToDevice, stream) !=
      cudaSuccess)
    return ffi::Error::Internal("host experts: the copy of the sum back to the device failed");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxHostExpertsCuda, host_experts_cuda_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("handle"));
#endif  // KTJAX_CUDA
