// onnxruntime custom-op library: domain "qcompile.native", ops MatMulFp4, MatMulF8, FakeQuantMX,
// FakeQuantNVFP4, FakeQuantMinifloat and BlockHadamard (version 1).
//
//   Y = MatMulFp4(X, W, S[, T][, A_T])   Y[..., N] = fq(X[..., K]) @ dequantize(W, S, T)
//     X   float  [..., K]
//     W   uint8  [N, Kp / 2]          E2M1 codes, two k per byte (low nibble = even k)
//     S   uint8  [N, Kp / block_size] block scale codes (E8M0 or E4M3FN)
//     T   float  [1] (optional)        weight tensor scale, multiplied into E4M3 scales in float32
//     A_T float  [] or [1] (optional)  activation tensor scale s_t; required iff act = "nvfp4"
//   attributes: K, N, block_size (power of two >= 16), scale_type ("e8m0" | "e4m3"),
//               act ("none" (default) | "mxfp4" | "nvfp4"): fq = identity, or the activation
//               fake-quantization of fp4_gemm.h (blocks of 32 / 16 along K).
//   Kp = padded_k(K, block_size); see fp4_gemm.h. T may be an empty input when A_T is given.
//
//   Y = MatMulF8(X, W, S)               attrs K, N, fmt ("e4m3fn" | "e5m2")
//     W uint8 [N, K] float8 codes per output column, S float [N]: Y = X @ (decode(W) * S)^T
//   Y = FakeQuantMX(X)                  attrs axis, block_size, emax_elem, mantissa_bits, emin, emax,
//                                       min, max, signed_zero, has_nan
//   Y = FakeQuantNVFP4(X, T)            attrs axis, block_size; T float [] or [1]
//   Y = FakeQuantMinifloat(X, S)        attrs mantissa_bits, emin, emax, min, max, signed_zero,
//                                       has_nan; S float [] or [1]: grid(X / S) * S
//   The qcompile function ops of the same names and attributes (qcompile/functions.py), natively:
//   same values bit for bit, see fake_quant.h.
//   Y = BlockHadamard(X[, D])           attr block (a power of two >= 2 dividing X's last axis K);
//                                       D float [K] (optional signs): Y = (X * D) (I (x) H_block /
//                                       sqrt(block)), see hadamard.h (passes/rotate.py emits it).
//   Y = BlockHadamardQuantize(X, D, y_scale, y_zero_point)   (D may be empty-named)
//       QuantizeLinear(BlockHadamard(X, D), y_scale, y_zero_point): uint8 Y, per-tensor scale and
//       zero point, in one pass; BlockHadamardQuantizeS8 the same with int8 (lower_native.py).
//
// Only the C API is used, through the OrtApi handed to RegisterCustomOps: the library does not
// link against libonnxruntime. Attribute errors fail kernel creation (session load); input
// shape/type errors fail the run; both as ORT_INVALID_ARGUMENT statuses.
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "f8_gemm.h"
#include "fake_quant.h"
#include "fp4_gemm.h"
#include "hadamard.h"
#include "onnxruntime_c_api.h"

namespace {

const char* const kDomain = "qcompile.native";
const OrtApi* g_api = nullptr;
constexpr uint32_t kMinApiVersion = 16;

struct Kernel {
  int64_t k, n, block_size;
  qcn::ScaleType scale_type;
  qcn::ActQuant act;
};

OrtStatus* fail(const std::string& msg) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str()); }

#define QCN_RETURN_IF_ERROR(expr)        \
  do {                                   \
    OrtStatus* status_ = (expr);         \
    if (status_ != nullptr) return status_; \
  } while (0)

OrtStatus* string_attr(const OrtKernelInfo* info, const char* name, std::string& out) {
  size_t size = 0;
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_string(info, name, nullptr, &size));
  std::vector<char> buf(size + 1, '\0');
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_string(info, name, buf.data(), &size));
  out.assign(buf.data());
  return nullptr;
}

