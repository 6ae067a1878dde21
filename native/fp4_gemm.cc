// Fused FP4 (E2M1) dequantize + GEMV/GEMM kernels; see fp4_gemm.h for the math and the layout.
//
// Map of this file (ISA builds: see qcompile/native.py ISA_FLAGS):
//   matmul_scalar      portable: fake-quantize x, sum x * dequantized weight (no AVX2).
//   float paths        act = none (weight-only), AVX2 + FMA + F16C:
//     dot_column       one row: decode 64 weights per step (below), FMA with x in kPerm order;
//     gemv512          the same on 128 weights per 512-bit step (AVX-512 builds);
//     decode_column    4-15 rows: a tile of columns decoded once (scaled) and dotted per row;
//     gemm_float       >= 16 rows: rows in the lanes (16 or 8), columns decoded to w * s once.
//   integer paths      act = mxfp4 / nvfp4 (W4A4): exact int32 block sums (matmul_int):
//     lane_dot_column  weight and activation blocks that differ: per 8-k lane scales;
//     block_dot_rows   coinciding blocks: a group of blocks decoded once per 1 or 4 rows;
//     gemm_int         >= half a panel (8 / 4 rows): rows in the int32 lanes, weight dwords
//                      broadcast (vpdpbusd; vpmaddubsw + vpmaddwd without VNNI).
//
// The float decode: 64 weights (32 bytes of one column) per step.
//   1. nibbles: lo = byte & 15 (even k), hi = byte >> 4 (odd k).
//   2. Every E2M1 value is a float32 whose low 16 bits are zero, so two vpshufb lookups give its
//      bytes 2 and 3; vpunpck{l,h}bw interleaves them into the 16-bit high halves, and
//      `word << 16` / `word & 0xffff0000` turn each 32-bit lane pair into two float32 vectors.
//      Eight float vectors per step, no int->float conversion and no per-lane sign handling.
//   3. The weights come out in a fixed permutation of k, so x is permuted once per row to match
//      (kPerm); each vector is FMA'd with x into one of two block partials (bytes 0-7/16-23 and
//      8-15/24-31 of the step), which are then FMA'd with their per-lane block scales.
#include "fp4_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "isa.h"

namespace qcn {
namespace {

constexpr float kE2M1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                             -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

float decode_e4m3fn(uint8_t c) {
  if ((c & 0x7F) == 0x7F) return NAN;
  const int e = (c >> 3) & 15, m = c & 7;
  const float v = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(1.0f + m / 8.0f, e - 7);
  return (c & 0x80) ? -v : v;
}

// Round-half-even onto the E2M1 grid {0, 0.5, 1, 1.5, 2, 3, 4, 6}, saturating to +-6, sign kept;
// NaN -> +0 (E2M1 has no NaN), as codec.round_to_grid. Every product/quotient here is exact.
inline float round_e2m1(float v) {
  if (std::isnan(v)) return 0.0f;
  const float a = std::min(std::fabs(v), 6.0f);
  float q;
  if (a < 2.0f) {
    q = std::nearbyint(a * 2.0f) * 0.5f;
  } else if (a < 4.0f) {
    q = std::nearbyint(a);
  } else {
    q = std::nearbyint(a * 0.5f) * 2.0f;
  }
  return std::copysign(q, v);
}

// Round-half-even onto E4M3FN (subnormal step 2**-9), saturating to +-448, NaN kept.
inline float round_e4m3fn(float r) {
  if (std::isnan(r)) return r;
  const float a = std::min(std::fabs(r), 448.0f);
  const int e = a < 0x1p-6f ? -6 : std::ilogb(a);
  const float step = std::ldexp(1.0f, e - 3);
  return std::copysign(std::nearbyint(a / step) * step, r);
}

// max |x[i]| over a block; false when the block holds NaN or +-inf.
inline bool block_amax(const float* x, int64_t len, float& amax) {
  float m = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < len; ++i) {
    const float a = std::fabs(x[i]);
    if (!(a <= std::numeric_limits<float>::max())) finite = false;
    else if (a > m) m = a;
  }
  amax = m;
  return finite;
}

// The divisor/multiplier of a block with max |x| = amax: X (mxfp4) or d = float32(s_b * s_t) (nvfp4).
inline float block_scale(ActQuant act, float amax, bool finite, float tensor_scale) {
  if (!finite) return NAN;
  if (act == ActQuant::kMxfp4) {
    const int e = amax > 0.0f ? std::ilogb(amax) - 2 : -127;  // emax(E2M1) = 2
    return std::ldexp(1.0f, std::min(127, std::max(-127, e)));
  }
  const float ratio = amax / 6.0f / tensor_scale;
  return round_e4m3fn(ratio) * tensor_scale;
}

float decode_e8m0(uint8_t c) { return c == 255 ? NAN : std::ldexp(1.0f, static_cast<int>(c) - 127); }

[[maybe_unused]] void matmul_scalar(const float* x, int64_t m, const Fp4Weight& w, float* y) {
  const int64_t kp = padded_k(w.k, w.block_size), nb = kp / w.block_size;
  for (int64_t n = 0; n < w.n; ++n) {
    const uint8_t* q = w.codes + n * (kp / 2);
    const uint8_t* s = w.scales + n * nb;
    for (int64_t r = 0; r < m; ++r) {
      const float* xr = x + r * w.k;
      float acc = 0.0f;
      for (int64_t b = 0; b * w.block_size < w.k; ++b) {
        const int64_t k1 = std::min(w.k, (b + 1) * w.block_size);
        const float scale = w.scale_lut[s[b]];
        for (int64_t k = b * w.block_size; k < k1; ++k) {  // the dequantized weight, as in the reference
          const uint8_t byte = q[k >> 1];
          acc += xr[k] * (kE2M1[(k & 1) ? byte >> 4 : byte & 15] * scale);
        }
      }
      y[r * w.n + n] = acc;
    }
  }
}

#ifdef QCN_AVX2

constexpr int64_t kStep = 64;     // weights per step (32 code bytes)
constexpr int64_t kTileRows = 4;  // from this many rows on, decode column tiles once
constexpr int64_t kTileCols = 8;
constexpr int64_t kPrefetch = 2048;  // bytes ahead in the (contiguous) code stream
constexpr int64_t kPrefetchInt = 16384;  // the same for the integer block path (measured best, 8-32 KiB)

// Perm<L>::idx[i]: which k (within a step of 8 vectors of L floats) the i-th decoded float is.
// Vector v = nib*4 + up*2 + par, lane = 4h + j holds byte b = 16h + 8up + 2j + par, nibble
// nib -> k = 2b + nib (h: the 128-bit lane).
template <int L>
struct Perm {
  int idx[8 * L];
  Perm() {
    for (int v = 0; v < 8; ++v)
      for (int lane = 0; lane < L; ++lane) {
        const int nib = v >> 2, up = (v >> 1) & 1, par = v & 1, h = lane >> 2, j = lane & 3;
        idx[v * L + lane] = 2 * (16 * h + 8 * up + 2 * j + par) + nib;
      }
  }
};
const Perm<8> kPerm;

// xp[0, kp) = x (length k) in the order of `perm` per step of 8 * L, zero past k.
template <int L>
void permute_x(const Perm<L>& perm, const float* x, int64_t k, int64_t kp, float* xp) {
  for (int64_t base = 0; base < kp; base += 8 * L)
    for (int i = 0; i < 8 * L; ++i) {
      const int64_t src = base + perm.idx[i];
      xp[base + i] = src < k ? x[src] : 0.0f;
    }
}

struct Decoder {
  __m256i byte2, byte3, low_nibble, high_half;
  Decoder() {
    alignas(32) uint8_t b2[32], b3[32];
    for (int i = 0; i < 32; ++i) {
      uint32_t bits;
      std::memcpy(&bits, &kE2M1[i & 15], 4);
      b2[i] = static_cast<uint8_t>(bits >> 16);
      b3[i] = static_cast<uint8_t>(bits >> 24);
    }
    byte2 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b2));
    byte3 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b3));
    low_nibble = _mm256_set1_epi8(15);
    high_half = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  }

  // The 64 weights at q as 8 float vectors in kPerm order (unscaled E2M1 values).
  inline void decode(const uint8_t* q, __m256 f[8]) const {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    const __m256i nibbles[2] = {_mm256_and_si256(v, low_nibble),
                                _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibble)};
    for (int nib = 0; nib < 2; ++nib) {
      const __m256i lo = _mm256_shuffle_epi8(byte2, nibbles[nib]);
      const __m256i hi = _mm256_shuffle_epi8(byte3, nibbles[nib]);
      const __m256i words[2] = {_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi)};
      for (int up = 0; up < 2; ++up) {
        f[nib * 4 + up * 2] = _mm256_castsi256_ps(_mm256_slli_epi32(words[up], 16));
        f[nib * 4 + up * 2 + 1] = _mm256_castsi256_ps(_mm256_and_si256(words[up], high_half));
      }
    }
  }
};

