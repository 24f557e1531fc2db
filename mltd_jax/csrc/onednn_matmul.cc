// An XLA:CPU custom call (XLA FFI) computing out[b] = op(a[b]) @ op(c[b]) with oneDNN's matmul primitive, for the
// products XLA:CPU runs slowly: those whose left operand contracts its major axis (a weight gradient x^T g, which
// XLA:CPU gives to Eigen; oneDNN runs it on AMX for bfloat16 operands and with AVX-512 brgemm kernels in float32).
// Built by mltd_jax/onednn.py; see it for how it is used and why.
//
// a: [*batch, M, K] (or [*batch, K, M] with transpose_a), c: [*batch, K, N] (or [*batch, N, K] with transpose_b),
// both float32 or both bfloat16; out: [*batch, M, N] float32 (products summed in float32).
#include <oneapi/dnnl/dnnl.hpp>

#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool, int>;

struct Product {
  dnnl::memory::desc a, c, out, scratch;
  dnnl::matmul prim;
};

// One primitive per shape, made once (oneDNN picks and JIT-compiles its kernel when a primitive is made). Its
// scratchpad is ours (scratchpad_mode::user, a buffer per calling thread): in oneDNN's default mode every primitive
// shares one global scratchpad, and XLA:CPU runs independent thunks concurrently, so two products in flight at once
// overwrote each other's partial sums (tests/test_onednn.py's concurrent test failed that way).
const Product& Primitive(int64_t b, int64_t m, int64_t k, int64_t n, bool ta, bool tb, dt type) {
  static std::mutex mutex;
  static std::map<Key, Product> cache;
  const Key key{b, m, k, n, ta, tb, static_cast<int>(type)};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  using dims = dnnl::memory::dims;
  dnnl::memory::desc a({b, m, k}, type, ta ? dims{m * k, 1, m} : dims{m * k, k, 1});
  dnnl::memory::desc c({b, k, n}, type, tb ? dims{k * n, 1, k} : dims{k * n, n, 1});
  dnnl::memory::desc out({b, m, n}, dt::f32, dims{m * n, n, 1});
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::matmul::primitive_desc pd(Engine(), a, c, out, attr);
  return cache.emplace(key, Product{a, c, out, pd.scratchpad_desc(), dnnl::matmul(pd)}).first->second;
}

// This thread's scratchpad, at least `bytes` long and 64-byte aligned; grown, never shrunk.
void* Scratch(size_t bytes) {
  constexpr size_t kAlign = 64;
  thread_local std::unique_ptr<char[]> buffer;
  thread_local size_t size = 0;
  if (bytes > size) {
    buffer.reset(new char[bytes + kAlign]);
    size = bytes;
  }
  const auto base = reinterpret_cast<std::uintptr_t>(buffer.get());
  return reinterpret_cast<void*>((base + kAlign - 1) / kAlign * kAlign);
}

ffi::Error Matmul(ffi::AnyBuffer a, ffi::AnyBuffer c, ffi::Result<ffi::Buffer<ffi::F32>> out, bool transpose_a,
                  bool transpose_b) {
  const auto ad = a.dimensions(), cd = c.dimensions();
  const size_t rank = ad.size();
  if (rank < 2 || cd.size() != rank || out->dimensions().size() != rank)
    return ffi::Error::InvalidArgument("onednn_matmul: operands need equal ranks of 2 or more");
  if (a.element_type() != c.element_type())
    return ffi::Error::InvalidArgument("onednn_matmul: operands need one element type");
  dt type;
  if (a.element_type() == ffi::DataType::F32) {
    type = dt::f32;
  } else if (a.element_type() == ffi::DataType::BF16) {
    type = dt::bf16;
  } else {
    return ffi::Error::InvalidArgument("onednn_matmul: operands must be float32 or bfloat16");
  }
  int64_t b = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (ad[i] != cd[i]) return ffi::Error::InvalidArgument("onednn_matmul: unequal batch axes");
    b *= ad[i];
  }
  const int64_t m = transpose_a ? ad[rank - 1] : ad[rank - 2];
  const int64_t k = transpose_a ? ad[rank - 2] : ad[rank - 1];
  const int64_t kc = transpose_b ? cd[rank - 1] : cd[rank - 2];
  const int64_t n = transpose_b ? cd[rank - 2] : cd[rank - 1];
  const auto od = out->dimensions();
  bool agree = k == kc && od[rank - 2] == m && od[rank - 1] == n;
  for (size_t i = 0; i + 2 < rank; ++i) agree = agree && od[i] == ad[i];
  if (!agree) return ffi::Error::InvalidArgument("onednn_matmul: operand and result shapes disagree");
  if (b == 0 || m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum: oneDNN would leave the result unwritten
    std::memset(out->untyped_data(), 0, sizeof(float) * b * m * n);
    return ffi::Error::Success();
  }
  try {
    const Product& p = Primitive(b, m, k, n, transpose_a, transpose_b, type);
    dnnl::memory am(p.a, Engine(), a.untyped_data());
    dnnl::memory cm(p.c, Engine(), c.untyped_data());
    dnnl::memory om(p.out, Engine(), out->untyped_data());
    std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, cm}, {DNNL_ARG_DST, om}};
    if (const size_t bytes = p.scratch.get_size(); bytes > 0)
      args.emplace(DNNL_ARG_SCRATCHPAD, dnnl::memory(p.scratch, Engine(), Scratch(bytes)));
    dnnl::stream stream(Engine());
    p.prim.execute(stream, args);
    stream.wait();
  } catch (const std::exception& e) {  // dnnl::error, std::bad_alloc: never through XLA's C interface
    return ffi::Error::Internal(std::string("onednn_matmul: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MltdOnednnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
