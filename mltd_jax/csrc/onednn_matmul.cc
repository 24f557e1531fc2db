// An XLA:CPU custom call (XLA FFI) computing out[b] = op(a[b]) @ op(c[b]) with oneDNN's matmul primitive, for the
// products XLA:CPU runs slowly: those whose left operand contracts its major axis (a weight gradient x^T g, which
// XLA:CPU gives to Eigen; oneDNN runs it on AMX for bfloat16 operands and with AVX-512 brgemm kernels in float32),
// and in float32 every product of the model (mltd_jax/matmul.py says which).
// Built by mltd_jax/onednn.py; see it for how it is used and why.
//
// a: [*batch, M, K] (or [*batch, K, M] with transpose_a), c: [*batch, K, N] (or [*batch, N, K] with transpose_b),
// both float32 or both bfloat16; out: [*batch, M, N] float32 (products summed in float32).
//
// Threads: the product is cut into pieces (batch entries, else rows or columns of the result), one per thread of
// XLA's intra-op pool, and each piece runs single-threaded oneDNN on the thread that takes it: the caller takes
// pieces too, so a piece no pool thread is free for runs on the caller. oneDNN's own OpenMP threads (the wheel is
// the gomp build) competed with XLA's, which runs independent thunks at once: the float32 second-order meta-step
// ran 0.86x as fast with every product on the kernel than with XLA's, and 1.04x faster with this split (session 15).
#include <oneapi/dnnl/dnnl.hpp>

#include <cstdint>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dt = dnnl::memory::data_type;

extern "C" void omp_set_num_threads(int);  // libgomp's (onednn.py links it)
extern "C" int omp_get_max_threads();

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// (batch, M, K, N, transpose_a, transpose_b, type, leading dimensions of a, c and out)
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool, int, int64_t, int64_t, int64_t>;

struct Product {
  dnnl::memory::desc a, c, out, scratch;
  dnnl::matmul prim;
};

// One primitive per shape and leading dimensions (a piece of a product keeps its whole's), made once (oneDNN
// picks and JIT-compiles its kernel when a primitive is made). Its scratchpad is ours (scratchpad_mode::user, a
// buffer per calling thread): in oneDNN's default mode every primitive
// shares one global scratchpad, and XLA:CPU runs independent thunks concurrently, so two products in flight at once
// overwrote each other's partial sums (tests/test_onednn.py's concurrent test failed that way).
const Product& Primitive(int64_t b, int64_t m, int64_t k, int64_t n, bool ta, bool tb, dt type, int64_t lda,
                         int64_t ldc, int64_t ldo) {
  static std::mutex mutex;
  static std::map<Key, Product> cache;
  const Key key{b, m, k, n, ta, tb, static_cast<int>(type), lda, ldc, ldo};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  using dims = dnnl::memory::dims;
  dnnl::memory::desc a({b, m, k}, type, ta ? dims{m * k, 1, lda} : dims{m * k, lda, 1});
  dnnl::memory::desc c({b, k, n}, type, tb ? dims{k * n, 1, ldc} : dims{k * n, ldc, 1});
  dnnl::memory::desc out({b, m, n}, dt::f32, dims{m * n, ldo, 1});
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

// A piece has at least this many FLOPs (so products below twice it run whole on the calling thread): 1.03x and
// 1.07x over pieces of at least 2 MFLOP in two A/Bs of the float32 meta-step on 2 cores
// (benchmarks/PERFORMANCE_LOG.md, session 15).
constexpr double kMinPieceFlops = 0.5e6;

// One product cut into `pieces`, taken by whichever threads come (the caller and the pool's): `next` hands out
// pieces, `done` counts finished ones. Shared (std::shared_ptr) since a pool task may start after the call returned.
struct Job {
  Job(int64_t b, int64_t m, int64_t k, int64_t n, bool ta, bool tb, dt type, const void* a, const void* c, void* out)
      : b(b), m(m), k(k), n(n), ta(ta), tb(tb), type(type), size(type == dt::f32 ? sizeof(float) : sizeof(uint16_t)),
        a(static_cast<const char*>(a)), c(static_cast<const char*>(c)), out(static_cast<float*>(out)) {}

  int64_t b, m, k, n;
  bool ta, tb;
  dt type;
  size_t size;  // bytes per operand element
  const char *a, *c;
  float* out;
  bool split_m = true;  // with b == 1: pieces of rows (else of columns) of the result
  int64_t step = 1;     // batch entries, rows or columns per piece
  int pieces = 1;
  std::atomic<int> next{0}, done{0};
  std::mutex mutex;
  std::string error;

  // One product: batch entries [b0, b0 + bb), result rows [m0, m0 + mm), columns [n0, n0 + nn).
  void Multiply(int64_t b0, int64_t bb, int64_t m0, int64_t mm, int64_t n0, int64_t nn) {
    const Product& p = Primitive(bb, mm, k, nn, ta, tb, type, ta ? m : k, tb ? k : n, n);
    const char* pa = a + (b0 * m * k + (ta ? m0 : m0 * k)) * size;
    const char* pc = c + (b0 * k * n + (tb ? n0 * k : n0)) * size;
    dnnl::memory am(p.a, Engine(), const_cast<char*>(pa));
    dnnl::memory cm(p.c, Engine(), const_cast<char*>(pc));
    dnnl::memory om(p.out, Engine(), out + b0 * m * n + m0 * n + n0);
    std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, cm}, {DNNL_ARG_DST, om}};
    if (const size_t bytes = p.scratch.get_size(); bytes > 0)
      args.emplace(DNNL_ARG_SCRATCHPAD, dnnl::memory(p.scratch, Engine(), Scratch(bytes)));
    dnnl::stream stream(Engine());
    p.prim.execute(stream, args);
    stream.wait();
  }

  void Piece(int i) {
    const int64_t lo = i * step;
    if (b > 1) {
      Multiply(lo, std::min(b, lo + step) - lo, 0, m, 0, n);
    } else if (split_m) {
      Multiply(0, 1, lo, std::min(m, lo + step) - lo, 0, n);
    } else {
      Multiply(0, 1, 0, m, lo, std::min(n, lo + step) - lo);
    }
  }

  // Takes pieces until none is left; oneDNN runs each on this thread alone (its OpenMP team size, restored after).
  void Work() {
    const int before = omp_get_max_threads();
    omp_set_num_threads(1);
    for (int i; (i = next.fetch_add(1, std::memory_order_relaxed)) < pieces;) {
      try {
        Piece(i);
      } catch (const std::exception& e) {  // dnnl::error, std::bad_alloc: reported by the caller
        Fail(e.what());
      } catch (...) {
        Fail("unknown exception");
      }
      done.fetch_add(1, std::memory_order_release);
    }
    omp_set_num_threads(before);
  }

  void Fail(const char* what) {
    std::lock_guard<std::mutex> lock(mutex);
    error = what;
  }
};

