// Decode attention over the latent cache on the CPU: an XLA FFI handler that ktjax/cpu/kernels.py builds and
// ktjax/kv/cache.py and kv/paged.py call for decode steps and for a few queries per sequence at consecutive
// positions (speculative decoding's verify pass, short prefill tails).
//
// Why: XLA on the CPU copies every key block it slices out of the cache, converts it to float32 and runs the
// scores and values as small einsums; at 2k tokens that was ~1.7 ms per layer for 4.7 MB of bf16 latents.
// This kernel reads each key once: 16 keys at a time are turned into float32 in a small scratch (one format
// switch per key), then the 16 heads' scores (q_lat . c_kv + q_pe . k_pe), an online softmax and the
// probability-weighted sum of the latents run from that scratch in registers.
//
// Cache layout (kv/paged.py): pools c_kv [L, pages, page_size, W], scales [L, pages, page_size, G] (quantized
// formats), k_pe [L, pages, page_size, r]; sequence b's key t lives in page table[b, t / page_size], slot
// t % page_size. The dense cache [L, B, T, ...] is the same with one page of T slots per sequence.
//
// Each sequence's keys are split into segments of kSegment keys, one task each, which the threads take in turn;
// a task's partial result (its running max, sum and weighted latents per head) is merged with the others in
// segment order by the calling thread once all are done. A row's arithmetic therefore depends on its own keys only,
// never on the batch or the thread count: the server's greedy tokens equal the CLI's.
//
// Several queries per sequence (visible [B, S]) are S groups of heads in one pass: query j's heads see keys
// [0, visible[b, j]) (keys past it masked as a block's missing keys are), so the cache is read once for all S
// queries, and a row's segments cover its largest visible count.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "pool.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace ktjax_simd;

constexpr int kKeys = 16;      // keys per scratch block
constexpr int64_t kSegment = 256;  // keys per task
constexpr float kNeg = -1e30f;  // kv/attention.py NEG

// exp on 16 lanes: 2^n e^r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7,
// about a float32 ulp); inputs below -87 give 0 (the probabilities of masked or far-below-max keys).
inline f32v exp16(f32v x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  x = x > splat(88.f) ? splat(88.f) : x;
  const f32v magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  f32v n = (x * splat(1.44269504088896341f) + magic) - magic;
  f32v r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  f32v p = splat(1.f / 720);
  p = p * r + splat(1.f / 120);
  p = p * r + splat(1.f / 24);
  p = p * r + splat(1.f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.f);
  p = p * r + splat(1.f);
  i32v bits = (__builtin_convertvector(n, i32v) + 127) << 23;
  f32v two_n;
  std::memcpy(&two_n, &bits, sizeof(bits));
  f32v out = p * two_n;
  return x <= splat(-87.f) ? splat(0.f) : out;
}

enum Format : int64_t { kFloat32 = 0, kBf16 = 1, kFp8 = 2, kInt8 = 3, kInt4 = 4 };  // kv/formats.py NAMES, in order (tests/test_cpu_build.py)

// float8 e4m3fn (no infinities; 0x7f / 0xff are NaN) -> float, all 256 codes.
struct E4M3Table {
  float v[256];
  E4M3Table() {
    for (int c = 0; c < 256; ++c) {
      int sign = c >> 7, exp = (c >> 3) & 15, man = c & 7;
      float mag = exp == 0 ? std::ldexp(float(man), -9) : std::ldexp(1.f + man / 8.f, exp - 7);
      if (exp == 15 && man == 7) mag = NAN;
      v[c] = sign ? -mag : mag;
    }
  }
};
const E4M3Table kE4M3;

struct Cache {
  const uint8_t* c_kv;   // [L, pages, page_size, width] in the format's container
  const float* scales;   // [L, pages, page_size, groups] or null
  const uint8_t* k_pe;   // [L, pages, page_size, rope] float32 or bf16 bits
  const int32_t* table;  // [B, table_width]
  int64_t pages, page_size, width, groups, rope, table_width, layer;
  int64_t fmt, group, rank, pe_bytes;
};