OrtStatus* read_attributes(const OrtKernelInfo* info, Kernel& kern) {
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_int64(info, "K", &kern.k));
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_int64(info, "N", &kern.n));
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_int64(info, "block_size", &kern.block_size));
  std::string scale_type;
  QCN_RETURN_IF_ERROR(string_attr(info, "scale_type", scale_type));
  if (kern.k <= 0 || kern.n <= 0) return fail("MatMulFp4: K and N must be positive");
  const int64_t bs = kern.block_size;
  if (bs < 16 || bs > (int64_t{1} << 20) || (bs & (bs - 1)) != 0)
    return fail("MatMulFp4: block_size must be a power of two >= 16, got " + std::to_string(bs));
  if (scale_type == "e8m0") {
    kern.scale_type = qcn::ScaleType::kE8M0;
  } else if (scale_type == "e4m3") {
    kern.scale_type = qcn::ScaleType::kE4M3;
  } else {
    return fail("MatMulFp4: scale_type must be 'e8m0' or 'e4m3', got '" + scale_type + "'");
  }
  // act is optional: a missing attribute (any lookup error) means "none".
  std::string act = "none";
  if (OrtStatus* st = string_attr(info, "act", act)) {
    g_api->ReleaseStatus(st);
    act = "none";
  }
  if (act == "none") {
    kern.act = qcn::ActQuant::kNone;
  } else if (act == "mxfp4") {
    kern.act = qcn::ActQuant::kMxfp4;
  } else if (act == "nvfp4") {
    kern.act = qcn::ActQuant::kNvfp4;
  } else {
    return fail("MatMulFp4: act must be 'none', 'mxfp4' or 'nvfp4', got '" + act + "'");
  }
  return nullptr;
}

// Element type and dims of an input.
OrtStatus* describe(const OrtValue* value, ONNXTensorElementDataType& type, std::vector<int64_t>& dims) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  QCN_RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* st = g_api->GetTensorElementType(info, &type);
  if (st == nullptr) st = g_api->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    dims.assign(rank, 0);
    st = g_api->GetDimensions(info, dims.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

std::string dims_str(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

OrtStatus* expect(const OrtValue* v, const char* what, ONNXTensorElementDataType want_type,
                  const std::vector<int64_t>& want_dims) {
  ONNXTensorElementDataType type;
  std::vector<int64_t> dims;
  QCN_RETURN_IF_ERROR(describe(v, type, dims));
  if (type != want_type || dims != want_dims)
    return fail(std::string("MatMulFp4: ") + what + " must be " + dims_str(want_dims) + " of element type " +
                std::to_string(want_type) + ", got " + dims_str(dims) + " of type " + std::to_string(type));
  return nullptr;
}

// Read-only data of an input whose type and shape were validated (GetTensorData needs API 23).
const void* data(const OrtValue* v) {
  void* p = nullptr;
  OrtStatus* st = g_api->GetTensorMutableData(const_cast<OrtValue*>(v), &p);
  if (st != nullptr) {
    g_api->ReleaseStatus(st);
    throw std::runtime_error("qcompile.native: cannot read an input tensor");
  }
  return p;
}

// A float scalar or [1] input's value.
OrtStatus* scalar_input(const OrtValue* v, const char* op, const char* what, float& out) {
  ONNXTensorElementDataType type;
  std::vector<int64_t> dims;
  QCN_RETURN_IF_ERROR(describe(v, type, dims));
  if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || dims.size() > 1 || (dims.size() == 1 && dims[0] != 1))
    return fail(std::string(op) + ": " + what + " must be a float scalar or [1], got " + dims_str(dims));
  out = *static_cast<const float*>(data(v));
  return nullptr;
}

// A MatMul's activation X float [..., K] and its output Y [..., N], allocated: m rows (the product
// of X's leading dims); x and y are null when m == 0.
struct MatMulIo {
  int64_t m;
  const float* x;
  float* y;
};

OrtStatus* matmul_io(OrtKernelContext* ctx, const OrtValue* x, const char* op, int64_t k, int64_t n, MatMulIo& io) {
  ONNXTensorElementDataType type;
  std::vector<int64_t> dims;
  QCN_RETURN_IF_ERROR(describe(x, type, dims));
  if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || dims.empty() || dims.back() != k)
    return fail(std::string(op) + ": X must be float [..., " + std::to_string(k) + "], got " + dims_str(dims));
  io.m = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) io.m *= dims[i];
  dims.back() = n;
  OrtValue* y = nullptr;
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(ctx, 0, dims.data(), dims.size(), &y));
  io.x = nullptr;
  io.y = nullptr;
  if (io.m == 0) return nullptr;
  void* yd = nullptr;
  QCN_RETURN_IF_ERROR(g_api->GetTensorMutableData(y, &yd));
  io.x = static_cast<const float*>(data(x));
  io.y = static_cast<float*>(yd);
  return nullptr;
}

