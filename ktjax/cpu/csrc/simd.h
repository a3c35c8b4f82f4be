// 16-lane float vectors for ktjax's CPU kernels (matmul.cc, attention.cc): GCC/Clang vector extensions, with
// intrinsics where the compiler's own code is poor (-march=native decides which), plain loops elsewhere.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace ktjax_simd {

constexpr int kLanes = 16;  // floats per vector

typedef float f32v __attribute__((vector_size(64)));
typedef int32_t i32v __attribute__((vector_size(64)));
typedef uint8_t u8v __attribute__((vector_size(64)));  // 64 bytes (int8 data is handled as its bits)
constexpr int kBytes = 64;

inline f32v load_f32(const float* p) {
  f32v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_f32(float* p, f32v v) { std::memcpy(p, &v, sizeof(v)); }

// v, kept in a register: GCC otherwise folds a vector that several FMAs use back into each of them as a memory
// operand, one load per use (a block of 4 outputs x 4 rows then makes 20 loads for 16 FMAs).
inline f32v in_register(f32v v) {
#if defined(__AVX512F__)  // one zmm register; elsewhere a 16-float vector has no register of its own to pin
  asm("" : "+v"(v));
#endif
  return v;
}

inline f32v splat(float x) { return f32v{} + x; }

// The lanes of v added in a fixed order (pairwise halves).
inline float lane_sum(f32v v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float a[kLanes];
  std::memcpy(a, &v, sizeof(v));
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) a[i] += a[i + width];
  return a[0];
#endif
}

