// "Dequantize float8 weights + MatMul": y[M, N] = x[M, K] @ (decode(code[n, k]) * scale[n]).
//
// Codes are OCP float8 E4M3FN or E5M2 bytes stored per output column (codes [N, K]); the scale is
// per column (float32). decode is exact: a float8 value is a float16 value up to a power of two,
//   E5M2:   the byte is a float16's high byte (infinities and NaNs included): half(c << 8);
//   E4M3FN: sign, then the 7 exponent/mantissa bits at bit 7 of a float16, times 2**8 (subnormals
//           included); 0x7F / 0xFF are NaN,
// converted with F16C (vcvtph2ps, which honours half subnormals regardless of MXCSR.DAZ).
// The sum over k is float32: per column, y = scale * sum_k x_k * decode(code_k) (GEMV), or
// sum_k x_k * (decode(code_k) * scale) with a decoded column (GEMM, AVX2 builds, >= 16 rows).
#pragma once

#include <cstdint>

namespace qcn {

struct F8Weight {
  const uint8_t* codes;  // [n, k]
  const float* scales;   // [n]
  int64_t k, n;
  bool e5m2;             // else E4M3FN
};

// The float32 value of one code (exact).
float decode_f8(uint8_t code, bool e5m2);

void matmul_f8(const float* x, int64_t m, const F8Weight& w, float* y);

}  // namespace qcn