OrtStatus* compute(const Kernel& kern, OrtKernelContext* ctx) {
  const OrtValue *x = nullptr, *w = nullptr, *s = nullptr, *t = nullptr, *at = nullptr;
  size_t count = 0;
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(ctx, &count));
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 0, &x));
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 1, &w));
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 2, &s));
  if (count > 3) QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 3, &t));  // null when empty-named
  if (count > 4) QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 4, &at));
  if (x == nullptr || w == nullptr || s == nullptr) return fail("MatMulFp4: X, W and S are required");
  if ((at != nullptr) != (kern.act == qcn::ActQuant::kNvfp4))
    return fail(kern.act == qcn::ActQuant::kNvfp4 ? "MatMulFp4: act 'nvfp4' needs the activation tensor scale A_T"
                                                   : "MatMulFp4: A_T is only used with act 'nvfp4'");

  const int64_t kp = qcn::padded_k(kern.k, kern.block_size);
  QCN_RETURN_IF_ERROR(expect(w, "W", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {kern.n, kp / 2}));
  QCN_RETURN_IF_ERROR(expect(s, "S", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {kern.n, kp / kern.block_size}));
  float tensor_scale = 1.0f, act_scale = 1.0f;
  if (t != nullptr) {
    QCN_RETURN_IF_ERROR(expect(t, "T", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {1}));
    tensor_scale = *static_cast<const float*>(data(t));
  }
  if (at != nullptr) QCN_RETURN_IF_ERROR(scalar_input(at, "MatMulFp4", "A_T", act_scale));
  MatMulIo io;
  QCN_RETURN_IF_ERROR(matmul_io(ctx, x, "MatMulFp4", kern.k, kern.n, io));
  if (io.m == 0) return nullptr;

  float lut[256];
  qcn::build_scale_lut(kern.scale_type, tensor_scale, lut);
  const qcn::Fp4Weight weight{static_cast<const uint8_t*>(data(w)), static_cast<const uint8_t*>(data(s)), kern.k,
                              kern.n, kern.block_size, lut, kern.scale_type, tensor_scale};
  qcn::matmul_fp4(io.x, io.m, weight, kern.act, act_scale, io.y);
  return nullptr;
}

// --- FakeQuantMX / FakeQuantNVFP4 / FakeQuantMinifloat ------------------------------------------

enum class FqKind { kMx, kNvfp4, kMinifloat };

struct FakeQuantKernel {
  FqKind kind;
  int64_t axis, block_size, emax_elem;
  qcn::Grid grid;
};

const char* fq_name(FqKind kind) {
  return kind == FqKind::kMx ? "FakeQuantMX" : kind == FqKind::kNvfp4 ? "FakeQuantNVFP4" : "FakeQuantMinifloat";
}

OrtStatus* read_grid(const OrtKernelInfo* info, const char* op, qcn::Grid& g) {
  int64_t signed_zero = 0, has_nan = 0;
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_int64(info, "mantissa_bits", &g.mantissa_bits));
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_int64(info, "emin", &g.emin));
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_int64(info, "emax", &g.emax));
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_float(info, "min", &g.min));
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_float(info, "max", &g.max));
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_int64(info, "signed_zero", &signed_zero));
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_int64(info, "has_nan", &has_nan));
  g.signed_zero = signed_zero != 0;
  g.has_nan = has_nan != 0;
  if (g.emin < -126 || g.emax < g.emin || g.emax > 127 || g.mantissa_bits < 0 || g.mantissa_bits > 23 ||
      g.emin - g.mantissa_bits < -149 || !(g.min <= g.max))
    return fail(std::string(op) + ": grid attributes out of range (need -126 <= emin <= emax <= 127, "
                "0 <= mantissa_bits, emin - mantissa_bits >= -149, min <= max)");
  return nullptr;
}