// lane_sum of four vectors at once (the same pairs added in the same order, so the same four floats), in
// shuffles that serve all four: 4 x 16 lanes -> 4 x 8 -> 4 x 4 -> 4 x 2 -> 4.
inline void lane_sums4(f32v a, f32v b, f32v c, f32v d, float out[4]) {
#if defined(__AVX512F__)
  __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4((__m512)a, (__m512)b, _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_f32x4((__m512)a, (__m512)b, _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4((__m512)c, (__m512)d, _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_f32x4((__m512)c, (__m512)d, _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 e = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
  e = _mm512_add_ps(e, _mm512_permute_ps(e, _MM_SHUFFLE(1, 0, 3, 2)));
  e = _mm512_add_ps(e, _mm512_permute_ps(e, _MM_SHUFFLE(2, 3, 0, 1)));
  out[0] = e[0], out[1] = e[4], out[2] = e[8], out[3] = e[12];
#else
  out[0] = lane_sum(a), out[1] = lane_sum(b), out[2] = lane_sum(c), out[3] = lane_sum(d);
#endif
}

// 16 int8 as floats. GCC's generic vector conversions scalarize this, so the widening is spelled with
// intrinsics where the CPU has them.
inline f32v widen_s8(const int8_t* p) {
#if defined(__AVX512F__)
  return (f32v)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#else
  f32v out;
  for (int i = 0; i < kLanes; ++i) out[i] = float(p[i]);
  return out;
#endif
}

// 16 bytes of packed int4 -> (low nibbles - 8, high nibbles - 8) as floats, exactly (1.1x the one-row int4
// product's rate of widening each half as signed bytes and converting: docs/results.md "One-row expert products").
inline void widen_u4(const uint8_t* p, f32v& lo, f32v& hi) {
#if defined(__AVX512F__)
  // each byte widened once; a nibble n in the low mantissa bits of 2^23 is the float 2^23 + n, exactly, and minus
  // 2^23 + 8 the float n - 8 (one shuffle for both halves, no integer-to-float conversion)
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  __m512i magic = _mm512_set1_epi32(0x4B000000);
  __m512 bias = _mm512_set1_ps(8388616.f);
  lo = (f32v)_mm512_sub_ps(_mm512_castsi512_ps(_mm512_ternarylogic_epi32(b, _mm512_set1_epi32(15), magic, 0xEA)), bias);
  hi = (f32v)_mm512_sub_ps(_mm512_castsi512_ps(_mm512_or_si512(_mm512_srli_epi32(b, 4), magic)), bias);
#else
  for (int i = 0; i < kLanes; ++i) {
    lo[i] = float(p[i] & 15) - 8.f;
    hi[i] = float(p[i] >> 4) - 8.f;
  }
#endif
}

// One bfloat16 bit pattern as a float (a bf16 is the high half of a float32).
inline float bf16_value(uint16_t bits) {
  uint32_t w = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

// 16 bfloat16 bit patterns as floats.
inline f32v widen_bf16(const uint16_t* p) {
#if defined(__AVX512F__)
  __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
  return (f32v)_mm512_castsi512_ps(w);
#else
  f32v out;
  for (int i = 0; i < kLanes; ++i) out[i] = bf16_value(p[i]);
  return out;
#endif
}

// 16 float8 e4m3fn bit patterns as floats, exactly (no infinities; 0x7f / 0xff are NaN): a normal number is a
// float32 with the exponent rebiased (7 -> 127) and the mantissa moved up, a subnormal one mantissa x 2^-9.
inline f32v widen_e4m3(const uint8_t* p) {
#if defined(__AVX512F__)
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  __m512i exponent = _mm512_and_si512(_mm512_srli_epi32(b, 3), _mm512_set1_epi32(15));
  __m512i mantissa = _mm512_and_si512(b, _mm512_set1_epi32(7));
  __m512i normal = _mm512_or_si512(_mm512_slli_epi32(_mm512_add_epi32(exponent, _mm512_set1_epi32(120)), 23),
                                   _mm512_slli_epi32(mantissa, 20));
  __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(mantissa), _mm512_set1_ps(1.f / 512));
  __m512i magnitude = _mm512_mask_blend_epi32(_mm512_cmpeq_epi32_mask(exponent, _mm512_setzero_si512()), normal,
                                              _mm512_castps_si512(subnormal));
  __m512i low7 = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
  magnitude = _mm512_mask_blend_epi32(_mm512_cmpeq_epi32_mask(low7, _mm512_set1_epi32(0x7f)), magnitude,
                                      _mm512_set1_epi32(0x7fc00000));  // NaN
  __m512i sign = _mm512_slli_epi32(_mm512_srli_epi32(b, 7), 31);
  return (f32v)_mm512_castsi512_ps(_mm512_or_si512(magnitude, sign));
#else
  f32v out;
  for (int i = 0; i < kLanes; ++i) {
    uint32_t c = p[i], exponent = (c >> 3) & 15, mantissa = c & 7, bits;
    float sub = float(mantissa) * (1.f / 512);
    if ((c & 0x7f) == 0x7f) bits = 0x7fc00000u;
    else if (exponent == 0) std::memcpy(&bits, &sub, 4);
    else bits = ((exponent + 120) << 23) | (mantissa << 20);
    bits |= (c >> 7) << 31;
    float f;
    std::memcpy(&f, &bits, 4);
    out[i] = f;
  }
  return out;
#endif
}

// n bytes from p (n <= 0: none, n >= 64: 64) and zeros after them: a row's tail is read without touching what
// follows it.
inline u8v load_bytes(const void* p, int64_t n) {
#if defined(__AVX512BW__)
  if (n >= kBytes) return (u8v)_mm512_loadu_si512(p);
  return (u8v)_mm512_maskz_loadu_epi8(n <= 0 ? 0 : ~0ULL >> (kBytes - n), p);
#else
  u8v v = {};
  std::memcpy(&v, p, n <= 0 ? 0 : n >= kBytes ? kBytes : n);
  return v;
#endif
}

// The low and high nibbles of 64 bytes, each as a byte 0..15.
inline void split_nibbles(u8v b, u8v& lo, u8v& hi) {
#if defined(__AVX512BW__)
  __m512i nibble = _mm512_set1_epi8(15);
  lo = (u8v)_mm512_and_si512((__m512i)b, nibble);
  hi = (u8v)_mm512_and_si512(_mm512_srli_epi16((__m512i)b, 4), nibble);
#else
  lo = b & 15;
  hi = b >> 4;
#endif
}

// acc plus, in each 32-bit lane i, the sum of the four products u[4i + j] * s[4i + j] (u unsigned bytes, s signed
// ones): AVX-512 VNNI's vpdpbusd, exact (no saturation).
inline i32v dot_u8s8(i32v acc, u8v u, u8v s) {
#if defined(__AVX512VNNI__)
  return (i32v)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)u, (__m512i)s);
#else
  for (int i = 0; i < kLanes; ++i) {
    int32_t sum = 0;
    for (int j = 0; j < 4; ++j) sum += int32_t(u[4 * i + j]) * int32_t(int8_t(s[4 * i + j]));
    acc[i] += sum;
  }
  return acc;
#endif
}

inline f32v to_f32(i32v v) { return __builtin_convertvector(v, f32v); }

// A pause in a short wait for another thread (the x86 hint that saves power and the sibling's cycles).
inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

}  // namespace ktjax_simd
