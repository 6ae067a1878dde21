// The code paths a build compiles, from the compiler's target macros (qcompile/native.py picks the
// flags per CPU: ISA_FLAGS). Shared by the kernel files.
//   QCN_AVX2    AVX2 + FMA + F16C vector code (else portable scalar code)
//   QCN_VNNI    vpdpbusd on 256-bit registers (AVX-VNNI, or AVX512-VNNI through AVX512VL), QCN_DPBUSD
//   QCN_AVX512  512-bit paths (AVX512F/BW/VL + VNNI)
#pragma once

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QCN_AVX2 1
#if defined(__AVXVNNI__)
#define QCN_VNNI "avx2-vnni"
#define QCN_DPBUSD _mm256_dpbusd_avx_epi32
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define QCN_VNNI "avx512-vnni"
#define QCN_DPBUSD _mm256_dpbusd_epi32
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define QCN_AVX512 1
#endif
#endif
#endif

#ifdef QCN_AVX2
namespace qcn {
// The sum of a vector's 8 lanes.
inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}

// sum_i a[i] * b[i] in float32 (four accumulators of 8 lanes, then the tail).
inline float dot(const float* a, const float* b, int64_t len) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= len; i += 32)
    for (int u = 0; u < 4; ++u)
      acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * u), _mm256_loadu_ps(b + i + 8 * u), acc[u]);
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < len; ++i) sum += a[i] * b[i];
  return sum;
}
}  // namespace qcn
#endif