template <FqKind kKind>
OrtStatus* read_fake_quant(const OrtKernelInfo* info, FakeQuantKernel& kern) {
  kern.kind = kKind;
  const char* op = fq_name(kKind);
  if (kKind == FqKind::kMinifloat) return read_grid(info, op, kern.grid);
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_int64(info, "axis", &kern.axis));
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_int64(info, "block_size", &kern.block_size));
  if (kern.block_size < 1) return fail(std::string(op) + ": block_size must be positive");
  if (kKind == FqKind::kNvfp4) return nullptr;
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_int64(info, "emax_elem", &kern.emax_elem));
  return read_grid(info, op, kern.grid);
}

OrtStatus* fake_quant_compute(const FakeQuantKernel& kern, OrtKernelContext* ctx) {
  const char* op = fq_name(kern.kind);
  const OrtValue *x = nullptr, *t = nullptr;
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 0, &x));
  if (kern.kind != FqKind::kMx) QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 1, &t));
  if (x == nullptr || (kern.kind != FqKind::kMx && t == nullptr)) return fail(std::string(op) + ": missing input");
  ONNXTensorElementDataType type;
  std::vector<int64_t> dims;
  QCN_RETURN_IF_ERROR(describe(x, type, dims));
  const int64_t rank = static_cast<int64_t>(dims.size());
  const int64_t axis = kern.kind == FqKind::kMinifloat ? 0 : kern.axis < 0 ? kern.axis + rank : kern.axis;
  if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || (kern.kind != FqKind::kMinifloat && (axis < 0 || axis >= rank)))
    return fail(std::string(op) + ": X must be float" +
                (kern.kind == FqKind::kMinifloat ? "" : " with axis " + std::to_string(kern.axis) + " in range") +
                ", got " + dims_str(dims));
  float scale = 1.0f;
  if (t != nullptr)
    QCN_RETURN_IF_ERROR(scalar_input(t, op, kern.kind == FqKind::kNvfp4 ? "tensor_scale" : "scale", scale));
  int64_t count = 1, pre = 1, post = 1;
  for (int64_t i = 0; i < rank; ++i) {
    count *= dims[i];
    if (i < axis) pre *= dims[i];
    if (i > axis) post *= dims[i];
  }
  OrtValue* y = nullptr;
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(ctx, 0, dims.data(), dims.size(), &y));
  if (count == 0) return nullptr;
  void* yd = nullptr;
  QCN_RETURN_IF_ERROR(g_api->GetTensorMutableData(y, &yd));
  const float* xf = static_cast<const float*>(data(x));
  float* yf = static_cast<float*>(yd);
  if (kern.kind == FqKind::kMinifloat)
    qcn::fake_quant_minifloat(xf, count, scale, kern.grid, yf);
  else if (kern.kind == FqKind::kNvfp4)
    qcn::fake_quant_nvfp4(xf, pre, dims[axis], post, kern.block_size, scale, yf);
  else
    qcn::fake_quant_mx(xf, pre, dims[axis], post, kern.block_size, kern.emax_elem, kern.grid, yf);
  return nullptr;
}

// --- BlockHadamard -------------------------------------------------------------------------------

struct HadamardKernel {
  int64_t block;
};

OrtStatus* read_hadamard(const OrtKernelInfo* info, HadamardKernel& kern) {
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_int64(info, "block", &kern.block));
  const int64_t b = kern.block;
  if (b < 2 || b > (int64_t{1} << 20) || (b & (b - 1)) != 0)
    return fail("BlockHadamard: block must be a power of two >= 2, got " + std::to_string(b));
  return nullptr;
}

