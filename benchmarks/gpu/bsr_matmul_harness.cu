// Standalone check and benchmark of the CUDA BSR kernels, without TensorFlow
// (which the GPU machines do not have). Builds the same kernel source the op
// library uses (ops/bsr_matmul_gpu_kernels.cu), validates the structure with
// the same header (ops/bsr_structure.h), checks every product against a
// host reference, and times x @ W against cuBLAS dense SGEMM.
//
// cuBLAS is opened with dlopen so that this file compiles where only the
// CUDA runtime is installed (CI); set TFBS_CUBLAS to the library's path.
//
// Usage: bsr_matmul_harness [--quick] [--json PATH]
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../../ops/bsr_matmul_gpu_kernels.h"
#include "../../ops/bsr_structure.h"

namespace {

#define CHECK_CUDA(expr)                                                   \
  do {                                                                     \
    cudaError_t err_ = (expr);                                             \
    if (err_ != cudaSuccess) {                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr,   \
                   cudaGetErrorString(err_));                              \
      std::exit(2);                                                        \
    }                                                                      \
  } while (0)

// The three cuBLAS entry points used, resolved at run time.
struct Cublas {
  typedef int (*CreateFn)(void**);
  typedef int (*SgemmFn)(void*, int, int, int, int, int, const float*,
                         const float*, int, const float*, int, const float*,
                         float*, int);
  CreateFn create = nullptr;
  SgemmFn sgemm = nullptr;
  void* handle = nullptr;

  bool Open() {
    const char* names[] = {getenv("TFBS_CUBLAS"), "libcublas.so",
                           "libcublas.so.13", "libcublas.so.12"};
    for (const char* name : names) {
      if (!name) continue;
      void* lib = dlopen(name, RTLD_NOW);
      if (!lib) continue;
      create = reinterpret_cast<CreateFn>(dlsym(lib, "cublasCreate_v2"));
      sgemm = reinterpret_cast<SgemmFn>(dlsym(lib, "cublasSgemm_v2"));
      if (create && sgemm && create(&handle) == 0) return true;
    }
    return false;
  }

  // Row-major y[m, n] = x[m, k] @ w[k, n], as column-major y^T = w^T x^T.
  void Matmul(const float* x, const float* w, float* y, int m, int k, int n) {
    const float one = 1.0f, zero = 0.0f;
    sgemm(handle, 0, 0, n, m, k, &one, w, n, x, k, &zero, y, n);
  }
};

struct Bsr {
  int64_t k, n, bh, bw;
  std::vector<int32_t> row_ptr, cols;
  std::vector<float> values, dense;
};

Bsr RandomBsr(int64_t k, int64_t n, int64_t bh, int64_t bw, double sparsity,
              std::mt19937* rng) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::uniform_real_distribution<double> coin(0., 1.);
  Bsr b{k, n, bh, bw, {0}, {}, {}, std::vector<float>(k * n, 0.f)};
  const int64_t nbr = tfbs::CeilDiv(k, bh), nbc = tfbs::CeilDiv(n, bw);
  for (int64_t i = 0; i < nbr; ++i) {
    for (int64_t j = 0; j < nbc; ++j) {
      if (coin(*rng) < sparsity) continue;
      b.cols.push_back(static_cast<int32_t>(j));
      for (int64_t r = 0; r < bh; ++r) {
        for (int64_t c = 0; c < bw; ++c) {
          const int64_t row = i * bh + r, col = j * bw + c;
          const float v = (row < k && col < n) ? u(*rng) : 0.f;
          b.values.push_back(v);
          if (row < k && col < n) b.dense[row * n + col] = v;
        }
      }
    }
    b.row_ptr.push_back(static_cast<int32_t>(b.cols.size()));
  }
  return b;
}

template <typename T>
T* Upload(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * sizeof(T)));
  if (!h.empty())
    CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