// The float32 values of 8 scale codes, as build_scale_lut (a gather from the table costs more than
// the whole rest of a block group).
//   E8M0: c << 23 is 2**(c - 127) for c in 1..254; c = 0 is 2**-127 (0x00400000), c = 255 NaN.
//   E4M3: the code's exponent and mantissa fields placed in a float16's are its value * 2**-8, also
//   for subnormals (exact, and F16C conversions ignore MXCSR.DAZ); times 256 * tensor_scale (exact
//   power-of-two scaling) that is float32(value * tensor_scale), one rounding as in the table.
//   0x7F / 0xFF are NaN.
struct ScaleDecoder {
  ScaleType type;
  __m256 scale256;  // 256 * tensor_scale
  ScaleDecoder(ScaleType t, float tensor_scale) : type(t), scale256(_mm256_set1_ps(256.0f * tensor_scale)) {}

  inline __m256 decode(const uint8_t* s) const { return decode(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s))); }

  // The first 4 codes at s, repeated in lanes 4-7 (not code 0: E8M0 code 0 is a subnormal, and a
  // subnormal operand costs a microcode assist on every multiply).
  inline __m256 decode4(const uint8_t* s) const {
    int32_t four;
    std::memcpy(&four, s, 4);
    return decode(_mm_set1_epi32(four));
  }

  // A code of 1.0: the padding of short groups (finite and normal; see decode4).
  uint8_t one() const { return type == ScaleType::kE8M0 ? 127 : 0x38; }

  // The 8 codes in the low bytes of c8.
  inline __m256 decode(__m128i c8) const {
    if (type == ScaleType::kE8M0) {
      const __m256i c = _mm256_cvtepu8_epi32(c8);
      __m256i bits = _mm256_slli_epi32(c, 23);
      bits = _mm256_or_si256(bits, _mm256_cmpeq_epi32(c, _mm256_set1_epi32(255)));  // all ones: NaN
      bits = _mm256_or_si256(bits, _mm256_and_si256(_mm256_cmpeq_epi32(c, _mm256_setzero_si256()),
                                                    _mm256_set1_epi32(0x00400000)));
      return _mm256_castsi256_ps(bits);
    }
    const __m128i c = _mm_cvtepu8_epi16(c8);
    const __m128i mag = _mm_and_si128(c, _mm_set1_epi16(0x7F));
    const __m128i half = _mm_or_si128(_mm_slli_epi16(mag, 7), _mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x80)), 8));
    const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(half), scale256);
    const __m256i nan = _mm256_cvtepi16_epi32(_mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7F)));
    return _mm256_or_ps(v, _mm256_castsi256_ps(nan));
  }
};

inline __m256 two_scales(float low, float high) { return _mm256_set_m128(_mm_set1_ps(high), _mm_set1_ps(low)); }

// Scale vectors of a step: s0 for the "up = 0" vectors (bytes 0-7 | 16-23), s1 for "up = 1"
// (bytes 8-15 | 24-31). BS is 16, 32, or 0 for any block size >= 64.
template <int BS>
inline void step_scales(const float* lut, const uint8_t* s, int64_t step, int64_t bs, __m256& s0, __m256& s1) {
  if (BS == 16) {
    const uint8_t* c = s + 4 * step;
    s0 = two_scales(lut[c[0]], lut[c[2]]);
    s1 = two_scales(lut[c[1]], lut[c[3]]);
  } else if (BS == 32) {
    s0 = s1 = two_scales(lut[s[2 * step]], lut[s[2 * step + 1]]);
  } else {
    s0 = s1 = _mm256_set1_ps(lut[s[(step * kStep) >> __builtin_ctzll(bs)]]);
  }
}


// Block partials of one step: p0 over the up = 0 vectors, p1 over the up = 1 vectors.
inline void step_partials(const __m256 f[8], const float* xs, __m256& p0, __m256& p1) {
  p0 = _mm256_mul_ps(f[0], _mm256_loadu_ps(xs));
  p1 = _mm256_mul_ps(f[2], _mm256_loadu_ps(xs + 16));
  p0 = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xs + 8), p0);
  p1 = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xs + 24), p1);
  p0 = _mm256_fmadd_ps(f[4], _mm256_loadu_ps(xs + 32), p0);
  p1 = _mm256_fmadd_ps(f[6], _mm256_loadu_ps(xs + 48), p1);
  p0 = _mm256_fmadd_ps(f[5], _mm256_loadu_ps(xs + 40), p0);
  p1 = _mm256_fmadd_ps(f[7], _mm256_loadu_ps(xs + 56), p1);
}

template <int BS>
float dot_column(const Decoder& d, const float* xp, const uint8_t* q, const uint8_t* s, const float* lut,
                 int64_t steps, int64_t bs) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t st = 0; st < steps; ++st) {
    __m256 f[8], p0, p1, s0, s1;
    if ((st & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + st * (kStep / 2) + kPrefetch), _MM_HINT_T0);
    d.decode(q + st * (kStep / 2), f);
    step_partials(f, xp + st * kStep, p0, p1);
    step_scales<BS>(lut, s, st, bs, s0, s1);
    acc0 = _mm256_fmadd_ps(p0, s0, acc0);
    acc1 = _mm256_fmadd_ps(p1, s1, acc1);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

// The column's weights times their block scales, as float32 in kPerm order.
template <int BS>
void decode_column(const Decoder& d, const uint8_t* q, const uint8_t* s, const float* lut, int64_t steps,
                   int64_t bs, float* out) {
  for (int64_t st = 0; st < steps; ++st) {
    __m256 f[8], s0, s1;
    d.decode(q + st * (kStep / 2), f);
    step_scales<BS>(lut, s, st, bs, s0, s1);
    for (int v = 0; v < 8; ++v) _mm256_storeu_ps(out + st * kStep + v * 8, _mm256_mul_ps(f[v], (v >> 1) & 1 ? s1 : s0));
  }
}


#ifdef QCN_AVX512
// 512-bit float GEMV (weights x float activations): the same decode on 128 weights (64 code bytes)
// per step. Vector v = nib*4 + up*2 + par, lane L = 4h + j holds byte b = 16h + 8up + 2j + par,
// nibble nib -> k = 2b + nib; 128-bit lane h of the up = 0 vectors is block 2h (BS 16) or h (BS 32),
// of the up = 1 vectors block 2h + 1 or h.
constexpr int64_t kStep512 = 128;

const Perm<16> kPerm512;

struct Decoder512 {
  __m512i byte2, byte3, low_nibble, high_half;
  explicit Decoder512(const Decoder& d)
      : byte2(_mm512_broadcast_i64x4(d.byte2)), byte3(_mm512_broadcast_i64x4(d.byte3)),
        low_nibble(_mm512_set1_epi8(15)), high_half(_mm512_set1_epi32(static_cast<int>(0xFFFF0000u))) {}

  inline void decode(const uint8_t* q, __m512 f[8]) const {
    const __m512i v = _mm512_loadu_si512(q);
    const __m512i nibbles[2] = {_mm512_and_si512(v, low_nibble), _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibble)};
    for (int nib = 0; nib < 2; ++nib) {
      const __m512i lo = _mm512_shuffle_epi8(byte2, nibbles[nib]);
      const __m512i hi = _mm512_shuffle_epi8(byte3, nibbles[nib]);
      const __m512i words[2] = {_mm512_unpacklo_epi8(lo, hi), _mm512_unpackhi_epi8(lo, hi)};
      for (int up = 0; up < 2; ++up) {
        f[nib * 4 + up * 2] = _mm512_castsi512_ps(_mm512_slli_epi32(words[up], 16));
        f[nib * 4 + up * 2 + 1] = _mm512_castsi512_ps(_mm512_and_si512(words[up], high_half));
      }
    }
  }
};