// Key t of sequence b as float32: latents [0, rank), then k_pe [rank, rank + rope), zeros to `dim`. Every
// read of a vector stays inside the key's row when the row's widths are multiples of 16 (the DeepSeek ranks);
// other widths take the scalar loops.
void key_row(const Cache& c, int64_t b, int64_t t, float* out, int64_t dim) {
  // A page id outside the pool (a corrupt table entry) is clamped into it: never read past the pool.
  int64_t page = std::min<int64_t>(std::max<int32_t>(c.table[b * c.table_width + t / c.page_size], 0), c.pages - 1);
  int64_t slot = (c.layer * c.pages + page) * c.page_size + t % c.page_size;
  const float* s = c.scales ? c.scales + slot * c.groups : nullptr;
  bool vec = c.rank % kLanes == 0 && c.group % kLanes == 0;
  switch (c.fmt) {
    case kFloat32:
      std::memcpy(out, reinterpret_cast<const float*>(c.c_kv) + slot * c.width, c.rank * sizeof(float));
      break;
    case kBf16: {
      const uint16_t* v = reinterpret_cast<const uint16_t*>(c.c_kv) + slot * c.width;
      int64_t j = 0;
      if (vec)
        for (; j < c.rank; j += kLanes) store_f32(out + j, widen_bf16(v + j));
      for (; j < c.rank; ++j) out[j] = bf16_value(v[j]);
      break;
    }
    case kFp8: {
      const uint8_t* v = c.c_kv + slot * c.width;
      if (vec) {  // the same values as the table's, 16 at a time (a vector never straddles two groups)
        for (int64_t j = 0; j < c.rank; j += kLanes) store_f32(out + j, widen_e4m3(v + j) * splat(s[j / c.group]));
      } else {
        for (int64_t j = 0; j < c.rank; ++j) out[j] = kE4M3.v[v[j]] * s[j / c.group];
      }
      break;
    }
    case kInt8: {
      const int8_t* v = reinterpret_cast<const int8_t*>(c.c_kv) + slot * c.width;
      if (vec) {  // a vector never straddles two groups (both multiples of 16)
        for (int64_t j = 0; j < c.rank; j += kLanes) store_f32(out + j, widen_s8(v + j) * splat(s[j / c.group]));
      } else {
        for (int64_t j = 0; j < c.rank; ++j) out[j] = float(v[j]) * s[j / c.group];
      }
      break;
    }
    case kInt4: {  // byte j: channel j in the low nibble, j + half in the high one, each + 8
      const uint8_t* v = c.c_kv + slot * c.width;
      int64_t half = c.width;
      if (vec && half % kLanes == 0) {
        for (int64_t j = 0; j < half; j += kLanes) {
          f32v lo, hi;
          widen_u4(v + j, lo, hi);
          store_f32(out + j, lo * splat(s[j / c.group]));
          store_f32(out + half + j, hi * splat(s[(half + j) / c.group]));
        }
      } else {
        for (int64_t j = 0; j < half && j < c.rank; ++j) out[j] = float((v[j] & 15) - 8) * s[j / c.group];
        for (int64_t j = 0; j + half < c.rank; ++j) out[j + half] = float((v[j] >> 4) - 8) * s[(j + half) / c.group];
      }
      break;
    }
  }
  const uint8_t* pe = c.k_pe + slot * c.rope * c.pe_bytes;
  if (c.pe_bytes == 4) {
    std::memcpy(out + c.rank, pe, c.rope * sizeof(float));
  } else {
    const uint16_t* v = reinterpret_cast<const uint16_t*>(pe);
    int64_t j = 0;
    if (c.rope % kLanes == 0)
      for (; j < c.rope; j += kLanes) store_f32(out + c.rank + j, widen_bf16(v + j));
    for (; j < c.rope; ++j) out[c.rank + j] = bf16_value(v[j]);
  }
  for (int64_t j = c.rank + c.rope; j < dim; ++j) out[j] = 0.f;
}

