#include "hadamard.h"

#include <cmath>
#include <cstring>

namespace qcn {

namespace {

// One block in place: the butterfly rounds with half-width h = 1, 2, .., b / 2. For h >= 8 the
// inner loop runs over contiguous a / c vectors (the compiler vectorizes it); the first three
// rounds are done together on groups of 8.
inline void fwht8(float* v) {
  float a0 = v[0] + v[1], a1 = v[0] - v[1], a2 = v[2] + v[3], a3 = v[2] - v[3];
  float a4 = v[4] + v[5], a5 = v[4] - v[5], a6 = v[6] + v[7], a7 = v[6] - v[7];
  float b0 = a0 + a2, b1 = a1 + a3, b2 = a0 - a2, b3 = a1 - a3;
  float b4 = a4 + a6, b5 = a5 + a7, b6 = a4 - a6, b7 = a5 - a7;
  v[0] = b0 + b4; v[1] = b1 + b5; v[2] = b2 + b6; v[3] = b3 + b7;
  v[4] = b0 - b4; v[5] = b1 - b5; v[6] = b2 - b6; v[7] = b3 - b7;
}

void fwht(float* v, int64_t b) {
  int64_t h = 1;
  if (b >= 8) {
    for (int64_t i = 0; i < b; i += 8) fwht8(v + i);
    h = 8;
  }
  for (; h < b; h *= 2) {
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

}  // namespace

void block_hadamard(const float* x, int64_t rows, int64_t k, int64_t block, const float* signs, float* y) {
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k;
    float* yr = y + r * k;
    if (signs != nullptr) {
      for (int64_t i = 0; i < k; ++i) yr[i] = xr[i] * signs[i];
    } else if (yr != xr) {
      std::memcpy(yr, xr, static_cast<size_t>(k) * sizeof(float));
    }
    for (int64_t g = 0; g < k; g += block) fwht(yr + g, block);
    for (int64_t i = 0; i < k; ++i) yr[i] *= scale;
  }
}

}  // namespace qcn