ffi::Error Matmul(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer c, ffi::Result<ffi::Buffer<ffi::F32>> out,
                  bool transpose_a, bool transpose_b) {
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
  std::shared_ptr<Job> job;
  try {
    job = std::make_shared<Job>(b, m, k, n, transpose_a, transpose_b, type, a.untyped_data(), c.untyped_data(),
                                out->untyped_data());
  } catch (const std::exception& e) {  // never through XLA's C interface
    return ffi::Error::Internal(std::string("onednn_matmul: ") + e.what());
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const double flops = 2.0 * b * m * n * k;
  const int64_t wanted = std::clamp<int64_t>(static_cast<int64_t>(flops / kMinPieceFlops), 1, threads);
  if (b > 1) {
    job->step = (b + wanted - 1) / wanted;
    job->pieces = static_cast<int>((b + job->step - 1) / job->step);
  } else {
    job->split_m = m >= n;
    const int64_t length = job->split_m ? m : n;
    job->step = ((length + wanted - 1) / wanted + 15) / 16 * 16;  // whole 16-wide blocks of the kernels
    job->pieces = static_cast<int>((length + job->step - 1) / job->step);
  }
  try {
    for (int t = 1; t < job->pieces; ++t) pool.Schedule([job] { job->Work(); });
  } catch (...) {  // a task not scheduled (std::bad_alloc): the caller takes its pieces
  }
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->pieces) std::this_thread::yield();
  if (!job->error.empty()) return ffi::Error::Internal("onednn_matmul: " + job->error);
  return ffi::Error::Success();
}

// An identity whose result aliases its operand (mltd_jax/onednn.py asks XLA for input_output_aliases): nothing to do
// but a copy where XLA gave it another buffer. XLA:CPU fuses no custom call, so a value passed through it is computed
// once into a buffer of its own instead of being recomputed inside each consumer's fusion (onednn.py says where).
ffi::Error Materialize(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out) {
  if (x.untyped_data() != out->untyped_data())
    std::memcpy(out->untyped_data(), x.untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MltdOnednnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MltdMaterialize, Materialize,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
