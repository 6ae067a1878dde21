// Block Walsh-Hadamard rotation of the last axis (qcompile.rotation.Rotation with factor 0):
//
//   y[r, g b + j] = 1/sqrt(b) * sum_i (x[r, g b + i] * d[g b + i]) * (-1)^popcount(i & j)
//
// for rows r, blocks g of b (a power of two) consecutive channels of the K-wide last axis, and
// optional signs d [K] (nullptr: all 1). (-1)^popcount(i & j) is Sylvester's H_b (H_2m =
// [[H_m, H_m], [H_m, -H_m]]), computed by the in-place fast transform: log2(b) butterfly rounds
// (a, c) -> (a + c, a - c) on a block held in L1 (AVX2: the first three in registers per 8
// values), so one read and one write of x: b log2 b adds
// per block against b^2 multiply-adds for a MatMul by H_b. Float32 arithmetic; x is scaled by
// 1/sqrt(b) (and d) first. block_hadamard_quantize fuses the QuantizeLinear that follows (one
// write of 1 byte per element instead of a float tensor written and read back).
#pragma once

#include <cstdint>

namespace qcn {

// y may alias x.
void block_hadamard(const float* x, int64_t rows, int64_t k, int64_t block, const float* signs, float* y);

// q = QuantizeLinear(block_hadamard(x), scale, zero_point) in one pass over x (each row rotated in
// a buffer): q = clamp(rint(r / scale) + zero_point) in Q's range, rint half to even; as
// onnxruntime's QuantizeLinear computes it (x / scale in float32, then rounding).
template <class Q>
void block_hadamard_quantize(const float* x, int64_t rows, int64_t k, int64_t block, const float* signs, float scale,
                             int32_t zero_point, Q* q);

}  // namespace qcn