// One step of 128 k: 8 blocks (BS 16) or 4 (BS 32).
template <int BS>
inline void float_step512(const Decoder512& d, const ScaleDecoder& sd, const float* xs, const uint8_t* q,
                          const uint8_t* s, __m512& acc0, __m512& acc1) {
  const __m512 sc = _mm512_castps256_ps512(BS == 16 ? sd.decode(s) : sd.decode4(s));
  __m512 f[8];
  d.decode(q, f);
  __m512 p0 = _mm512_mul_ps(f[0], _mm512_loadu_ps(xs));
  __m512 p1 = _mm512_mul_ps(f[2], _mm512_loadu_ps(xs + 32));
  p0 = _mm512_fmadd_ps(f[1], _mm512_loadu_ps(xs + 16), p0);
  p1 = _mm512_fmadd_ps(f[3], _mm512_loadu_ps(xs + 48), p1);
  p0 = _mm512_fmadd_ps(f[4], _mm512_loadu_ps(xs + 64), p0);
  p1 = _mm512_fmadd_ps(f[6], _mm512_loadu_ps(xs + 96), p1);
  p0 = _mm512_fmadd_ps(f[5], _mm512_loadu_ps(xs + 80), p0);
  p1 = _mm512_fmadd_ps(f[7], _mm512_loadu_ps(xs + 112), p1);
  const __m512i i0 = BS == 16 ? _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6)
                              : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i i1 = BS == 16 ? _mm512_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7) : i0;
  acc0 = _mm512_fmadd_ps(p0, _mm512_permutexvar_ps(i0, sc), acc0);
  acc1 = _mm512_fmadd_ps(p1, _mm512_permutexvar_ps(i1, sc), acc1);
}

template <int BS>
float dot_column512(const Decoder512& d, const ScaleDecoder& sd, const float* xp, const uint8_t* q, const uint8_t* s,
                    int64_t kp) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k0 = 0;
  for (; k0 + kStep512 <= kp; k0 += kStep512) {
    _mm_prefetch(reinterpret_cast<const char*>(q + k0 / 2 + kPrefetchInt), _MM_HINT_T0);
    float_step512<BS>(d, sd, xp + k0, q + k0 / 2, s + k0 / BS, acc0, acc1);
  }
  if (k0 < kp) {  // a last half step (kp is a multiple of 64): zero codes (weight 0) under scale 1.0
    alignas(64) uint8_t qt[kStep512 / 2] = {}, sc[8];
    std::memset(sc, sd.one(), sizeof(sc));
    std::memcpy(qt, q + k0 / 2, static_cast<size_t>((kp - k0) / 2));
    std::memcpy(sc, s + k0 / BS, static_cast<size_t>((kp - k0) / BS));
    float_step512<BS>(d, sd, xp + k0, qt, sc, acc0, acc1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// y[0, :] for one row (BS 16 or 32); xp is permuted per 128 k and zero-padded to kx.
template <int BS>
void gemv512(const Decoder& d256, const float* x, const Fp4Weight& w, float* y) {
  static const Decoder512 d(d256);
  const ScaleDecoder sd(w.scale_type, w.tensor_scale);
  const int64_t kp = padded_k(w.k, w.block_size), kx = (kp + kStep512 - 1) / kStep512 * kStep512, nb = kp / BS;
  std::vector<float> xp(static_cast<size_t>(kx));
  permute_x(kPerm512, x, w.k, kx, xp.data());
  for (int64_t n = 0; n < w.n; ++n) y[n] = dot_column512<BS>(d, sd, xp.data(), w.codes + n * (kp / 2), w.scales + n * nb, kp);
}
#endif  // QCN_AVX512

void gemm_float(const float* x, int64_t m, const Fp4Weight& w, float* y);

template <int BS>
void matmul_avx2(const float* x, int64_t m, const Fp4Weight& w, float* y) {
  static const Decoder d;
#ifdef QCN_AVX512
  if (BS != 0 && m < kTileRows) {
    for (int64_t r = 0; r < m; ++r) gemv512<BS == 0 ? 16 : BS>(d, x + r * w.k, w, y + r * w.n);
    return;
  }
#endif
  if (m >= kFloatGemmMinRows) return gemm_float(x, m, w, y);
  const int64_t kp = padded_k(w.k, w.block_size), steps = kp / kStep, nb = kp / w.block_size;
  std::vector<float> xp(static_cast<size_t>(m * kp));
  for (int64_t r = 0; r < m; ++r) permute_x(kPerm, x + r * w.k, w.k, kp, xp.data() + r * kp);
  if (m < kTileRows) {
    for (int64_t r = 0; r < m; ++r)
      for (int64_t n = 0; n < w.n; ++n)
        y[r * w.n + n] = dot_column<BS>(d, xp.data() + r * kp, w.codes + n * (kp / 2), w.scales + n * nb,
                                        w.scale_lut, steps, w.block_size);
    return;
  }
  std::vector<float> tile(static_cast<size_t>(kTileCols * kp));
  for (int64_t n0 = 0; n0 < w.n; n0 += kTileCols) {
    const int64_t cols = std::min(kTileCols, w.n - n0);
    for (int64_t c = 0; c < cols; ++c)
      decode_column<BS>(d, w.codes + (n0 + c) * (kp / 2), w.scales + (n0 + c) * nb, w.scale_lut, steps,
                        w.block_size, tile.data() + c * kp);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < cols; ++c) y[r * w.n + n0 + c] = dot(xp.data() + r * kp, tile.data() + c * kp, kp);
  }
}

// One whole activation block (bs = 16 or 32): q[i] = e2m1(x[i] / d) (signed grid values), returns
// d (see block_e2m1). x / X for MX is x * (1 / X): X is a power of two whose reciprocal is exact, so
// both are the same correctly rounded quotient.
float block_e2m1_avx2(ActQuant act, const float* x, int64_t bs, float tensor_scale, float* q) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i max_finite = _mm256_set1_epi32(0x7F7FFFFF);
  __m256 amax = _mm256_setzero_ps();
  __m256i nonfinite = _mm256_setzero_si256();
  for (int64_t i = 0; i < bs; i += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask);
    nonfinite = _mm256_or_si256(nonfinite, _mm256_cmpgt_epi32(_mm256_castps_si256(a), max_finite));
    amax = _mm256_max_ps(amax, a);
  }
  const bool finite = _mm256_testz_si256(nonfinite, nonfinite);
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float d = block_scale(act, _mm_cvtss_f32(m4), finite, tensor_scale);
  if (act == ActQuant::kNvfp4 && d == 0.0f) {
    for (int64_t i = 0; i < bs; i += 8) _mm256_storeu_ps(q + i, _mm256_setzero_ps());
    return d;
  }
  const bool mx = act == ActQuant::kMxfp4;
  const __m256 dv = _mm256_set1_ps(d), inv = _mm256_set1_ps(1.0f / d);
  const __m256 two = _mm256_set1_ps(2.0f), four = _mm256_set1_ps(4.0f), six = _mm256_set1_ps(6.0f);
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
  for (int64_t i = 0; i < bs; i += 8) {
    const __m256 v = mx ? _mm256_mul_ps(_mm256_loadu_ps(x + i), inv) : _mm256_div_ps(_mm256_loadu_ps(x + i), dv);
    // |v| saturated to 6 (min_ps returns 6 for NaN; such a block has d = NaN and stays NaN).
    const __m256 a = _mm256_min_ps(_mm256_and_ps(v, abs_mask), six);
    const __m256 ge2 = _mm256_cmp_ps(a, two, _CMP_GE_OQ), ge4 = _mm256_cmp_ps(a, four, _CMP_GE_OQ);
    // grid step 0.5 below 2, 1 in [2, 4), 2 from 4 on: q = rint(a / step) * step, exact.
    const __m256 step = _mm256_blendv_ps(_mm256_blendv_ps(half, one, ge2), two, ge4);
    const __m256 rstep = _mm256_blendv_ps(_mm256_blendv_ps(two, one, ge2), half, ge4);
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(a, rstep), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_ps(q + i, _mm256_or_ps(_mm256_mul_ps(r, step), _mm256_and_ps(v, sign_mask)));
  }
  return d;
}

