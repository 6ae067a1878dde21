// Fused "dequantize packed FP4 (E2M1) + GEMM" for weights stored per output column.
//
// Math: y[m, n] = sum_k x[m, k] * e2m1(code[n, k]) * scale(n, k / block_size), accumulated in
// float32. scale(n, b) = lut[scale_code[n, b]], where lut holds 2**(c - 127) for E8M0 (255 = NaN)
// or float32(decode_e4m3fn(c) * tensor_scale) for E4M3 (0x7F / 0xFF = NaN).
//
// Layout (Kp = padded_k(K, block_size), a multiple of 64 and of block_size; padding codes are 0):
//   codes  uint8 [N, Kp / 2]           byte j of row n = code[n, 2j] | code[n, 2j + 1] << 4
//   scales uint8 [N, Kp / block_size]  scale code of block b of column n
#pragma once

#include <cstddef>
#include <cstdint>

namespace qcn {

enum class ScaleType { kE8M0, kE4M3 };

struct Fp4Weight {
  const uint8_t* codes;
  const uint8_t* scales;
  int64_t k;           // true reduction length (x's last dim)
  int64_t n;           // output columns
  int64_t block_size;  // power of two >= 16
  const float* scale_lut;  // 256 decoded scale values
};

// Smallest multiple of 64 and of block_size that is >= k.
int64_t padded_k(int64_t k, int64_t block_size);

// Fills lut[256] with the float32 value of every scale code.
void build_scale_lut(ScaleType type, float tensor_scale, float* lut);

// y[M, N] = x[M, K] @ W. Thread-safe (no shared mutable state).
void matmul_fp4(const float* x, int64_t m, const Fp4Weight& w, float* y);

// "avx2" or "scalar": the code path this library was compiled with.
const char* isa_name();

}  // namespace qcn