// scores[h, i] = scale * q[h] . keys[i] for H heads and the kKeys keys of a block (q [H, dim], keys [kKeys, dim],
// scores [H, kKeys]), in tiles of H heads x 4 keys.
template <int H>
inline void score_tiles(const float* q, const float* keys, int64_t dim, float scale, float* scores) {
  for (int64_t i0 = 0; i0 < kKeys; i0 += 4) {
    f32v acc[H][4] = {};
    for (int64_t d = 0; d < dim; d += kLanes) {
      f32v kv[4];
      for (int i = 0; i < 4; ++i) kv[i] = in_register(load_f32(keys + (i0 + i) * dim + d));
      for (int h = 0; h < H; ++h) {
        f32v qv = in_register(load_f32(q + h * dim + d));
        for (int i = 0; i < 4; ++i) acc[h][i] += qv * kv[i];
      }
    }
    for (int h = 0; h < H; ++h) {
      float sums[4];
      lane_sums4(acc[h][0], acc[h][1], acc[h][2], acc[h][3], sums);
      for (int i = 0; i < 4; ++i) scores[h * kKeys + i0 + i] = sums[i] * scale;
    }
  }
}

// acc[h, 0:V) = acc[h, 0:V) * corr[h] + sum_{i < n} p[h, i] keys[i, 0:V) for H heads and V = 16 or 32 channels
// (TWO), keys [n, dim] and p [H, kKeys] as laid out in attend_segment, acc [H, rank].
template <int H, bool TWO>
inline void weigh_latents(const float* keys, int64_t dim, const float* p, const float* corr, float* acc, int64_t rank,
                          int64_t n) {
  f32v a0[H], a1[H];
  for (int h = 0; h < H; ++h) {
    a0[h] = load_f32(acc + h * rank) * splat(corr[h]);
    a1[h] = TWO ? load_f32(acc + h * rank + kLanes) * splat(corr[h]) : f32v{};
  }
  for (int64_t i = 0; i < n; ++i) {
    f32v k0 = in_register(load_f32(keys + i * dim));
    f32v k1 = TWO ? in_register(load_f32(keys + i * dim + kLanes)) : f32v{};
    for (int h = 0; h < H; ++h) {
      f32v w = splat(p[h * kKeys + i]);
      a0[h] += w * k0;
      if (TWO) a1[h] += w * k1;
    }
  }
  for (int h = 0; h < H; ++h) {
    store_f32(acc + h * rank, a0[h]);
    if (TWO) store_f32(acc + h * rank + kLanes, a1[h]);
  }
}

// One task: keys [t0, t1) of sequence b -> per head the running max m, the sum l of exp(score - m) and
// acc = sum of exp(score - m) * latents ([heads, rank]). q: [heads, dim] (q_lat then q_pe, zero-padded);
// heads [j per_query, (j + 1) per_query) are query j's, which sees only the keys t < limit[j].
struct Partial {
  std::vector<float> m, l, acc;
};