// --- integer path (act = mxfp4 / nvfp4) ---------------------------------------------------------
// With both operands E2M1, 2 * e2m1 is an integer in [-12, 12], so a block's dot product is exact
// in int32: y = sum_lanes (sum_k 2w * 2x) * s_w * (d_x / 4). The weight nibble becomes the unsigned
// byte u = 2w + 12 (one vpshufb), the activation the signed byte 2x, and vpdpbusd (or
// vpmaddubsw + vpmaddwd; |pair| <= 2 * 24 * 12, no saturation) sums u * 2x over 4 bytes per int32
// lane; the offset 12 * sum(2x) of each lane is precomputed per row and subtracted.
// Activation layout per 64-k step: 32 codes of the even k, then 32 of the odd k, matching the low
// and high nibbles of the 32 weight bytes; int32 lane j of a step then covers k = 8j .. 8j + 7.

struct IntDecoder {
  __m256i offset_lut, low_nibble;
#ifndef QCN_VNNI
  __m256i ones16;
#endif
#ifdef QCN_AVX512
  __m512i offset_lut512, low_nibble512;
#endif
  IntDecoder() {
    alignas(32) uint8_t u[32];
    for (int i = 0; i < 32; ++i) u[i] = static_cast<uint8_t>(static_cast<int>(2.0f * kE2M1[i & 15]) + 12);
    offset_lut = _mm256_load_si256(reinterpret_cast<const __m256i*>(u));
    low_nibble = _mm256_set1_epi8(15);
#ifndef QCN_VNNI
    ones16 = _mm256_set1_epi16(1);
#endif
#ifdef QCN_AVX512
    offset_lut512 = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(u)));
    low_nibble512 = _mm512_set1_epi8(15);
#endif
  }

#ifdef QCN_AVX512
  // 128 k at once: 64 code bytes; x holds 64 even-k codes, then 64 odd-k codes.
  inline void weights512(const uint8_t* q, __m512i& lo, __m512i& hi) const { weights512(_mm512_loadu_si512(q), lo, hi); }
  inline void weights512(__m512i v, __m512i& lo, __m512i& hi) const {
    lo = _mm512_shuffle_epi8(offset_lut512, _mm512_and_si512(v, low_nibble512));
    hi = _mm512_shuffle_epi8(offset_lut512, _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibble512));
  }

  // The 8 sums of int32 lane pairs, i.e. of k = 16p .. 16p + 15 for p = 0..7, in order.
  inline __m256i pair_sums512(__m512i lo, __m512i hi, const int8_t* xc) const {
    __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xc));
    i = _mm512_dpbusd_epi32(i, hi, _mm512_loadu_si512(xc + 64));
    return _mm512_cvtepi64_epi32(_mm512_add_epi32(i, _mm512_srli_epi64(i, 32)));  // low half of each qword
  }
#endif

  // The unsigned bytes 2w + 12 of the 64 weights whose 32 code bytes are at q: even k, odd k.
  inline void weights(const uint8_t* q, __m256i& lo, __m256i& hi) const {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    lo = _mm256_shuffle_epi8(offset_lut, _mm256_and_si256(v, low_nibble));
    hi = _mm256_shuffle_epi8(offset_lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibble));
  }

  // int32 lanes sum_{k in lane} (2w + 12) * 2x of one step of decoded weights.
  inline __m256i dot(__m256i lo, __m256i hi, const int8_t* xc) const {
    const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc));
    const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + 32));
#ifdef QCN_VNNI
    return QCN_DPBUSD(QCN_DPBUSD(_mm256_setzero_si256(), lo, xe), hi, xo);
#else
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo)), ones16);
#endif
  }

  inline __m256i step(const uint8_t* q, const int8_t* xc) const {
    __m256i lo, hi;
    weights(q, lo, hi);
    return dot(lo, hi, xc);
  }
};

// Weight block scales of the 8 int32 lanes of a step (lane j: k = 8j .. 8j + 7).
template <int BS>
inline __m256 lane_scales(const float* lut, const uint8_t* s, int64_t step, int64_t bs) {
  if (BS == 16) {
    const uint8_t* c = s + 4 * step;
    const float a = lut[c[0]], b = lut[c[1]], e = lut[c[2]], f = lut[c[3]];
    return _mm256_setr_ps(a, a, b, b, e, e, f, f);
  }
  if (BS == 32) return two_scales(lut[s[2 * step]], lut[s[2 * step + 1]]);
  return _mm256_set1_ps(lut[s[(step * kStep) >> __builtin_ctzll(bs)]]);  // bs: a power of two >= 64
}

// One row of x quantized for the integer path, in groups of `group` consecutive k: 8 (one int32
// lane) or the block size when the weight's blocks and x's coincide.
struct ActRow {
  const int8_t* codes;    // [kx]: per step 32 even-k codes 2 * e2m1, then 32 odd-k codes (0 past k)
  const int32_t* offset;  // [kx / group]: 12 * sum of the group's codes
  const float* scale;     // [kx / group]: d / 4 of the group's block (0 past the last block)
};

// One step's contribution to acc, per lane: the exact int32 sums times s_w * d_x / 4.
template <int BS>
inline __m256 lane_step(const IntDecoder& d, const ActRow& x, const uint8_t* q, const uint8_t* s, const float* lut,
                        int64_t st, int64_t bs, __m256 acc) {
  __m256i i = d.step(q + st * (kStep / 2), x.codes + st * kStep);
  i = _mm256_sub_epi32(i, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.offset + st * 8)));
  const __m256 sc = _mm256_mul_ps(lane_scales<BS>(lut, s, st, bs), _mm256_loadu_ps(x.scale + st * 8));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), sc, acc);
}