std::vector<T> Download(const T* d, size_t n) {
  std::vector<T> h(n);
  if (n) CHECK_CUDA(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

double MaxRelError(const std::vector<float>& got, const std::vector<double>& want) {
  double scale = 1e-6, err = 0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < got.size(); ++i)
    err = std::max(err, std::fabs(got[i] - want[i]) / scale);
  return err;
}

// Device copies of one matrix and its per-call indices.
struct DeviceBsr {
  float* values;
  float* values_t;
  int32_t *col_ptr, *block_ids, *block_rows, *row_ptr, *cols;
};

DeviceBsr Prepare(const Bsr& b) {
  tfbs::BsrGeometry geo;
  const std::string err = tfbs::ValidateBsr(
      b.k, b.n, b.bh, b.bw, static_cast<int64_t>(b.cols.size()), b.cols.data(),
      static_cast<int64_t>(b.cols.size()), b.row_ptr.data(),
      static_cast<int64_t>(b.row_ptr.size()), &geo);
  if (!err.empty()) {
    std::fprintf(stderr, "invalid BSR: %s\n", err.c_str());
    std::exit(2);
  }
  tfbs::BsrColumnIndex index;
  tfbs::BuildColumnIndex(geo, b.cols.data(), b.row_ptr.data(), &index);
  std::vector<int32_t> block_row(b.cols.size());
  for (size_t i = 0; i + 1 < b.row_ptr.size(); ++i)
    for (int32_t p = b.row_ptr[i]; p < b.row_ptr[i + 1]; ++p) block_row[p] = i;
  DeviceBsr d;
  d.values = Upload(b.values);
  CHECK_CUDA(cudaMalloc(&d.values_t, std::max<size_t>(b.values.size(), 1) * sizeof(float)));
  d.col_ptr = Upload(index.col_ptr);
  d.block_ids = Upload(index.block_ids);
  d.block_rows = Upload(block_row);
  d.row_ptr = Upload(b.row_ptr);
  d.cols = Upload(b.cols);
  return d;
}

tfbs::gpu::GroupedProductArgs<float> ForwardArgs(const Bsr& b, const DeviceBsr& d,
                                                 const float* x, float* y) {
  tfbs::gpu::GroupedProductArgs<float> a;
  a.in = x;
  a.in_cols = b.k;
  a.blocks = d.values;
  a.bi = static_cast<int>(b.bh);
  a.bo = static_cast<int>(b.bw);
  a.group_ptr = d.col_ptr;
  a.ids = d.block_ids;
  a.in_block = nullptr;  // set below from the column index's block rows
  a.out = y;
  a.out_cols = b.n;
  return a;
}

// Checks forward, transposed and values-gradient products on one case.
bool CheckCase(int64_t m, int64_t k, int64_t n, int64_t bh, int64_t bw,
               std::mt19937* rng) {
  Bsr b = RandomBsr(k, n, bh, bw, 0.6, rng);
  DeviceBsr d = Prepare(b);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> x(m * k), dy(m * n);
  for (auto& v : x) v = u(*rng);
  for (auto& v : dy) v = u(*rng);
  float *dx_in = Upload(x), *ddy = Upload(dy), *y, *dx, *dv;
  CHECK_CUDA(cudaMalloc(&y, std::max<int64_t>(m * n, 1) * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&dx, std::max<int64_t>(m * k, 1) * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&dv, std::max<size_t>(b.values.size(), 1) * sizeof(float)));
  // Host references in double.
  std::vector<double> y_ref(m * n, 0.), dx_ref(m * k, 0.), dv_ref(b.values.size(), 0.);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < n; ++j) {
        y_ref[r * n + j] += double(x[r * k + i]) * b.dense[i * n + j];
        dx_ref[r * k + i] += double(dy[r * n + j]) * b.dense[i * n + j];
      }
  for (size_t i = 0; i + 1 < b.row_ptr.size(); ++i)
    for (int32_t p = b.row_ptr[i]; p < b.row_ptr[i + 1]; ++p)
      for (int64_t rr = 0; rr < bh; ++rr)
        for (int64_t cc = 0; cc < bw; ++cc) {
          const int64_t row = i * bh + rr, col = int64_t(b.cols[p]) * bw + cc;
          if (row >= k || col >= n) continue;
          double s = 0;
          for (int64_t r = 0; r < m; ++r) s += double(x[r * k + row]) * dy[r * n + col];
          dv_ref[p * bh * bw + rr * bw + cc] = s;
        }
  auto fwd = ForwardArgs(b, d, dx_in, y);
  fwd.in_block = d.block_rows;
  const int64_t nbr = tfbs::CeilDiv(k, bh), nbc = tfbs::CeilDiv(n, bw);
  bool ok = tfbs::gpu::LaunchGroupedProduct(fwd, nbc, m, nullptr) == 0;
  ok &= tfbs::gpu::LaunchTransposeBlocks(d.values, int(bh), int(bw),
                                         int64_t(b.cols.size()), d.values_t, nullptr) == 0;
  tfbs::gpu::GroupedProductArgs<float> tr;
  tr.in = ddy;
  tr.in_cols = n;
  tr.blocks = d.values_t;
  tr.bi = int(bw);
  tr.bo = int(bh);
  tr.group_ptr = d.row_ptr;
  tr.in_block = d.cols;
  tr.out = dx;
  tr.out_cols = k;
  ok &= tfbs::gpu::LaunchGroupedProduct(tr, nbr, m, nullptr) == 0;
  ok &= tfbs::gpu::LaunchValuesGrad(dx_in, ddy, m, k, n, int(bh), int(bw), d.block_rows,
                                    d.cols, int64_t(b.cols.size()), dv, nullptr) == 0;
  CHECK_CUDA(cudaDeviceSynchronize());
  const double e1 = MaxRelError(Download(y, m * n), y_ref);
  const double e2 = MaxRelError(Download(dx, m * k), dx_ref);
  const double e3 = MaxRelError(Download(dv, b.values.size()), dv_ref);
  ok &= e1 < 1e-5 && e2 < 1e-5 && e3 < 1e-5;
  std::printf("check m=%-4ld k=%-4ld n=%-4ld block=%ldx%ld  y %.1e  dx %.1e  dvalues %.1e  %s\n",
              long(m), long(k), long(n), long(bh), long(bw), e1, e2, e3, ok ? "ok" : "FAIL");
  return ok;
}