void attend_segment(const Cache& c, const float* q, const int64_t* limit, int64_t per_query, int64_t heads,
                    int64_t dim, float scale, int64_t b, int64_t t0, int64_t t1, Partial& out) {
  const int64_t rank = c.rank, rank_v = rank / kLanes * kLanes;
  out.m.assign(heads, kNeg);
  out.l.assign(heads, 0.f);
  out.acc.assign(heads * rank, 0.f);
  std::vector<float> keys(kKeys * dim), scores(heads * kKeys), corr(heads);
  for (int64_t k0 = t0; k0 < t1; k0 += kKeys) {
    int64_t n = std::min<int64_t>(kKeys, t1 - k0);
    for (int64_t i = 0; i < kKeys; ++i) {
      if (i < n) key_row(c, b, k0 + i, keys.data() + i * dim, dim);
      else std::memset(keys.data() + i * dim, 0, dim * sizeof(float));
    }
    // Each query's heads apart, in the tiles a one-query call of theirs runs (so that its result is that
    // call's, bit for bit); a query that sees none of the block's keys keeps its state (what masking all of
    // them would give).
    for (int64_t g0 = 0; g0 < heads; g0 += per_query) {
      int64_t nq = std::min<int64_t>(n, std::max<int64_t>(limit[g0 / per_query] - k0, 0));
      if (nq == 0) continue;
      int64_t g1 = g0 + per_query;
      // Scores [heads, kKeys] in tiles of 4 heads x 4 keys, each a 16-lane dot product over dim.
      for (int64_t h0 = g0; h0 < g1; h0 += 4) {
        float* s = scores.data() + h0 * kKeys;
        switch (std::min<int64_t>(4, g1 - h0)) {  // heads as a constant: no per-load test in the dot products
          case 4: score_tiles<4>(q + h0 * dim, keys.data(), dim, scale, s); break;
          case 3: score_tiles<3>(q + h0 * dim, keys.data(), dim, scale, s); break;
          case 2: score_tiles<2>(q + h0 * dim, keys.data(), dim, scale, s); break;
          default: score_tiles<1>(q + h0 * dim, keys.data(), dim, scale, s);
        }
      }
      // Online softmax per head over this block's keys (lanes = keys; the block's missing keys and those past
      // the query masked).
      for (int64_t h = g0; h < g1; ++h) {
        float* s = scores.data() + h * kKeys;
        for (int64_t i = nq; i < kKeys; ++i) s[i] = kNeg;
        float m_new = out.m[h];
        for (int64_t i = 0; i < nq; ++i) m_new = std::max(m_new, s[i]);
        f32v p = exp16(load_f32(s) - splat(m_new));
        for (int64_t i = nq; i < kKeys; ++i) p[i] = 0.f;
        store_f32(s, p);
        corr[h] = exp16(splat(out.m[h] - m_new))[0];
        out.l[h] = out.l[h] * corr[h] + lane_sum(p);
        out.m[h] = m_new;
      }
      // acc[h, :] = acc[h, :] * corr[h] + sum_i p[h, i] keys[i, :rank], in tiles of 8 heads x 32 channels.
      for (int64_t h0 = g0; h0 < g1; h0 += 8) {
        int64_t hn = std::min<int64_t>(8, g1 - h0);
        const float* p = scores.data() + h0 * kKeys;
        float* acc = out.acc.data() + h0 * rank;
        for (int64_t d = 0; d < rank_v; d += 2 * kLanes) {
          bool two = d + kLanes < rank_v;
          switch (hn * 2 + two) {  // heads and vectors as constants, so that the sums stay in registers
#define KTJAX_PV(H) \
  case 2 * H: weigh_latents<H, false>(keys.data() + d, dim, p, corr.data() + h0, acc + d, rank, n); break; \
  case 2 * H + 1: weigh_latents<H, true>(keys.data() + d, dim, p, corr.data() + h0, acc + d, rank, n); break;
            KTJAX_PV(1) KTJAX_PV(2) KTJAX_PV(3) KTJAX_PV(4) KTJAX_PV(5) KTJAX_PV(6) KTJAX_PV(7) KTJAX_PV(8)
#undef KTJAX_PV
          }
        }
        for (int h = 0; h < hn; ++h)  // channels past the last whole vector
          for (int64_t d = rank_v; d < rank; ++d) {
            float a = out.acc[(h0 + h) * rank + d] * corr[h0 + h];
            for (int64_t i = 0; i < n; ++i) a += scores[(h0 + h) * kKeys + i] * keys[i * dim + d];
            out.acc[(h0 + h) * rank + d] = a;
          }
      }
    }
  }
}

struct Job {
  Cache cache;
  const float* q_lat;      // [B, heads, rank]: S queries of heads / S heads each
  const float* q_pe;       // [B, heads, rope]
  const int32_t* visible;  // [B, S]: query j of row b sees keys [0, visible[b, j])
  float* out;              // [B, heads, rank]
  int64_t rows, heads, queries, dim;
  float scale;
  std::vector<int64_t> first;     // rows' first task
  std::vector<Partial> partials;  // one per task

  int64_t row_visible(int64_t b) const {
    int64_t n = 0;
    for (int64_t j = 0; j < queries; ++j) n = std::max<int64_t>(n, visible[b * queries + j]);
    return n;
  }
  int64_t segments(int64_t b) const { return (row_visible(b) + kSegment - 1) / kSegment; }

  void run_task(int64_t task) {
    int64_t b = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
    int64_t t0 = (task - first[b]) * kSegment, t1 = std::min<int64_t>(row_visible(b), t0 + kSegment);
    std::vector<float> q(heads * dim, 0.f);
    std::vector<int64_t> limit(visible + b * queries, visible + (b + 1) * queries);
    int64_t rank = cache.rank, rope = cache.rope;
    for (int64_t h = 0; h < heads; ++h) {
      std::memcpy(q.data() + h * dim, q_lat + (b * heads + h) * rank, rank * 4);
      std::memcpy(q.data() + h * dim + rank, q_pe + (b * heads + h) * rope, rope * 4);
    }
    attend_segment(cache, q.data(), limit.data(), heads / queries, heads, dim, scale, b, t0, t1, partials[task]);
  }

