// onnxruntime custom-op library: domain "qcompile.native", op MatMulFp4 (version 1).
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
// Only the C API is used, through the OrtApi handed to RegisterCustomOps: the library does not
// link against libonnxruntime. Attribute errors fail kernel creation (session load); input
// shape/type errors fail the run; both as ORT_INVALID_ARGUMENT statuses.
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "fp4_gemm.h"
#include "onnxruntime_c_api.h"

namespace {

const char* const kDomain = "qcompile.native";
const char* const kOpName = "MatMulFp4";
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
    throw std::runtime_error("MatMulFp4: cannot read an input tensor");
  }
  return p;
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

  ONNXTensorElementDataType x_type;
  std::vector<int64_t> x_dims;
  QCN_RETURN_IF_ERROR(describe(x, x_type, x_dims));
  if (x_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || x_dims.empty() || x_dims.back() != kern.k)
    return fail("MatMulFp4: X must be float [..., " + std::to_string(kern.k) + "], got " + dims_str(x_dims));
  const int64_t kp = qcn::padded_k(kern.k, kern.block_size);
  QCN_RETURN_IF_ERROR(expect(w, "W", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {kern.n, kp / 2}));
  QCN_RETURN_IF_ERROR(expect(s, "S", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {kern.n, kp / kern.block_size}));

  float tensor_scale = 1.0f;
  if (t != nullptr) {
    QCN_RETURN_IF_ERROR(expect(t, "T", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {1}));
    tensor_scale = *static_cast<const float*>(data(t));
  }
  float act_scale = 1.0f;
  if (at != nullptr) {
    ONNXTensorElementDataType at_type;
    std::vector<int64_t> at_dims;
    QCN_RETURN_IF_ERROR(describe(at, at_type, at_dims));
    if (at_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || at_dims.size() > 1 || (at_dims.size() == 1 && at_dims[0] != 1))
      return fail("MatMulFp4: A_T must be a float scalar or [1], got " + dims_str(at_dims));
    act_scale = *static_cast<const float*>(data(at));
  }

  int64_t m = 1;
  for (size_t i = 0; i + 1 < x_dims.size(); ++i) m *= x_dims[i];
  std::vector<int64_t> y_dims(x_dims);
  y_dims.back() = kern.n;
  OrtValue* y = nullptr;
  QCN_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(ctx, 0, y_dims.data(), y_dims.size(), &y));
  if (m == 0) return nullptr;

  const void *xd = data(x), *wd = data(w), *sd = data(s);
  void* yd = nullptr;
  QCN_RETURN_IF_ERROR(g_api->GetTensorMutableData(y, &yd));

  float lut[256];
  qcn::build_scale_lut(kern.scale_type, tensor_scale, lut);
  const qcn::Fp4Weight weight{static_cast<const uint8_t*>(wd), static_cast<const uint8_t*>(sd), kern.k, kern.n,
                              kern.block_size, lut, kern.scale_type, tensor_scale};
  const float* xf = static_cast<const float*>(xd);
  qcn::matmul_fp4(xf, m, weight, kern.act, act_scale, static_cast<float*>(yd));
  return nullptr;
}

// --- OrtCustomOp callbacks --------------------------------------------------------------------

OrtStatusPtr ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info,
                                        void** kernel) {
  try {
    Kernel kern{};
    QCN_RETURN_IF_ERROR(read_attributes(info, kern));
    *kernel = new Kernel(kern);
    return nullptr;
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_FAIL, e.what());
  }
}

OrtStatusPtr ORT_API_CALL kernel_compute(void* kernel, OrtKernelContext* ctx) {
  try {
    return compute(*static_cast<const Kernel*>(kernel), ctx);
  } catch (const std::bad_alloc&) {
    return g_api->CreateStatus(ORT_FAIL, "MatMulFp4: out of memory");
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_FAIL, e.what());
  }
}

void ORT_API_CALL kernel_destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }
const char* ORT_API_CALL op_name(const OrtCustomOp*) { return kOpName; }
const char* ORT_API_CALL op_provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return 5; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }

ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t index) {
  return index == 1 || index == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_characteristic(const OrtCustomOp*, size_t index) {
  return index >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_characteristic(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}

OrtMemType ORT_API_CALL input_memory_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL min_arity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL homogeneity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return 1; }

OrtCustomOp make_op() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = ORT_API_VERSION;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = kernel_destroy;
  op.GetInputCharacteristic = input_characteristic;
  op.GetOutputCharacteristic = output_characteristic;
  op.GetInputMemoryType = input_memory_type;
  op.GetVariadicInputMinArity = min_arity;
  op.GetVariadicInputHomogeneity = homogeneity;
  op.GetVariadicOutputMinArity = min_arity;
  op.GetVariadicOutputHomogeneity = homogeneity;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = kernel_compute;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  return op;
}

const OrtCustomOp g_op = make_op();

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
  QCN_RETURN_IF_ERROR(api->CustomOpDomain_Add(domain, &g_op));
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
