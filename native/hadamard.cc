#include "hadamard.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "isa.h"

namespace qcn {

namespace {

// The butterfly rounds with half-width h = from, 2 from, .., b / 2 on one block in place: (a, c) ->
// (a + c, a - c) for a = v[i + j], c = v[i + j + h]. The rounds commute (each pairs indices that
// differ in one bit), so any order gives H_b; for h >= 8 the inner loop runs over contiguous
// vectors (the compiler vectorizes it).
void rounds(float* v, int64_t b, int64_t from) {
  for (int64_t h = from; h < b; h *= 2) {
    for (int64_t i = 0; i < b; i += 2 * h) {
      float* __restrict a = v + i;
      float* __restrict c = v + i + h;
      for (int64_t j = 0; j < h; ++j) {
        const float p = a[j], q = c[j];
        a[j] = p + q;
        c[j] = p - q;
      }
    }
  }
}

#ifdef QCN_AVX2
// H_8 on each 8-float vector in registers: rounds h = 1, 2, 4 as out = v * s + swap(v), with
// swap exchanging the partners and s = +1 for the lower partner, -1 for the upper one.
inline __m256 h8(__m256 v) {
  const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  v = _mm256_fmadd_ps(v, s1, _mm256_permute_ps(v, 0xB1));            // swap adjacent lanes
  v = _mm256_fmadd_ps(v, s2, _mm256_permute_ps(v, 0x4E));            // swap lane pairs
  return _mm256_fmadd_ps(v, s4, _mm256_permute2f128_ps(v, v, 0x01));  // swap the 128-bit halves
}
#endif

}  // namespace

void block_hadamard(const float* x, int64_t rows, int64_t k, int64_t block, const float* signs, float* y) {
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k;
    float* yr = y + r * k;
    int64_t i = 0;
#ifdef QCN_AVX2
    if (block >= 8) {  // y = H_8 (x * d * scale) per vector, then the rounds from h = 8
      const __m256 sc = _mm256_set1_ps(scale);
      for (; i + 8 <= k; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xr + i), sc);
        if (signs != nullptr) v = _mm256_mul_ps(v, _mm256_loadu_ps(signs + i));
        _mm256_storeu_ps(yr + i, h8(v));
      }
      for (int64_t g = 0; g < k; g += block) rounds(yr + g, block, 8);
      continue;
    }
#endif
    for (; i < k; ++i) yr[i] = xr[i] * (signs != nullptr ? signs[i] * scale : scale);
    for (int64_t g = 0; g < k; g += block) rounds(yr + g, block, 1);
  }
}

template <class Q>
void block_hadamard_quantize(const float* x, int64_t rows, int64_t k, int64_t block, const float* signs, float scale,
                             int32_t zero_point, Q* q) {
  // clamp before rounding to [lo - zp, hi - zp] (integers, so the order does not matter)
  const float lo = static_cast<float>(std::numeric_limits<Q>::lowest() - zero_point);
  const float hi = static_cast<float>(std::numeric_limits<Q>::max() - zero_point);
  std::vector<float> buf(static_cast<size_t>(k));
  for (int64_t r = 0; r < rows; ++r) {
    block_hadamard(x + r * k, 1, k, block, signs, buf.data());
    Q* qr = q + r * k;
    int64_t i = 0;
#ifdef QCN_AVX2
    const __m256 vs = _mm256_set1_ps(scale), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    const __m256i vz = _mm256_set1_epi32(zero_point);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
    auto codes = [&](int64_t j) {  // 8 codes as int32, already in Q's range
      __m256 v = _mm256_div_ps(_mm256_loadu_ps(buf.data() + j), vs);
      v = _mm256_min_ps(_mm256_max_ps(v, vlo), vhi);
      return _mm256_add_epi32(_mm256_cvtps_epi32(v), vz);  // cvtps: round half to even
    };
    for (; i + 32 <= k; i += 32) {  // 32 codes: int32 -> int16 -> 8 bits (no saturation: in range)
      const __m256i ab = _mm256_packs_epi32(codes(i), codes(i + 8));
      const __m256i cd = _mm256_packs_epi32(codes(i + 16), codes(i + 24));
      const __m256i bytes = std::is_same<Q, uint8_t>::value ? _mm256_packus_epi16(ab, cd) : _mm256_packs_epi16(ab, cd);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + i), _mm256_permutevar8x32_epi32(bytes, order));
    }
#endif
    for (; i < k; ++i) {
      float v = buf[i] / scale;
      v = v < lo ? lo : (v > hi ? hi : v);
      qr[i] = static_cast<Q>(static_cast<int32_t>(std::nearbyint(v)) + zero_point);
    }
  }
}

template void block_hadamard_quantize<uint8_t>(const float*, int64_t, int64_t, int64_t, const float*, float, int32_t,
                                               uint8_t*);
template void block_hadamard_quantize<int8_t>(const float*, int64_t, int64_t, int64_t, const float*, float, int32_t,
                                              int8_t*);

}  // namespace qcn