// Any weight block size (BS = 16, 32, or 0 for >= 64) with x in groups of 8.
template <int BS>
float lane_dot_column(const IntDecoder& d, const ActRow& x, const uint8_t* q, const uint8_t* s, const float* lut,
                      int64_t steps, int64_t bs) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  // two chains hide the FMA latency
  int64_t st = 0;
  for (; st + 1 < steps; st += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(q + st * (kStep / 2) + kPrefetch), _MM_HINT_T0);
    acc0 = lane_step<BS>(d, x, q, s, lut, st, bs, acc0);
    acc1 = lane_step<BS>(d, x, q, s, lut, st + 1, bs, acc1);
  }
  if (st < steps) acc0 = lane_step<BS>(d, x, q, s, lut, st, bs, acc0);
  return hsum(_mm256_add_ps(acc0, acc1));
}

// A group: kBlocks blocks of BS (16 or 32) k, 8 (4 for BS 32 on AVX-512: one 512-bit vector, so K
// multiples of 128 need no short last group). Its weights are decoded once and dotted with the
// codes of R rows (x in groups of BS); the lane sums are added per block (lane-pair sums or vphaddd,
// then back to block order), minus the rows' offsets, times the weight scales and the rows' block
// scales (lanes 4-7 of a 4-block group see x scale 0).
#ifdef QCN_AVX512
constexpr int64_t kGroupVecBytes = 64;  // code bytes per vector
#else
constexpr int64_t kGroupVecBytes = 32;
#endif
template <int BS>
struct Group {
#ifdef QCN_AVX512
  static constexpr int kBlocks = BS == 32 ? 4 : 8;
#else
  static constexpr int kBlocks = 8;
#endif
  static constexpr int kVecs = static_cast<int>(kBlocks * BS / 2 / kGroupVecBytes);
#ifdef QCN_AVX512
  __m512i lo[kVecs], hi[kVecs];
#else
  __m256i lo[kVecs], hi[kVecs];
#endif
  __m256 ws;  // weight scales of the blocks

  // The whole group at q (code bytes) and s (kBlocks scale codes).
  inline void load(const IntDecoder& d, const ScaleDecoder& sd, const uint8_t* q, const uint8_t* s) {
    for (int v = 0; v < kVecs; ++v) decode(d, q + v * kGroupVecBytes, v);
    ws = kBlocks == 8 ? sd.decode(s) : sd.decode4(s);
  }

  // A short last group: `bytes` valid code bytes (a multiple of 32) and `count` scale codes; the
  // rest reads as weight code 0 under scale 1.0, adding 0.
  inline void load_tail(const IntDecoder& d, const ScaleDecoder& sd, const uint8_t* q, const uint8_t* s,
                        int64_t bytes, int64_t count) {
#ifdef QCN_AVX512  // masked loads: no fault and zeros past the valid bytes
    for (int v = 0; v < kVecs; ++v) {
      const int64_t n = std::min<int64_t>(64, std::max<int64_t>(0, bytes - v * 64));
      const __mmask64 mask = n == 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
      d.weights512(_mm512_maskz_loadu_epi8(mask, q + v * 64), lo[v], hi[v]);
    }
    ws = sd.decode(_mm_mask_loadu_epi8(_mm_set1_epi8(static_cast<char>(sd.one())),
                                       static_cast<__mmask16>((1u << count) - 1), s));
#else
    alignas(64) uint8_t codes[kVecs * kGroupVecBytes] = {}, scales[8];
    std::memset(scales, sd.one(), sizeof(scales));
    std::memcpy(codes, q, static_cast<size_t>(bytes));
    std::memcpy(scales, s, static_cast<size_t>(count));
    load(d, sd, codes, scales);
#endif
  }

  inline void decode(const IntDecoder& d, const uint8_t* p, int v) {
#ifdef QCN_AVX512
    d.weights512(p, lo[v], hi[v]);
#else
    d.weights(p, lo[v], hi[v]);
#endif
  }

  // The exact block sums of one row (codes at xc), in block order.
  inline __m256i sums(const IntDecoder& d, const int8_t* xc) const {
    __m256i h;
#ifdef QCN_AVX512
    if (BS == 16) {  // one 128-k vector: its lane pairs are the blocks
      h = d.pair_sums512(lo[0], hi[0], xc);
    } else {  // one 128-k vector, 2 pairs per block: blocks 0 1 0 1 | 2 3 2 3, to 0 1 2 3 in lanes 0-3
      const __m256i p = d.pair_sums512(lo[0], hi[0], xc);
      h = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(p, p), _mm256_setr_epi32(0, 1, 4, 5, 0, 1, 4, 5));
    }
#else
    if (BS == 16) {  // 2 steps, 4 blocks each (2 lanes per block): blocks 0 1 4 5 | 2 3 6 7
      h = _mm256_hadd_epi32(d.dot(lo[0], hi[0], xc), d.dot(lo[1], hi[1], xc + 64));
      h = _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
    } else {  // 4 steps, 2 blocks each (4 lanes per block): blocks 0 2 4 6 | 1 3 5 7
      const __m256i h01 = _mm256_hadd_epi32(d.dot(lo[0], hi[0], xc), d.dot(lo[1], hi[1], xc + 64));
      const __m256i h23 = _mm256_hadd_epi32(d.dot(lo[2], hi[2], xc + 128), d.dot(lo[3], hi[3], xc + 192));
      h = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(h01, h23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    }
#endif
    return h;
  }

  // acc += this group's contribution for one row (its codes, offsets and scales at the group).
  inline __m256 row(const IntDecoder& d, const int8_t* xc, const int32_t* xo, const float* xs, __m256 acc) const {
    const __m256i o = kBlocks == 8 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xo))
                                   : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xo)));
    const __m256 sx = kBlocks == 8 ? _mm256_loadu_ps(xs) : _mm256_zextps128_ps256(_mm_loadu_ps(xs));
    const __m256i h = _mm256_sub_epi32(sums(d, xc), o);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(ws, sx), acc);
  }
};

