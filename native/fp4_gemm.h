// Fused "dequantize packed FP4 (E2M1) + GEMM" for weights stored per output column.
//
// Math: y[m, n] = sum_k x[m, k] * e2m1(code[n, k]) * scale(n, k / block_size), accumulated in
// float32. scale(n, b) = lut[scale_code[n, b]], where lut holds 2**(c - 127) for E8M0 (255 = NaN)
// or float32(decode_e4m3fn(c) * tensor_scale) for E4M3 (0x7F / 0xFF = NaN).
//
// Layout (Kp = padded_k(K, block_size), a multiple of 64 and of block_size; padding codes are 0):
//   codes  uint8 [N, Kp / 2]           byte j of row n = code[n, 2j] | code[n, 2j + 1] << 4
//   scales uint8 [N, Kp / block_size]  scale code of block b of column n
//
// Optional activation fake-quantization (fake_quant_act), per row of x and per block of
// act_block_size(act) consecutive k (the last block zero-padded), bit-exact with
// qcompile.codec.fake_quant(x, FORMATS["mxfp4" | "nvfp4"], axis=-1, tensor_scale):
//   mxfp4: X = 2**clamp(floor(log2 amax) - 2, -127, 127) (zero block: 2**-127; a block holding
//          NaN/inf: NaN), out = e2m1(x / X) * X.
//   nvfp4: s_b = e4m3fn((amax / 6) / s_t) (float32 ops, RNE, saturating to 448; NaN for a
//          non-finite block), d = float32(s_b * s_t), out = e2m1(x / d) * d, 0 where d == 0.
//   e2m1() is round-half-even onto {0, 0.5, 1, 1.5, 2, 3, 4, 6}, saturating to +-6, sign kept.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace qcn {

enum class ScaleType { kE8M0, kE4M3 };
enum class ActQuant { kNone, kMxfp4, kNvfp4 };

struct Fp4Weight {
  const uint8_t* codes;
  const uint8_t* scales;
  int64_t k;           // true reduction length (x's last dim)
  int64_t n;           // output columns
  int64_t block_size;  // power of two >= 16
  const float* scale_lut;  // 256 decoded scale values (build_scale_lut(scale_type, tensor_scale))
  ScaleType scale_type;
  float tensor_scale;      // E4M3 only
};

// Smallest multiple of 64 and of block_size that is >= k.
int64_t padded_k(int64_t k, int64_t block_size);

// Fills lut[256] with the float32 value of every scale code.
void build_scale_lut(ScaleType type, float tensor_scale, float* lut);

// y[M, N] = fake_quant_act(x[M, K], act, act_scale) @ W. Thread-safe (no shared mutable state).
// With act = mxfp4/nvfp4 both operands are E2M1 and the AVX2 build sums each block exactly in
// int32 (float32 accumulation across blocks only).
void matmul_fp4(const float* x, int64_t m, const Fp4Weight& w, ActQuant act, float act_scale, float* y);

// Block length of an activation format: 32 (mxfp4), 16 (nvfp4), 0 (none).
int64_t act_block_size(ActQuant act);

// out[M, K] = x[M, K] fake-quantized per row (see above); tensor_scale is s_t (nvfp4 only).
// act == kNone copies. out may not alias x.
void fake_quant_act(const float* x, int64_t m, int64_t k, ActQuant act, float tensor_scale, float* out);

// From this many rows on, the AVX builds' float paths use gemm_float_columns (measured: below it
// the 4-row column tiles are faster, on 256- and 512-bit builds alike: one or two 8-row panels
// do not repay decoding every column to float).
constexpr int64_t kFloatGemmMinRows = 16;

// Shared with the other kernels (AVX2 builds): y[M, N] = x[M, K] @ W, W given column by column:
// decode(n, out) writes column n's kp float32 values (0 past K; kp a multiple of 16). Rows are
// packed into panels of 16 (AVX-512) or 8 (AVX2) in the vector lanes and each column is decoded
// once; every AVX build computes the same bits.
void gemm_float_columns(const float* x, int64_t m, int64_t k, int64_t kp, int64_t n,
                        const std::function<void(int64_t, float*)>& decode, float* y);

// "avx512-vnni", "avx2-vnni", "avx2" or "scalar": the code path this library was compiled with.
const char* isa_name();

}  // namespace qcn
