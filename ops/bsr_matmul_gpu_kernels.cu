// CUDA kernels of the BSR products (see bsr_matmul_gpu_kernels.h).
//
// One thread block computes one output block column (a group) for a tile
// of dense rows: for every stored block of the group it stages the block
// and the matching slice of the dense rows in shared memory, and each
// thread accumulates its output elements in registers. Output tiles are
// owned by exactly one thread block, so there are no atomics and results
// are deterministic. Block shapes are template parameters (0 = runtime),
// dispatched in one place, LaunchGroupedProduct.
#include <cuda_runtime.h>

#include <algorithm>

#include "bsr_matmul_gpu_kernels.h"

namespace tfbs {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerThread = 4;
// Shared memory per thread block, below the 48 KB every device allows
// without opting in.
constexpr int64_t kSharedBytes = 40 * 1024;

template <typename T, int BI, int BO>
__global__ void GroupedProductKernel(GroupedProductArgs<T> a, int64_t m,
                                     int rows_per_tile) {
  const int bi = BI > 0 ? BI : a.bi;
  const int bo = BO > 0 ? BO : a.bo;
  extern __shared__ unsigned char smem_raw[];
  T* blk_s = reinterpret_cast<T*>(smem_raw);  // [bi][bo]
  T* in_s = blk_s + bi * bo;                  // [rows_per_tile][bi]
  const int64_t g = blockIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * rows_per_tile;
  const int o = threadIdx.x % bo;
  const int ty = threadIdx.x / bo;
  const int ty_count = blockDim.x / bo;
  T acc[kRowsPerThread];
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) acc[r] = T(0);
  for (int32_t p = a.group_ptr[g]; p < a.group_ptr[g + 1]; ++p) {
    const int64_t id = a.ids ? a.ids[p] : p;
    const int64_t c0 = static_cast<int64_t>(a.in_block[p]) * bi;
    const T* blk = a.blocks + id * bi * bo;
    for (int e = threadIdx.x; e < bi * bo; e += blockDim.x) blk_s[e] = blk[e];
    // Rows past m and columns past in_cols (the padded edge) read as zero.
    for (int e = threadIdx.x; e < rows_per_tile * bi; e += blockDim.x) {
      const int64_t row = m0 + e / bi;
      const int64_t col = c0 + e % bi;
      in_s[e] = (row < m && col < a.in_cols) ? a.in[row * a.in_cols + col] : T(0);
    }
    __syncthreads();
    if (ty < ty_count) {
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        const int local = ty + r * ty_count;
        if (local < rows_per_tile) {
          const T* xs = in_s + local * bi;
          T s = acc[r];
#pragma unroll 8
          for (int i = 0; i < bi; ++i) s += xs[i] * blk_s[i * bo + o];
          acc[r] = s;
        }
      }
    }
    __syncthreads();
  }
  const int64_t col = g * bo + o;
  if (ty >= ty_count || col >= a.out_cols) return;
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int local = ty + r * ty_count;
    const int64_t row = m0 + local;
    if (local < rows_per_tile && row < m) a.out[row * a.out_cols + col] = acc[r];
  }
}

