// Block quantize-dequantize of activations along any axis; see fake_quant.h for the math.
//
// Blocks are walked as [pre][block][i][post]: the innermost loop runs over the contiguous post
// index, and for post == 1 (the last axis) each block is contiguous. The AVX2 build rounds 8
// values at once along whichever of the two is contiguous (same values as the scalar code: every
// step is exact or a single IEEE operation).
#include "fake_quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "isa.h"

namespace qcn {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// 2**k as float32 for k in [-149, 127] (subnormals included): exact.
inline float pow2(int64_t k) {
  const uint32_t bits = k >= -126 ? static_cast<uint32_t>(k + 127) << 23 : uint32_t{1} << (k + 149);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// floor(log2 v) for a normal positive float32 v: its exponent field.
inline int64_t floor_log2(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return static_cast<int64_t>((bits >> 23) & 0xFF) - 127;
}

const Grid kE4M3FN{3, -6, 8, -448.0f, 448.0f, true, true};
const Grid kE2M1{1, 0, 2, -6.0f, 6.0f, true, false};

// The per-block scale of a block with max |x| = amax (finite: no NaN/inf in the block).
struct MxScale {
  int64_t emax_elem;
  float operator()(float amax, bool finite) const {
    if (!finite) return kNaN;
    const int64_t e = amax >= 0x1p-126f ? floor_log2(amax) : -127;
    return pow2(std::min<int64_t>(127, std::max<int64_t>(-127, e - emax_elem)));
  }
};

struct Nvfp4Scale {
  float tensor_scale;
  float operator()(float amax, bool finite) const {
    if (!finite) return kNaN;
    return round_to_grid(amax / 6.0f / tensor_scale, kE4M3FN) * tensor_scale;
  }
};

#ifdef QCN_AVX2
// round_to_grid on 8 lanes, for grids whose steps 2**k (k = e - mantissa_bits) and their
// reciprocals are normal floats (k in [-126, 126]); a / step is then the exact a * 2**-k.
struct GridV {
  __m256 min, max, pow2_emin, nan_value, keep_zero_sign;
  __m256i emin, emax, mantissa_bits;
  static bool fits(const Grid& g) {
    return g.emin - g.mantissa_bits >= -126 && g.emax - g.mantissa_bits <= 126 && std::isfinite(g.min) &&
           std::isfinite(g.max);
  }
  explicit GridV(const Grid& g)
      : min(_mm256_set1_ps(g.min)), max(_mm256_set1_ps(g.max)), pow2_emin(_mm256_set1_ps(pow2(g.emin))),
        nan_value(_mm256_set1_ps(g.has_nan ? kNaN : 0.0f)),
        keep_zero_sign(_mm256_castsi256_ps(_mm256_set1_epi32(g.signed_zero ? -1 : 0))),
        emin(_mm256_set1_epi32(static_cast<int>(g.emin))), emax(_mm256_set1_epi32(static_cast<int>(g.emax))),
        mantissa_bits(_mm256_set1_epi32(static_cast<int>(g.mantissa_bits))) {}

  inline __m256 round(__m256 y) const {
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
    // max_ps returns its second operand for equal (signed) zeros: y, so -0.0 clips to -0.0 as
    // onnxruntime's Clip does; a NaN y is fixed up below
    const __m256 c = _mm256_min_ps(_mm256_max_ps(min, y), max);
    const __m256 a = _mm256_andnot_ps(sign, c);
    const __m256i bits = _mm256_castps_si256(_mm256_max_ps(a, pow2_emin));
    __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
    e = _mm256_min_epi32(_mm256_max_epi32(e, emin), emax);
    const __m256i k = _mm256_sub_epi32(e, mantissa_bits);
    const __m256 step = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
    const __m256 inv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(_mm256_set1_epi32(127), k), 23));
    const __m256 r = _mm256_mul_ps(
        _mm256_round_ps(_mm256_mul_ps(a, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), step);
    const __m256 keep = _mm256_or_ps(_mm256_cmp_ps(r, _mm256_setzero_ps(), _CMP_NEQ_UQ), keep_zero_sign);
    const __m256 out = _mm256_or_ps(r, _mm256_and_ps(_mm256_and_ps(c, sign), keep));
    return _mm256_blendv_ps(out, nan_value, _mm256_cmp_ps(y, y, _CMP_UNORD_Q));
  }

  // out[0..8) = round(x / d) * d (+0 where d == 0 when kZero).
  template <bool kZero>
  inline void quant(const float* x, __m256 d, float* out) const {
    __m256 v = _mm256_div_ps(_mm256_loadu_ps(x), d);
    if (kZero) v = _mm256_andnot_ps(_mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ), v);
    _mm256_storeu_ps(out, _mm256_mul_ps(round(v), d));
  }
};
#endif