// y[r * ldy] for R consecutive rows of x (row r at x.codes + r * kx, x.offset / x.scale + r * kx / BS)
// and one weight column (kp / 2 code bytes at q, kp / BS scale codes at s).
template <int BS, int R>
void block_dot_rows(const IntDecoder& d, const ScaleDecoder& sd, const ActRow& x, int64_t kx, const uint8_t* q,
                    const uint8_t* s, int64_t kp, float* y, int64_t ldy) {
  constexpr int64_t kBlocks = Group<BS>::kBlocks, kGroupK = kBlocks * BS;
  const int64_t groups = kx / BS;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  Group<BS> g;
  int64_t k0 = 0, b = 0;
  for (; k0 + kGroupK <= kp; k0 += kGroupK, b += kBlocks) {
    for (int64_t line = 0; line < kGroupK / 2; line += 64)  // every cache line of the group
      _mm_prefetch(reinterpret_cast<const char*>(q + k0 / 2 + line + kPrefetchInt), _MM_HINT_T0);
    g.load(d, sd, q + k0 / 2, s + b);
    for (int r = 0; r < R; ++r)
      acc[r] = g.row(d, x.codes + r * kx + k0, x.offset + r * groups + b, x.scale + r * groups + b, acc[r]);
  }
  if (k0 < kp) {
    g.load_tail(d, sd, q + k0 / 2, s + b, (kp - k0) / 2, (kp - k0) / BS);
    for (int r = 0; r < R; ++r)
      acc[r] = g.row(d, x.codes + r * kx + k0, x.offset + r * groups + b, x.scale + r * groups + b, acc[r]);
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = hsum(acc[r]);
}

float block_e2m1(ActQuant act, const float* x, int64_t len, int64_t bs, float tensor_scale, float* q);

// Quantizes the rows of x (length k) into kx codes (per `chunk` k: the even-k codes, then the
// odd-k ones) and kx / group offsets and scales per row.
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t kx, int64_t chunk, int64_t group, ActQuant act,
                   float tensor_scale, int8_t* codes, int32_t* offset, float* scale) {
  const int64_t bs = act_block_size(act), groups = kx / group;
  std::vector<float> q(static_cast<size_t>(kx));
  for (int64_t r = 0; r < m; ++r) {
    int8_t* c = codes + r * kx;
    int32_t* o = offset + r * groups;
    float* sc = scale + r * groups;
    std::fill(q.begin() + k, q.end(), 0.0f);
    std::fill(sc, sc + groups, 0.0f);
    for (int64_t k0 = 0; k0 < k; k0 += bs) {
      const int64_t len = std::min(bs, k - k0);
      float dk = block_e2m1(act, x + r * k + k0, len, bs, tensor_scale, q.data() + k0);
      // An all-zero block adds 0 under any finite scale: 0 spares the products a subnormal operand
      // (MX gives a zero block 2**-127), which costs a microcode assist per multiply.
      if (std::all_of(q.data() + k0, q.data() + k0 + len, [](float v) { return v == 0.0f; }) && !std::isnan(dk))
        dk = 0.0f;
      // (2w)(2x) = 4wx: the 1/4 (exact, a power of two) goes here so no partial sum overflows early
      std::fill(sc + k0 / group, sc + std::min(groups, (k0 + bs) / group), dk * 0.25f);
    }
    for (int64_t base = 0; base < kx; base += chunk)
      for (int64_t i = 0; i < chunk / 2; ++i) {
        c[base + i] = static_cast<int8_t>(2.0f * q[base + 2 * i]);
        c[base + chunk / 2 + i] = static_cast<int8_t>(2.0f * q[base + 2 * i + 1]);
      }
    for (int64_t j = 0; j < groups; ++j) {
      int32_t sum = 0;
      for (int64_t t = 0; t < group; ++t) sum += static_cast<int32_t>(2.0f * q[group * j + t]);
      o[j] = 12 * sum;
    }
  }
}

// --- GEMM paths: rows in the vector lanes -------------------------------------------------------
// From kGemmMinRows (W4A4) / kFloatGemmMinRows (float activations) rows on, one vector holds one
// value of each of kPanel rows (16 on AVX-512 builds, 8 on AVX2 ones), so a broadcast weight (one
// float, or one dword of 4 weight bytes) times one vector load updates every row's lane with no
// horizontal sums, and each weight column is decoded once per call. Both widths run the same
// operations per lane in the same order: every AVX build computes the same bits here.
#ifdef QCN_AVX512
struct Lanes {  // 16 lanes of 512 bits
  using F = __m512;
  using I = __m512i;
  static constexpr int kWidth = 16;
  static constexpr int kIntCols = 8;    // 8 vpdpbusd chains + 8 float accumulators hide the latencies
  static constexpr int kFloatCols = 8;  // 2 panels x 8 columns: 16 FMA accumulators
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F bytes(const uint8_t* p) {  // kWidth unsigned bytes as floats
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static I izero() { return _mm512_setzero_si512(); }
  static I iload(const void* p) { return _mm512_loadu_si512(p); }
  static I iset1(int32_t v) { return _mm512_set1_epi32(v); }
  // acc + per 32-bit lane the 4 products u8(w) * s8(x); finish: the int32 lane sums
  static I dot4(I acc, I w, I x) { return _mm512_dpbusd_epi32(acc, w, x); }
  static I finish(I acc) { return acc; }
  static F minus_to_float(I a, I b) { return _mm512_cvtepi32_ps(_mm512_sub_epi32(a, b)); }
};
#else
struct Lanes {  // 8 lanes of 256 bits (16 registers)
  using F = __m256;
  using I = __m256i;
  static constexpr int kWidth = 8;
  static constexpr int kIntCols = 4;    // measured: 4 (13 registers) ~ 5, ahead of 3 and 6
  static constexpr int kFloatCols = 6;  // 2 panels x 6: 12 accumulators + 2 rows + 1 broadcast (measured: 4-7)
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F bytes(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static I izero() { return _mm256_setzero_si256(); }
  static I iload(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I iset1(int32_t v) { return _mm256_set1_epi32(v); }
#ifdef QCN_VNNI
  static I dot4(I acc, I w, I x) { return QCN_DPBUSD(acc, w, x); }
  static I finish(I acc) { return acc; }
#else
  // Without VNNI: vpmaddubsw adds each pair u * x + u' * x' in int16, then the block's pairs are
  // added in int16 and vpmaddwd widens once per block. |pair| <= 2 * 24 * 12 = 576 and a block
  // has at most 32 / 4 = 8 pairs per lane: |sum| <= 4608 < 2**15, so nothing saturates or wraps.
  static I dot4(I acc, I w, I x) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x)); }
  static I finish(I acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
#endif
  static F minus_to_float(I a, I b) { return _mm256_cvtepi32_ps(_mm256_sub_epi32(a, b)); }
};
#endif
constexpr int64_t kPanel = Lanes::kWidth;
// W4A4: from half a panel on this beats the 4-row blocks (measured: 8 rows on AVX-512, 1.5x there;
// 4 on AVX2, 2.4x at 6 rows)
constexpr int64_t kGemmMinRows = kPanel / 2;

// --- W4A4 GEMM (coinciding blocks) ---------------------------------------------------------------
// x is packed per panel of kPanel rows as [k / 4][row][4 bytes] (natural k order), so one
// dot4 of a broadcast weight dword (4 consecutive k of one column, as u8 2w + 12) adds 4 products
// to every row's lane: per (block, column) the lanes are offset-corrected, converted and scaled
// once. Columns are decoded to such bytes once per tile of kIntCols.

// The u8 bytes 2w + 12 of kp weights (kp / 2 code bytes at q), in natural k order.
void decode_natural(const IntDecoder& d, const uint8_t* q, int64_t kp, uint8_t* out) {
  for (int64_t k = 0; k < kp; k += kStep) {
    __m256i lo, hi;
    d.weights(q + k / 2, lo, hi);  // k even | k odd, per byte
    const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);  // k 0-15|32-47, 16-31|48-63
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm256_permute2x128_si256(a, b, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k + 32), _mm256_permute2x128_si256(a, b, 0x31));
  }
}

// out[c][r] = row r of the panel times column c, for C columns of decoded weights w[c] (nblocks
// blocks of BS) with block scales ws[c].
template <int BS, int C>
void gemm_panel(const int8_t* xc, const int32_t* xo, const float* xs, const uint8_t* const* w,
                const float* const* ws, int64_t nblocks, float (*out)[kPanel]) {
  using L = Lanes;
  L::F acc[C];
  for (int c = 0; c < C; ++c) acc[c] = L::zero();
  for (int64_t b = 0; b < nblocks; ++b) {
    L::I sums[C];
    for (int c = 0; c < C; ++c) sums[c] = L::izero();
    for (int t = 0; t < BS / 4; ++t) {
      const L::I xv = L::iload(xc + (b * (BS / 4) + t) * kPanel * 4);
      for (int c = 0; c < C; ++c) {
        int32_t dword;
        std::memcpy(&dword, w[c] + b * BS + 4 * t, 4);
        sums[c] = L::dot4(sums[c], L::iset1(dword), xv);
      }
    }
    const L::I offset = L::iload(xo + b * kPanel);
    const L::F sx = L::load(xs + b * kPanel);
    for (int c = 0; c < C; ++c)
      acc[c] = L::fma(L::minus_to_float(L::finish(sums[c]), offset), L::mul(L::set1(ws[c][b]), sx), acc[c]);
  }
  for (int c = 0; c < C; ++c) L::store(out[c], acc[c]);
}

