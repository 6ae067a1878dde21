// Quantize-dequantize of activations, bit-exact with the qcompile function ops FakeQuantMX,
// FakeQuantNVFP4 (blocks along any axis) and FakeQuantMinifloat (per tensor) (qcompile/functions.py;
// the same math as codec.fake_quant / round_to_grid).
//
// x is viewed as [pre, n, post] around the axis; blocks are block_size consecutive indices along
// n (the last block zero-padded, which changes no amax). Per block, amax = max |x| and
//   MX:     X = 2**clip(floor(log2 amax) - emax_elem, -127, 127) (amax < 2**-126 counts as exponent
//           -127), NaN for a block holding NaN/inf; out = grid(x / X) * X.
//   NVFP4:  s_b = e4m3fn((amax / 6) / s_t) (NaN for a non-finite block), d = float32(s_b * s_t);
//           out = e2m1(x / d) * d, and +0 where d == 0.
// grid(y) rounds to a Grid (the function ops' grid attributes):
//   c = clip(y, min, max), a = |c|, e = clip(floor(log2(max(a, 2**emin))), emin, emax),
//   step = 2**(e - mantissa_bits), r = rint(a / step) * step (half to even);
//   y NaN -> NaN if has_nan else +0; the result is -r where c < 0 or c is -0.0, unless r == 0 and
//   not signed_zero.
#pragma once

#include <cstdint>

namespace qcn {

struct Grid {
  int64_t mantissa_bits, emin, emax;  // emin >= -126
  float min, max;
  bool signed_zero, has_nan;
};

// The round-to-grid above, for one value.
float round_to_grid(float y, const Grid& g);

// out = MX fake-quant of x ([pre, n, post], blocks of block_size along n); out may not alias x.
void fake_quant_mx(const float* x, int64_t pre, int64_t n, int64_t post, int64_t block_size, int64_t emax_elem,
                   const Grid& g, float* out);

// out[i] = round_to_grid(x[i] / scale) * scale (a per-tensor minifloat / integer grid).
void fake_quant_minifloat(const float* x, int64_t count, float scale, const Grid& g, float* out);

// out = NVFP4 fake-quant of x ([pre, n, post], blocks of block_size along n) under tensor scale s_t.
void fake_quant_nvfp4(const float* x, int64_t pre, int64_t n, int64_t post, int64_t block_size, float tensor_scale,
                      float* out);

}  // namespace qcn