// out = grid(x / d) * d per element, d from Scale per block; Nv: +0 where d == 0.
template <class Scale, bool kZeroWhereScaleZero>
void fake_quant_blocks(const float* x, int64_t pre, int64_t n, int64_t post, int64_t bs, const Grid& g,
                       const Scale& scale, float* out) {
#ifdef QCN_AVX2
  const bool vec = GridV::fits(g);
  const GridV gv(g);
#endif
  std::vector<float> amax(static_cast<size_t>(post)), d(static_cast<size_t>(post));
  std::vector<char> finite(static_cast<size_t>(post));
  for (int64_t p = 0; p < pre; ++p)
    for (int64_t i0 = 0; i0 < n; i0 += bs) {
      const int64_t i1 = std::min(n, i0 + bs);
      const float* xb = x + (p * n + i0) * post;
      float* yb = out + (p * n + i0) * post;
      std::fill(amax.begin(), amax.end(), 0.0f);
      std::fill(finite.begin(), finite.end(), 1);
      int64_t i = 0;
#ifdef QCN_AVX2
      if (post == 1) {  // 8 at a time along the contiguous block
        const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        const __m256 big = _mm256_set1_ps(std::numeric_limits<float>::max());
        __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (; i + 8 <= i1 - i0; i += 8) {
          const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xb + i), abs_mask);
          bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));  // inf or NaN
          m = _mm256_max_ps(m, a);  // a NaN lane is caught by `bad`
        }
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, m);
        amax[0] = *std::max_element(lanes, lanes + 8);
        finite[0] = _mm256_testz_ps(bad, bad) ? 1 : 0;
      }
#endif
      for (; i < i1 - i0; ++i)
        for (int64_t j = 0; j < post; ++j) {  // vectorized by the compiler along post
          const float a = std::fabs(xb[i * post + j]);
          const bool ok = a <= std::numeric_limits<float>::max();
          finite[j] = static_cast<char>(finite[j] & ok);
          amax[j] = ok && a > amax[j] ? a : amax[j];
        }
      for (int64_t j = 0; j < post; ++j) d[j] = scale(amax[j], finite[j] != 0);
      i = 0;
#ifdef QCN_AVX2
      if (vec && post == 1) {  // one contiguous block, one scale
        for (const __m256 dv = _mm256_set1_ps(d[0]); i + 8 <= i1 - i0; i += 8)
          gv.quant<kZeroWhereScaleZero>(xb + i, dv, yb + i);
      }
#endif
      for (; i < i1 - i0; ++i) {
        int64_t j = 0;
#ifdef QCN_AVX2
        if (vec)
          for (; j + 8 <= post; j += 8) gv.quant<kZeroWhereScaleZero>(xb + i * post + j, _mm256_loadu_ps(&d[j]), yb + i * post + j);
#endif
        for (; j < post; ++j) {
          const float v = kZeroWhereScaleZero && d[j] == 0.0f ? 0.0f : xb[i * post + j] / d[j];
          yb[i * post + j] = round_to_grid(v, g) * d[j];
        }
      }
    }
}

}  // namespace

float round_to_grid(float y, const Grid& g) {
  if (std::isnan(y)) return g.has_nan ? kNaN : 0.0f;
  const float c = std::min(std::max(y, g.min), g.max);
  const float a = std::fabs(c);
  const int64_t e = std::min(g.emax, std::max(g.emin, floor_log2(std::max(a, pow2(g.emin)))));
  const float step = pow2(e - g.mantissa_bits);
  const float r = std::nearbyint(a / step) * step;
  return std::signbit(c) && (r != 0.0f || g.signed_zero) ? -r : r;
}

void fake_quant_mx(const float* x, int64_t pre, int64_t n, int64_t post, int64_t block_size, int64_t emax_elem,
                   const Grid& g, float* out) {
  fake_quant_blocks<MxScale, false>(x, pre, n, post, block_size, g, MxScale{emax_elem}, out);
}

void fake_quant_minifloat(const float* x, int64_t count, float scale, const Grid& g, float* out) {
  int64_t i = 0;
#ifdef QCN_AVX2
  if (GridV::fits(g)) {
    const GridV gv(g);
    for (const __m256 d = _mm256_set1_ps(scale); i + 8 <= count; i += 8) gv.quant<false>(x + i, d, out + i);
  }
#endif
  for (; i < count; ++i) out[i] = round_to_grid(x[i] / scale, g) * scale;
}

void fake_quant_nvfp4(const float* x, int64_t pre, int64_t n, int64_t post, int64_t block_size, float tensor_scale,
                      float* out) {
  fake_quant_blocks<Nvfp4Scale, true>(x, pre, n, post, block_size, kE2M1, Nvfp4Scale{tensor_scale}, out);
}

}  // namespace qcn
