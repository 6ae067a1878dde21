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
// 1/sqrt(b) (and d) first.
#pragma once

#include <cstdint>

namespace qcn {

// y may alias x.
void block_hadamard(const float* x, int64_t rows, int64_t k, int64_t block, const float* signs, float* y);

}  // namespace qcn