float TimeMs(const std::function<void()>& f, int reps) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f();
  CHECK_CUDA(cudaEventRecord(a));
  for (int i = 0; i < reps; ++i) f();
  CHECK_CUDA(cudaEventRecord(b));
  CHECK_CUDA(cudaEventSynchronize(b));
  float ms = 0;
  CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
  return ms / reps;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  const char* json_path = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json_path = argv[++i];
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: nothing to run\n");
    return 3;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::mt19937 rng(0);
  bool ok = true;
  // Correctness, including ragged edges and the generic (runtime) shape.
  const int64_t shapes[][5] = {{1, 64, 48, 16, 16}, {7, 50, 37, 16, 16}, {33, 33, 21, 4, 1},
                               {5, 40, 40, 1, 4},   {9, 30, 20, 3, 5},   {100, 64, 64, 8, 8},
                               {300, 96, 96, 32, 32}, {17, 17, 34, 16, 1}, {64, 37, 41, 4, 4}};
  for (const auto& s : shapes) ok &= CheckCase(s[0], s[1], s[2], s[3], s[4], &rng);

  Cublas cublas;
  const bool have_cublas = cublas.Open();
  if (!have_cublas) std::printf("cuBLAS not found (set TFBS_CUBLAS): timing ours only\n");
  std::vector<int64_t> sizes = quick ? std::vector<int64_t>{2048} : std::vector<int64_t>{1024, 2048, 4096};
  std::vector<int64_t> ms = {1, 16, 64, 256};
  std::vector<double> sparsities = quick ? std::vector<double>{0.9} : std::vector<double>{0.5, 0.8, 0.9, 0.95};
  std::vector<int64_t> blocks = quick ? std::vector<int64_t>{16} : std::vector<int64_t>{4, 8, 16, 32};
  std::string json = "{\"device\": \"" + std::string(prop.name) + "\", \"results\": [";
  bool first = true;
  std::printf("\n%-6s %-5s %-6s %-5s %12s %12s %8s\n", "K=N", "M", "sparse", "block",
              "cublas_ms", "bsr_ms", "speedup");
  for (int64_t size : sizes) {
    for (int64_t bs : blocks) {
      for (double sp : sparsities) {
        Bsr b = RandomBsr(size, size, bs, bs, sp, &rng);
        DeviceBsr d = Prepare(b);
        float* w = Upload(b.dense);
        for (int64_t m : ms) {
          std::vector<float> x(m * size, 0.5f);
          float* dxv = Upload(x);
          float *y1, *y2;
          CHECK_CUDA(cudaMalloc(&y1, m * size * sizeof(float)));
          CHECK_CUDA(cudaMalloc(&y2, m * size * sizeof(float)));
          auto fwd = ForwardArgs(b, d, dxv, y1);
          fwd.in_block = d.block_rows;
          const int64_t nbc = tfbs::CeilDiv(size, bs);
          const float t_bsr = TimeMs([&] { tfbs::gpu::LaunchGroupedProduct(fwd, nbc, m, nullptr); }, 50);
          float t_dense = NAN;
          if (have_cublas) {
            t_dense = TimeMs([&] { cublas.Matmul(dxv, w, y2, int(m), int(size), int(size)); }, 50);
            CHECK_CUDA(cudaDeviceSynchronize());
            std::vector<float> a = Download(y1, m * size), c = Download(y2, m * size);
            std::vector<double> cd(c.begin(), c.end());
            if (MaxRelError(a, cd) > 1e-4) {
              std::printf("MISMATCH vs cuBLAS at K=N=%ld M=%ld\n", long(size), long(m));
              ok = false;
            }
          }
          std::printf("%-6ld %-5ld %-6.2f %-5ld %12.4f %12.4f %7.2fx\n", long(size), long(m), sp,
                      long(bs), t_dense, t_bsr, t_dense / t_bsr);
          char row[256];
          std::snprintf(row, sizeof(row),
                        "%s{\"k\": %ld, \"n\": %ld, \"m\": %ld, \"sparsity\": %.2f, \"block\": %ld, "
                        "\"cublas_ms\": %.5f, \"bsr_ms\": %.5f}",
                        first ? "" : ", ", long(size), long(size), long(m), sp, long(bs),
                        have_cublas ? t_dense : -1.0, t_bsr);
          json += row;
          first = false;
          cudaFree(dxv);
          cudaFree(y1);
          cudaFree(y2);
        }
        cudaFree(w);
      }
    }
  }
  json += "], \"checks_passed\": " + std::string(ok ? "true" : "false") + "}\n";
  if (json_path) {
    FILE* f = std::fopen(json_path, "w");
    if (f) {
      std::fputs(json.c_str(), f);
      std::fclose(f);
    }
  }
  std::printf("%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