// X and the optional signs D of BlockHadamard(Quantize): dims, row count, K and D's data (or nullptr).
OrtStatus* hadamard_inputs(const HadamardKernel& kern, OrtKernelContext* ctx, const char* op, const OrtValue*& x,
                           std::vector<int64_t>& dims, int64_t& count, const float*& signs) {
  const OrtValue* d = nullptr;
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 0, &x));
  size_t inputs = 0;
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(ctx, &inputs));
  if (inputs > 1) QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 1, &d));
  if (x == nullptr) return fail(std::string(op) + ": missing input X");
  ONNXTensorElementDataType type;
  QCN_RETURN_IF_ERROR(describe(x, type, dims));
  const int64_t k = dims.empty() ? 0 : dims.back();
  if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || dims.empty() || k % kern.block != 0)
    return fail(std::string(op) + ": X must be float with a last axis divisible by block " +
                std::to_string(kern.block) + ", got " + dims_str(dims));
  signs = nullptr;
  if (d != nullptr) {
    ONNXTensorElementDataType dtype;
    std::vector<int64_t> ddims;
    QCN_RETURN_IF_ERROR(describe(d, dtype, ddims));
    if (dtype != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || ddims.size() != 1 || ddims[0] != k)
      return fail(std::string(op) + ": D must be float [" + std::to_string(k) + "], got " + dims_str(ddims));
    signs = static_cast<const float*>(data(d));
  }
  count = 1;
  for (int64_t v : dims) count *= v;
  return nullptr;
}

OrtStatus* hadamard_compute(const HadamardKernel& kern, OrtKernelContext* ctx) {
  const OrtValue* x = nullptr;
  std::vector<int64_t> dims;
  int64_t count = 0;
  const float* signs = nullptr;
  QCN_RETURN_IF_ERROR(hadamard_inputs(kern, ctx, "BlockHadamard", x, dims, count, signs));
  OrtValue* y = nullptr;
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(ctx, 0, dims.data(), dims.size(), &y));
  if (count == 0) return nullptr;
  void* yd = nullptr;
  QCN_RETURN_IF_ERROR(g_api->GetTensorMutableData(y, &yd));
  qcn::block_hadamard(static_cast<const float*>(data(x)), count / dims.back(), dims.back(), kern.block, signs,
                      static_cast<float*>(yd));
  return nullptr;
}

// BlockHadamardQuantize(X, [D], y_scale, y_zero_point): QuantizeLinear(BlockHadamard(X, D)) with a
// per-tensor scale and zero point (uint8, or int8 for the S8 op).
template <class Q>
OrtStatus* hadamard_quantize_compute(const HadamardKernel& kern, OrtKernelContext* ctx) {
  const char* op = std::is_same<Q, uint8_t>::value ? "BlockHadamardQuantize" : "BlockHadamardQuantizeS8";
  const OrtValue* x = nullptr;
  std::vector<int64_t> dims;
  int64_t count = 0;
  const float* signs = nullptr;
  QCN_RETURN_IF_ERROR(hadamard_inputs(kern, ctx, op, x, dims, count, signs));
  const OrtValue *s = nullptr, *z = nullptr;
  size_t inputs = 0;
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(ctx, &inputs));
  if (inputs < 4) return fail(std::string(op) + ": needs y_scale and y_zero_point");
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 2, &s));
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 3, &z));
  if (s == nullptr || z == nullptr) return fail(std::string(op) + ": needs y_scale and y_zero_point");
  float scale = 1.0f;
  QCN_RETURN_IF_ERROR(scalar_input(s, op, "y_scale", scale));
  ONNXTensorElementDataType ztype;
  std::vector<int64_t> zdims;
  QCN_RETURN_IF_ERROR(describe(z, ztype, zdims));
  int64_t zcount = 1;
  for (int64_t v : zdims) zcount *= v;
  if (zcount != 1) return fail(std::string(op) + ": y_zero_point must hold one value, got " + dims_str(zdims));
  const int32_t zero_point = *static_cast<const Q*>(data(z));
  OrtValue* y = nullptr;
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(ctx, 0, dims.data(), dims.size(), &y));
  if (count == 0) return nullptr;
  void* yd = nullptr;
  QCN_RETURN_IF_ERROR(g_api->GetTensorMutableData(y, &yd));
  qcn::block_hadamard_quantize(static_cast<const float*>(data(x)), count / dims.back(), dims.back(), kern.block,
                               signs, scale, zero_point, static_cast<Q*>(yd));
  return nullptr;
}

// --- MatMulF8 -----------------------------------------------------------------------------------

struct F8Kernel {
  int64_t k, n;
  bool e5m2;
};