// y = fq(x) @ W for m >= kGemmMinRows; x's rows quantized as in quantize_rows (natural order, group BS).
template <int BS>
void gemm_int(const IntDecoder& d, const ScaleDecoder& sd, const int8_t* codes, const int32_t* offset,
              const float* scale, int64_t m, int64_t kx, const Fp4Weight& w, float* y) {
  constexpr int kCols = Lanes::kIntCols;
  const int64_t kp = padded_k(w.k, w.block_size), nb = kp / BS, panels = (m + kPanel - 1) / kPanel;
  // Pack: panel p, k / 4 = j, row r: 4 codes; offsets and scales [block][row]; rows past m are 0.
  std::vector<int8_t> xc(static_cast<size_t>(panels * kp * kPanel), 0);
  std::vector<int32_t> xo(static_cast<size_t>(panels * nb * kPanel), 0);
  std::vector<float> xs(static_cast<size_t>(panels * nb * kPanel), 0.0f);
  for (int64_t r = 0; r < m; ++r) {
    const int64_t p = r / kPanel, lane = r % kPanel;
    for (int64_t j = 0; j < kp / 4; ++j)
      std::memcpy(&xc[((p * (kp / 4) + j) * kPanel + lane) * 4], codes + r * kx + 4 * j, 4);
    for (int64_t b = 0; b < nb; ++b) {
      xo[(p * nb + b) * kPanel + lane] = offset[r * (kx / BS) + b];
      xs[(p * nb + b) * kPanel + lane] = scale[r * (kx / BS) + b];
    }
  }
  std::vector<uint8_t> wdec(static_cast<size_t>(kCols * kp));
  std::vector<float> wsc(static_cast<size_t>(kCols * nb));
  float out[kCols][kPanel];
  for (int64_t n0 = 0; n0 < w.n; n0 += kCols) {
    const int cols = static_cast<int>(std::min<int64_t>(kCols, w.n - n0));
    const uint8_t* wp[kCols];
    const float* sp[kCols];
    for (int c = 0; c < cols; ++c) {
      decode_natural(d, w.codes + (n0 + c) * (kp / 2), kp, &wdec[c * kp]);
      const uint8_t* s = w.scales + (n0 + c) * nb;
      int64_t b = 0;
      for (; b + 8 <= nb; b += 8) _mm256_storeu_ps(&wsc[c * nb + b], sd.decode(s + b));
      for (; b < nb; ++b) wsc[c * nb + b] = w.scale_lut[s[b]];
      wp[c] = &wdec[c * kp];
      sp[c] = &wsc[c * nb];
    }
    for (int64_t p = 0; p < panels; ++p) {
      const int8_t* pc = &xc[p * (kp / 4) * kPanel * 4];
      const int32_t* po = &xo[p * nb * kPanel];
      const float* ps = &xs[p * nb * kPanel];
      if (cols == kCols) {
        gemm_panel<BS, kCols>(pc, po, ps, wp, sp, nb, out);
      } else {
        for (int c = 0; c < cols; ++c) gemm_panel<BS, 1>(pc, po, ps, wp + c, sp + c, nb, out + c);
      }
      for (int64_t r = p * kPanel; r < std::min(m, (p + 1) * kPanel); ++r)
        for (int c = 0; c < cols; ++c) y[r * w.n + n0 + c] = out[c][r - p * kPanel];
    }
  }
}

// --- float GEMM (weights x float activations) ----------------------------------------------------
// The same layout in float: x packed per panel as [k][kPanel rows], each column decoded once per
// tile to float32 w * s in natural k order, and one FMA of a broadcast weight per (k, column,
// panel). Two panels share each broadcast: FMA-bound.

// x rows r0 .. r0 + kPanel (those < m) as [kp][kPanel], zero past k and m.
void pack_panel(const float* x, int64_t m, int64_t k, int64_t kp, int64_t r0, float* out) {
  std::fill(out, out + kp * kPanel, 0.0f);
  for (int64_t r = r0; r < std::min(m, r0 + kPanel); ++r)
    for (int64_t j = 0; j < k; ++j) out[j * kPanel + (r - r0)] = x[r * k + j];
}