  // Each row's segments merged in order; a row with no visible key gets zeros (as the XLA path).
  void merge() {
    int64_t rank = cache.rank;
    for (int64_t b = 0; b < rows; ++b) {
      for (int64_t h = 0; h < heads; ++h) {
        float m = kNeg;
        for (int64_t s = first[b]; s < first[b + 1]; ++s) m = std::max(m, partials[s].m[h]);
        float l = 0.f;
        float* o = out + (b * heads + h) * rank;
        std::fill(o, o + rank, 0.f);
        for (int64_t s = first[b]; s < first[b + 1]; ++s) {
          const Partial& p = partials[s];
          float w = exp16(splat(p.m[h] - m))[0];
          l += p.l[h] * w;
          const float* a = p.acc.data() + h * rank;
          for (int64_t d = 0; d < rank; ++d) o[d] += a[d] * w;
        }
        float inv = l > 0.f ? 1.f / l : 0.f;
        for (int64_t d = 0; d < rank; ++d) o[d] = l > 0.f ? o[d] * inv : 0.f;
      }
    }
  }
};

ffi::Error decode_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_lat, ffi::Buffer<ffi::F32> q_pe,
                        ffi::AnyBuffer c_kv, ffi::Buffer<ffi::F32> scales, ffi::AnyBuffer k_pe,
                        ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> visible,
                        ffi::ResultBuffer<ffi::F32> out, int64_t fmt, int64_t group, float scale) {
  auto qd = q_lat.dimensions();  // [B, heads, rank]
  auto cd = c_kv.dimensions();   // [L, pages, page_size, width]
  auto pd = k_pe.dimensions();   // [L, pages, page_size, rope]
  auto job = std::make_shared<Job>();
  Cache& c = job->cache;
  c.c_kv = static_cast<const uint8_t*>(c_kv.untyped_data());
  c.scales = group > 0 ? scales.typed_data() : nullptr;
  c.k_pe = static_cast<const uint8_t*>(k_pe.untyped_data());
  c.table = table.typed_data();
  c.pages = cd[1];
  c.page_size = cd[2];
  c.width = cd[3];
  c.groups = group > 0 ? scales.dimensions()[3] : 0;
  c.rope = pd[3];
  c.table_width = table.dimensions()[1];
  c.layer = std::min<int64_t>(std::max<int32_t>(layer.typed_data()[0], 0), cd[0] - 1);
  c.fmt = fmt;
  c.group = group;
  c.rank = qd[2];
  c.pe_bytes = int64_t(k_pe.size_bytes() / k_pe.element_count());
  job->q_lat = q_lat.typed_data();
  job->q_pe = q_pe.typed_data();
  job->visible = visible.typed_data();
  job->out = out->typed_data();
  job->rows = qd[0];
  job->heads = qd[1];
  job->queries = visible.dimensions().size() == 2 ? visible.dimensions()[1] : 1;
  if (job->queries < 1 || job->heads % job->queries != 0)
    return ffi::Error::InvalidArgument("decode attention: heads must be a multiple of the queries per row");
  job->dim = (c.rank + c.rope + kLanes - 1) / kLanes * kLanes;
  job->scale = scale;
  job->first.assign(job->rows + 1, 0);
  for (int64_t b = 0; b < job->rows; ++b) job->first[b + 1] = job->first[b] + job->segments(b);
  int64_t tasks = job->first[job->rows];
  job->partials.resize(tasks);
  // Each thread takes the next task until none is left (segments differ in length, rows in segments); the
  // calling thread then merges (pool.h run_items).
  ktjax_pool::run_items(pool, tasks, pool.num_threads(), [job](int64_t t) { job->run_task(t); });
  job->merge();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxDecodeAttention, decode_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_lat [B, heads, rank]: S queries' heads
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_pe [B, heads, rope]
                                  .Arg<ffi::AnyBuffer>()         // c_kv [L, pages, page_size, width]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scales [L, pages, page_size, groups]
                                  .Arg<ffi::AnyBuffer>()         // k_pe [L, pages, page_size, rope]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page table [B, table_width]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer [1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // visible keys [B, S] (or [B]: S = 1)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // o_lat [B, heads, rank]
                                  .Attr<int64_t>("fmt")
                                  .Attr<int64_t>("group")
                                  .Attr<float>("scale"));