OrtStatus* read_f8_attributes(const OrtKernelInfo* info, F8Kernel& kern) {
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_int64(info, "K", &kern.k));
  QCN_RETURN_IF_ERROR(g_api->KernelInfoGetAttribute_int64(info, "N", &kern.n));
  std::string fmt;
  QCN_RETURN_IF_ERROR(string_attr(info, "fmt", fmt));
  if (kern.k <= 0 || kern.n <= 0) return fail("MatMulF8: K and N must be positive");
  if (fmt != "e4m3fn" && fmt != "e5m2") return fail("MatMulF8: fmt must be 'e4m3fn' or 'e5m2', got '" + fmt + "'");
  kern.e5m2 = fmt == "e5m2";
  return nullptr;
}

OrtStatus* f8_compute(const F8Kernel& kern, OrtKernelContext* ctx) {
  const OrtValue *x = nullptr, *w = nullptr, *s = nullptr;
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 0, &x));
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 1, &w));
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 2, &s));
  if (x == nullptr || w == nullptr || s == nullptr) return fail("MatMulF8: X, W and S are required");
  QCN_RETURN_IF_ERROR(expect(w, "W", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {kern.n, kern.k}));
  QCN_RETURN_IF_ERROR(expect(s, "S", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {kern.n}));
  MatMulIo io;
  QCN_RETURN_IF_ERROR(matmul_io(ctx, x, "MatMulF8", kern.k, kern.n, io));
  if (io.m == 0) return nullptr;
  const qcn::F8Weight weight{static_cast<const uint8_t*>(data(w)), static_cast<const float*>(data(s)), kern.k, kern.n,
                             kern.e5m2};
  qcn::matmul_f8(io.x, io.m, weight, io.y);
  return nullptr;
}

// --- OrtCustomOp callbacks: one table entry per op ---------------------------------------------

// An op: OrtCustomOp first, so ORT's `const OrtCustomOp*` also points to its entry.
struct OpDef {
  OrtCustomOp op;
  const char* name;
  size_t inputs, required;  // inputs from `required` on are optional
  bool (*is_uint8_input)(size_t index);
  ONNXTensorElementDataType int_type, out_type;  // the type of the "uint8" inputs; the output's
};

const OpDef& def(const OrtCustomOp* op) { return *reinterpret_cast<const OpDef*>(op); }

template <class F>
OrtStatus* guarded(const char* name, F&& f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return g_api->CreateStatus(ORT_FAIL, (std::string(name) + ": out of memory").c_str());
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_FAIL, e.what());
  }
}

// Kernel state K read from the node's attributes by Read, run by Compute.
template <class K, OrtStatus* (*Read)(const OrtKernelInfo*, K&), OrtStatus* (*Compute)(const K&, OrtKernelContext*)>
struct KernelCalls {
  static OrtStatusPtr ORT_API_CALL create(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info,
                                          void** kernel) {
    return guarded(def(op).name, [&]() -> OrtStatus* {
      K kern{};
      QCN_RETURN_IF_ERROR(Read(info, kern));
      *kernel = new K(kern);
      return nullptr;
    });
  }
  static OrtStatusPtr ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) {
    return guarded("qcompile.native", [&] { return Compute(*static_cast<const K*>(kernel), ctx); });
  }
  static void ORT_API_CALL destroy(void* kernel) { delete static_cast<K*>(kernel); }
};

const char* ORT_API_CALL op_name(const OrtCustomOp* op) { return def(op).name; }
const char* ORT_API_CALL op_provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
size_t ORT_API_CALL input_count(const OrtCustomOp* op) { return def(op).inputs; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }

ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp* op, size_t index) {
  return def(op).is_uint8_input(index) ? def(op).int_type : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp* op, size_t) { return def(op).out_type; }

OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_characteristic(const OrtCustomOp* op, size_t index) {
  return index >= def(op).required ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_characteristic(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}

OrtMemType ORT_API_CALL input_memory_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL min_arity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL homogeneity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return 1; }