template <int P, int C>
void gemm_float_panels(const float* xp, int64_t kp, const float* const* w, float (*out)[C][kPanel]) {
  using L = Lanes;
  L::F acc[P][C];
  for (int p = 0; p < P; ++p)
    for (int c = 0; c < C; ++c) acc[p][c] = L::zero();
  for (int64_t j = 0; j < kp; ++j) {
    L::F xv[P];
    for (int p = 0; p < P; ++p) xv[p] = L::load(xp + (p * kp + j) * kPanel);
    for (int c = 0; c < C; ++c) {
      const L::F wv = L::set1(w[c][j]);
      for (int p = 0; p < P; ++p) acc[p][c] = L::fma(wv, xv[p], acc[p][c]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int c = 0; c < C; ++c) L::store(out[p][c], acc[p][c]);
}

}  // namespace

void gemm_float_columns(const float* x, int64_t m, int64_t k, int64_t kp, int64_t n,
                        const std::function<void(int64_t, float*)>& decode, float* y) {
  constexpr int kCols = Lanes::kFloatCols;
  const int64_t panels = (m + kPanel - 1) / kPanel;
  std::vector<float> xp(static_cast<size_t>(panels * kp * kPanel));
  for (int64_t p = 0; p < panels; ++p) pack_panel(x, m, k, kp, p * kPanel, &xp[p * kp * kPanel]);
  std::vector<float> wf(static_cast<size_t>(kCols * kp));
  float out[2][kCols][kPanel];
  for (int64_t n0 = 0; n0 < n; n0 += kCols) {
    const int cols = static_cast<int>(std::min<int64_t>(kCols, n - n0));
    const float* wp[kCols];
    for (int c = 0; c < cols; ++c) {
      decode(n0 + c, &wf[c * kp]);
      wp[c] = &wf[c * kp];
    }
    for (int64_t p = 0; p < panels; p += 2) {
      const int np = static_cast<int>(std::min<int64_t>(2, panels - p));
      const float* pp = &xp[p * kp * kPanel];
      if (cols == kCols && np == 2) {
        gemm_float_panels<2, kCols>(pp, kp, wp, out);
      } else if (cols == kCols) {
        gemm_float_panels<1, kCols>(pp, kp, wp, out);
      } else {
        for (int q = 0; q < np; ++q)
          for (int c = 0; c < cols; ++c) {
            float one[1][1][kPanel];
            gemm_float_panels<1, 1>(pp + q * kp * kPanel, kp, wp + c, one);
            std::copy(one[0][0], one[0][0] + kPanel, out[q][c]);
          }
      }
      for (int q = 0; q < np; ++q)
        for (int64_t r = (p + q) * kPanel; r < std::min(m, (p + q + 1) * kPanel); ++r)
          for (int c = 0; c < cols; ++c) y[r * n + n0 + c] = out[q][c][r - (p + q) * kPanel];
    }
  }
}

namespace {

void gemm_float(const float* x, int64_t m, const Fp4Weight& w, float* y) {
  static const IntDecoder d;
  const int64_t kp = padded_k(w.k, w.block_size);
  std::vector<uint8_t> bytes(static_cast<size_t>(kp));
  const Lanes::F twelve = Lanes::set1(12.0f);
  gemm_float_columns(x, m, w.k, kp, w.n, [&](int64_t n, float* dst) {
    // w * s = (u - 12) * (s / 2), u = 2w + 12: one rounding, as the table's
    decode_natural(d, w.codes + n * (kp / 2), kp, bytes.data());
    const uint8_t* s = w.scales + n * (kp / w.block_size);
    for (int64_t j = 0; j < kp; j += kPanel)  // a block (>= 16) holds whole vectors
      Lanes::store(dst + j, Lanes::mul(Lanes::sub(Lanes::bytes(&bytes[j]), twelve),
                                       Lanes::set1(0.5f * w.scale_lut[s[j / w.block_size]])));
  }, y);
}

template <int BS>
void matmul_int(const float* x, int64_t m, const Fp4Weight& w, ActQuant act, float act_scale, float* y) {
  static const IntDecoder d;
  const ScaleDecoder sd(w.scale_type, w.tensor_scale);
  const int64_t kp = padded_k(w.k, w.block_size), steps = kp / kStep, nb = kp / w.block_size;
  const bool blocks = BS != 0 && act_block_size(act) == BS;  // one scale pair per block
  const int64_t group = blocks ? BS : 8, kx = blocks ? (kp + 8 * BS - 1) / (8 * BS) * (8 * BS) : kp;
  std::vector<int8_t> codes(static_cast<size_t>(m * kx));
  std::vector<int32_t> offset(static_cast<size_t>(m * kx / group));
  std::vector<float> scale(static_cast<size_t>(m * kx / group));
  const bool gemm = blocks && m >= kGemmMinRows;
  // the GEMM packs natural k order (chunks of 2: one even k, one odd); the block path reads 128 k
  // per 512-bit step on AVX-512 builds
  const int64_t chunk = gemm ? 2 : blocks && Lanes::kWidth == 16 ? 2 * kStep : kStep;
  quantize_rows(x, m, w.k, kx, chunk, group, act, act_scale, codes.data(), offset.data(), scale.data());
  if (gemm) return gemm_int<BS == 0 ? 16 : BS>(d, sd, codes.data(), offset.data(), scale.data(), m, kx, w, y);
  std::vector<ActRow> rows(static_cast<size_t>(m));
  for (int64_t r = 0; r < m; ++r) rows[r] = {codes.data() + r * kx, offset.data() + r * kx / group, scale.data() + r * kx / group};
  // Column tiles stay in cache while every row passes over them; with coinciding blocks, each
  // column's weights are decoded once per kRowBlock rows.
  constexpr int kRowBlock = 4;
  const int64_t tile = m < kTileRows ? w.n : kTileCols;
  for (int64_t n0 = 0; n0 < w.n; n0 += tile) {
    const int64_t n1 = std::min(w.n, n0 + tile);
    if (blocks) {
      constexpr int B = BS == 0 ? 16 : BS;
      int64_t r = 0;
      for (; r + kRowBlock <= m; r += kRowBlock)
        for (int64_t n = n0; n < n1; ++n)
          block_dot_rows<B, kRowBlock>(d, sd, rows[r], kx, w.codes + n * (kp / 2), w.scales + n * nb, kp,
                                       y + r * w.n + n, w.n);
      for (; r < m; ++r)
        for (int64_t n = n0; n < n1; ++n)
          block_dot_rows<B, 1>(d, sd, rows[r], kx, w.codes + n * (kp / 2), w.scales + n * nb, kp, y + r * w.n + n, w.n);
      continue;
    }
    for (int64_t r = 0; r < m; ++r)
      for (int64_t n = n0; n < n1; ++n)
        y[r * w.n + n] = lane_dot_column<BS>(d, rows[r], w.codes + n * (kp / 2), w.scales + n * nb, w.scale_lut,
                                             steps, w.block_size);
  }
}

#endif  // QCN_AVX2

// q[i] = e2m1(x[i] / d) for the len <= bs values of one activation block (a short last block is
// zero-padded, which changes no amax); returns d. nvfp4 with d == 0: q = +0.
float block_e2m1(ActQuant act, const float* x, int64_t len, int64_t bs, float tensor_scale, float* q) {
#ifdef QCN_AVX2
  if (len == bs) return block_e2m1_avx2(act, x, bs, tensor_scale, q);  // same values as below
#else
  (void)bs;
#endif
  float amax;
  const bool finite = block_amax(x, len, amax);
  const float d = block_scale(act, amax, finite, tensor_scale);
  for (int64_t i = 0; i < len; ++i) q[i] = act == ActQuant::kNvfp4 && d == 0.0f ? 0.0f : round_e2m1(x[i] / d);
  return d;
}

}  // namespace

int64_t padded_k(int64_t k, int64_t block_size) {
  const int64_t unit = std::max<int64_t>(64, block_size);
  return (k + unit - 1) / unit * unit;
}

void build_scale_lut(ScaleType type, float tensor_scale, float* lut) {
  for (int c = 0; c < 256; ++c) {
    const uint8_t code = static_cast<uint8_t>(c);
    lut[c] = type == ScaleType::kE8M0 ? decode_e8m0(code) : decode_e4m3fn(code) * tensor_scale;
  }
}

int64_t act_block_size(ActQuant act) {
  return act == ActQuant::kMxfp4 ? 32 : act == ActQuant::kNvfp4 ? 16 : 0;
}

void fake_quant_act(const float* x, int64_t m, int64_t k, ActQuant act, float tensor_scale, float* out) {
  if (act == ActQuant::kNone) {
    std::memcpy(out, x, static_cast<size_t>(m * k) * sizeof(float));
    return;
  }
  const int64_t bs = act_block_size(act);
  float q[32];
  for (int64_t r = 0; r < m; ++r)
    for (int64_t k0 = 0; k0 < k; k0 += bs) {
      const int64_t len = std::min(bs, k - k0);
      const float d = block_e2m1(act, x + r * k + k0, len, bs, tensor_scale, q);
      float* yb = out + r * k + k0;
      for (int64_t i = 0; i < len; ++i) yb[i] = q[i] * d;  // nvfp4 d == 0: q = +0, so +0
    }
}

void matmul_fp4(const float* x, int64_t m, const Fp4Weight& w, ActQuant act, float act_scale, float* y) {
#ifdef QCN_AVX2
  if (act != ActQuant::kNone) {
    if (w.block_size == 16) return matmul_int<16>(x, m, w, act, act_scale, y);
    if (w.block_size == 32) return matmul_int<32>(x, m, w, act, act_scale, y);
    return matmul_int<0>(x, m, w, act, act_scale, y);
  }
  if (w.block_size == 16) return matmul_avx2<16>(x, m, w, y);
  if (w.block_size == 32) return matmul_avx2<32>(x, m, w, y);
  return matmul_avx2<0>(x, m, w, y);
#else
  if (act == ActQuant::kNone) return matmul_scalar(x, m, w, y);
  std::vector<float> xq(static_cast<size_t>(m * w.k));
  fake_quant_act(x, m, w.k, act, act_scale, xq.data());
  matmul_scalar(xq.data(), m, w, y);
#endif
}

const char* isa_name() {
#if defined(QCN_VNNI)
  return QCN_VNNI;
#elif defined(QCN_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace qcn