template <typename T, int BI, int BO>
int Launch(const GroupedProductArgs<T>& a, int64_t num_groups, int64_t m,
           void* stream) {
  const int bo = BO > 0 ? BO : a.bo;
  const int bi = BI > 0 ? BI : a.bi;
  // Threads: bo output columns times ty row slots; each slot covers
  // kRowsPerThread rows, fewer slots when m is small, and few enough that the
  // staged block and input rows fit the shared memory budget.
  if (bo > kThreads) return static_cast<int>(cudaErrorInvalidConfiguration);
  const int64_t budget = kSharedBytes / static_cast<int64_t>(sizeof(T)) -
                         static_cast<int64_t>(bi) * bo;
  const int64_t max_slots = budget / (static_cast<int64_t>(bi) * kRowsPerThread);
  if (max_slots < 1) return static_cast<int>(cudaErrorInvalidConfiguration);
  const int ty = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({kThreads / bo, m, max_slots})));
  const int rows_per_tile = ty * kRowsPerThread;
  const int64_t row_tiles = (m + rows_per_tile - 1) / rows_per_tile;
  if (num_groups > 0x7fffffff || row_tiles > 65535) {
    return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  const dim3 grid(static_cast<unsigned>(num_groups), static_cast<unsigned>(row_tiles));
  const size_t smem = sizeof(T) * (static_cast<size_t>(bi) * bo +
                                   static_cast<size_t>(rows_per_tile) * bi);
  GroupedProductKernel<T, BI, BO>
      <<<grid, bo * ty, smem, static_cast<cudaStream_t>(stream)>>>(
          a, m, rows_per_tile);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
__global__ void ValuesGradKernel(const T* x, const T* dy, int64_t m, int64_t k,
                                 int64_t n, int bh, int bw,
                                 const int32_t* block_row,
                                 const int32_t* col_indices, T* dvalues) {
  const int64_t p = blockIdx.x;
  const int64_t r0 = static_cast<int64_t>(block_row[p]) * bh;
  const int64_t c0 = static_cast<int64_t>(col_indices[p]) * bw;
  for (int e = threadIdx.x; e < bh * bw; e += blockDim.x) {
    const int64_t row = r0 + e / bw;
    const int64_t col = c0 + e % bw;
    T s = T(0);
    if (row < k && col < n) {
      for (int64_t i = 0; i < m; ++i) s += x[i * k + row] * dy[i * n + col];
    }
    dvalues[p * bh * bw + e] = s;
  }
}

template <typename T>
__global__ void TransposeBlocksKernel(const T* blocks, int bh, int bw,
                                      int64_t total, T* out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t size = static_cast<int64_t>(bh) * bw;
  const int64_t p = e / size;
  const int i = static_cast<int>((e % size) / bw);
  const int o = static_cast<int>(e % bw);
  out[p * size + static_cast<int64_t>(o) * bh + i] = blocks[e];
}

}  // namespace

template <typename T>
int LaunchGroupedProduct(const GroupedProductArgs<T>& args, int64_t num_groups,
                         int64_t m, void* stream) {
  if (num_groups == 0 || m == 0) return 0;
  // The only place that maps a block shape to a specialised kernel.
#define TFBS_CASE(I, O) \
  if (args.bi == I && args.bo == O) return Launch<T, I, O>(args, num_groups, m, stream);
  TFBS_CASE(4, 4) TFBS_CASE(8, 8) TFBS_CASE(16, 16) TFBS_CASE(32, 32)
  TFBS_CASE(4, 1) TFBS_CASE(16, 1) TFBS_CASE(1, 4) TFBS_CASE(1, 16)
#undef TFBS_CASE
  return Launch<T, 0, 0>(args, num_groups, m, stream);
}

template <typename T>
int LaunchValuesGrad(const T* x, const T* dy, int64_t m, int64_t k, int64_t n,
                     int bh, int bw, const int32_t* block_row,
                     const int32_t* col_indices, int64_t nnzb, T* dvalues,
                     void* stream) {
  if (nnzb == 0) return 0;
  const int threads = std::min(kThreads, bh * bw);
  ValuesGradKernel<T><<<static_cast<unsigned>(nnzb), threads, 0,
                        static_cast<cudaStream_t>(stream)>>>(
      x, dy, m, k, n, bh, bw, block_row, col_indices, dvalues);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int LaunchTransposeBlocks(const T* blocks, int bh, int bw, int64_t nnzb, T* out,
                          void* stream) {
  const int64_t total = nnzb * bh * bw;
  if (total == 0) return 0;
  TransposeBlocksKernel<T><<<static_cast<unsigned>((total + kThreads - 1) / kThreads),
                             kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      blocks, bh, bw, total, out);
  return static_cast<int>(cudaGetLastError());
}

#define TFBS_INSTANTIATE(T)                                                    \
  template int LaunchGroupedProduct<T>(const GroupedProductArgs<T>&, int64_t,  \
                                       int64_t, void*);                        \
  template int LaunchValuesGrad<T>(const T*, const T*, int64_t, int64_t,       \
                                   int64_t, int, int, const int32_t*,          \
                                   const int32_t*, int64_t, T*, void*);        \
  template int LaunchTransposeBlocks<T>(const T*, int, int, int64_t, T*, void*);
TFBS_INSTANTIATE(float)
TFBS_INSTANTIATE(double)
#undef TFBS_INSTANTIATE

}  // namespace gpu
}  // namespace tfbs
