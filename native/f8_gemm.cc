// Float8-weight GEMV / GEMM; see f8_gemm.h for the math.
//
// GEMV (one row): per column, 16 codes per step (8 on AVX2) become float16 bits by shifts and
// masks, then float32 by vcvtph2ps, and one FMA with x; the column's scale (times 2**8 for E4M3)
// multiplies the sum once. More rows: each column decoded once to a buffer and dotted with every
// row; from kFloatGemmMinRows rows on (AVX2 builds), columns decoded once per tile and fed to
// fp4_gemm.cc's panel kernel (gemm_float_columns).
#include "f8_gemm.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "fp4_gemm.h"
#include "isa.h"

namespace qcn {
namespace {

// The float16 bits of a code (E4M3FN: value / 2**8; NaN codes -> a float16 NaN).
inline uint16_t half_bits(uint8_t c, bool e5m2) {
  if (e5m2) return static_cast<uint16_t>(c << 8);
  if ((c & 0x7F) == 0x7F) return 0x7E00;
  return static_cast<uint16_t>(((c & 0x7F) << 7) | ((c & 0x80) << 8));
}

float half_to_float(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const float v = e == 0 ? std::ldexp(static_cast<float>(m), -24)
                  : e == 31 ? (m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity())
                            : std::ldexp(1.0f + m / 1024.0f, e - 15);
  return (h & 0x8000) ? -v : v;
}

#ifdef QCN_AVX2
// 8 codes -> the float16 bits of half_bits, in 8 16-bit lanes.
inline __m128i half_bits8(__m128i c16, bool e5m2) {  // c16: 8 codes zero-extended to 16 bits
  if (e5m2) return _mm_slli_epi16(c16, 8);
  const __m128i mag = _mm_and_si128(c16, _mm_set1_epi16(0x7F));
  const __m128i h = _mm_or_si128(_mm_slli_epi16(mag, 7), _mm_slli_epi16(_mm_and_si128(c16, _mm_set1_epi16(0x80)), 8));
  return _mm_blendv_epi8(h, _mm_set1_epi16(0x7E00), _mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7F)));
}

#ifdef QCN_AVX512
inline __m512 decode16(const uint8_t* q, bool e5m2) {
  const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  __m256i h;
  if (e5m2) {
    h = _mm256_slli_epi16(c, 8);
  } else {
    const __m256i mag = _mm256_and_si256(c, _mm256_set1_epi16(0x7F));
    h = _mm256_or_si256(_mm256_slli_epi16(mag, 7), _mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x80)), 8));
    h = _mm256_blendv_epi8(h, _mm256_set1_epi16(0x7E00), _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7F)));
  }
  return _mm512_cvtph_ps(h);
}
#endif

constexpr int64_t kPrefetch = 8192;  // bytes ahead in the (contiguous) code stream


// sum_k x[k] * half(code[k]) for one column (the value / 2**8 for E4M3).
float column_dot(const float* x, const uint8_t* q, int64_t k, bool e5m2) {
  int64_t i = 0;
  float tail = 0.0f;
#ifdef QCN_AVX512
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; i + 32 <= k; i += 32) {
    if ((i & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + i + kPrefetch), _MM_HINT_T0);
    a0 = _mm512_fmadd_ps(decode16(q + i, e5m2), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(decode16(q + i + 16, e5m2), _mm512_loadu_ps(x + i + 16), a1);
  }
  tail = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= k; i += 8) {
    const __m128i c = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)));
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(half_bits8(c, e5m2)), _mm256_loadu_ps(x + i), acc);
  }
  float sum = tail + hsum(acc);
  for (; i < k; ++i) sum += x[i] * half_to_float(half_bits(q[i], e5m2));
  return sum;
}
#else
float column_dot(const float* x, const uint8_t* q, int64_t k, bool e5m2) {
  float sum = 0.0f;
  for (int64_t i = 0; i < k; ++i) sum += x[i] * half_to_float(half_bits(q[i], e5m2));
  return sum;
}
#endif

}  // namespace

float decode_f8(uint8_t code, bool e5m2) {
  return half_to_float(half_bits(code, e5m2)) * (e5m2 ? 1.0f : 256.0f);
}

void matmul_f8(const float* x, int64_t m, const F8Weight& w, float* y) {
  const float unit = w.e5m2 ? 1.0f : 256.0f;  // half(code) * unit is the code's value, exactly
#ifdef QCN_AVX2
  if (m >= kFloatGemmMinRows) {  // every element (half(code) * unit) * scale: the same bits on every path
    const int64_t kp = (w.k + 15) / 16 * 16;
    gemm_float_columns(x, m, w.k, kp, w.n, [&](int64_t n, float* dst) {
      const uint8_t* q = w.codes + n * w.k;
      int64_t i = 0;
#ifdef QCN_AVX512
      const __m512 s16 = _mm512_set1_ps(w.scales[n]), u16 = _mm512_set1_ps(unit);
      for (; i + 16 <= w.k; i += 16) _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_mul_ps(decode16(q + i, w.e5m2), u16), s16));
#endif
      const __m256 s8 = _mm256_set1_ps(w.scales[n]), u8 = _mm256_set1_ps(unit);
      for (; i + 8 <= w.k; i += 8) {
        const __m128i c = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)));
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtph_ps(half_bits8(c, w.e5m2)), u8), s8));
      }
      for (; i < w.k; ++i) dst[i] = decode_f8(q[i], w.e5m2) * w.scales[n];
      for (; i < kp; ++i) dst[i] = 0.0f;
    }, y);
    return;
  }
  if (m > 1) {  // several rows: decode each column once (to half(code), exact) and dot it with every row
    std::vector<float> col(static_cast<size_t>(w.k));
    for (int64_t n = 0; n < w.n; ++n) {
      const uint8_t* q = w.codes + n * w.k;
      int64_t i = 0;
#ifdef QCN_AVX512
      for (; i + 16 <= w.k; i += 16) _mm512_storeu_ps(&col[i], decode16(q + i, w.e5m2));
#endif
      for (; i + 8 <= w.k; i += 8) {
        const __m128i c = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)));
        _mm256_storeu_ps(&col[i], _mm256_cvtph_ps(half_bits8(c, w.e5m2)));
      }
      for (; i < w.k; ++i) col[i] = half_to_float(half_bits(q[i], w.e5m2));
      for (int64_t r = 0; r < m; ++r) y[r * w.n + n] = dot(x + r * w.k, col.data(), w.k) * (unit * w.scales[n]);
    }
    return;
  }
#endif
  for (int64_t r = 0; r < m; ++r)
    for (int64_t n = 0; n < w.n; ++n)
      y[r * w.n + n] = column_dot(x + r * w.k, w.codes + n * w.k, w.k, w.e5m2) * (unit * w.scales[n]);
}

}  // namespace qcn