template <class K, OrtStatus* (*Read)(const OrtKernelInfo*, K&), OrtStatus* (*Compute)(const K&, OrtKernelContext*)>
OpDef make_op(const char* name, size_t inputs, size_t required, bool (*is_uint8_input)(size_t),
             ONNXTensorElementDataType int_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
             ONNXTensorElementDataType out_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
  using Calls = KernelCalls<K, Read, Compute>;
  OpDef d;
  std::memset(&d.op, 0, sizeof(d.op));
  d.name = name;
  d.inputs = inputs;
  d.required = required;
  d.is_uint8_input = is_uint8_input;
  d.int_type = int_type;
  d.out_type = out_type;
  OrtCustomOp& op = d.op;
  op.version = ORT_API_VERSION;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.GetInputCharacteristic = input_characteristic;
  op.GetOutputCharacteristic = output_characteristic;
  op.GetInputMemoryType = input_memory_type;
  op.GetVariadicInputMinArity = min_arity;
  op.GetVariadicInputHomogeneity = homogeneity;
  op.GetVariadicOutputMinArity = min_arity;
  op.GetVariadicOutputHomogeneity = homogeneity;
  op.CreateKernelV2 = Calls::create;
  op.KernelComputeV2 = Calls::compute;
  op.KernelDestroy = Calls::destroy;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  return d;
}

bool matmul_uint8(size_t index) { return index == 1 || index == 2; }
bool f8_uint8(size_t index) { return index == 1; }
bool all_float(size_t) { return false; }
bool zero_point_input(size_t index) { return index == 3; }

const OpDef g_ops[] = {
    make_op<Kernel, read_attributes, compute>("MatMulFp4", 5, 3, matmul_uint8),
    make_op<F8Kernel, read_f8_attributes, f8_compute>("MatMulF8", 3, 3, f8_uint8),
    make_op<FakeQuantKernel, read_fake_quant<FqKind::kMx>, fake_quant_compute>("FakeQuantMX", 1, 1, all_float),
    make_op<FakeQuantKernel, read_fake_quant<FqKind::kNvfp4>, fake_quant_compute>("FakeQuantNVFP4", 2, 2, all_float),
    make_op<FakeQuantKernel, read_fake_quant<FqKind::kMinifloat>, fake_quant_compute>("FakeQuantMinifloat", 2, 2,
                                                                                      all_float),
    make_op<HadamardKernel, read_hadamard, hadamard_compute>("BlockHadamard", 2, 1, all_float),
    make_op<HadamardKernel, read_hadamard, hadamard_quantize_compute<uint8_t>>(
        "BlockHadamardQuantize", 4, 1, zero_point_input, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
        ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8),
    make_op<HadamardKernel, read_hadamard, hadamard_quantize_compute<int8_t>>(
        "BlockHadamardQuantizeS8", 4, 1, zero_point_input, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
        ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8),
};

// Domains handed to ORT stay alive until the library is unloaded (ORT does not own them).
struct Domains {
  std::mutex mu;
  std::vector<OrtCustomOpDomain*> all;
  ~Domains() {
    for (OrtCustomOpDomain* d : all) g_api->ReleaseCustomOpDomain(d);
  }
};
Domains g_domains;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  // The newest API this runtime serves, down to 16 (CreateKernelV2/KernelComputeV2, onnxruntime 1.16).
  const OrtApi* api = nullptr;
  for (uint32_t v = ORT_API_VERSION; api == nullptr && v >= kMinApiVersion; --v) api = api_base->GetApi(v);
  if (api == nullptr) return nullptr;  // runtime older than 1.16: no OrtApi to report an error with
  g_api = api;
  OrtCustomOpDomain* domain = nullptr;
  QCN_RETURN_IF_ERROR(api->CreateCustomOpDomain(kDomain, &domain));
  {
    std::lock_guard<std::mutex> lock(g_domains.mu);
    g_domains.all.push_back(domain);
  }
  for (const OpDef& d : g_ops) QCN_RETURN_IF_ERROR(api->CustomOpDomain_Add(domain, &d.op));
  return api->AddCustomOpDomain(options, domain);
}

extern "C" __attribute__((visibility("default"))) const char* QcompileNativeIsa() { return qcn::isa_name(); }

// The activation fake-quantization alone (for tests, through ctypes): act 0 none, 1 mxfp4, 2 nvfp4.
// Returns 0, or -1 for an unknown act / negative sizes.
extern "C" __attribute__((visibility("default"))) int QcompileNativeFakeQuantAct(const float* x, int64_t m, int64_t k,
                                                                                int act, float tensor_scale,
                                                                                float* out) {
  if (act < 0 || act > 2 || m < 0 || k < 0) return -1;
  qcn::fake_quant_act(x, m, k, static_cast<qcn::ActQuant>(act), tensor_scale, out);
  return 0;
}
