// CUDA launchers of the BSR products. Plain C++ interface (the stream is a
// void* cudaStream_t) so that TensorFlow-side code and the standalone GPU
// harness (benchmarks/gpu) call exactly the same kernels without sharing
// headers.
#ifndef TF_BLOCKSPARSE_OPS_BSR_MATMUL_GPU_KERNELS_H_
#define TF_BLOCKSPARSE_OPS_BSR_MATMUL_GPU_KERNELS_H_

#include <cstdint>

namespace tfbs {
namespace gpu {

// Device-side version of GroupedProductArgs (bsr_matmul_cpu_kernels.h):
// out[m, g*bo : +bo] = sum_p in[m, in_block[p]*bi : +bi] @ blocks[id(p)],
// with in row-major [m, in_cols] and out row-major [m, out_cols]. All
// pointers are device pointers; ids may be null (identity).
template <typename T>
struct GroupedProductArgs {
  const T* in = nullptr;
  int64_t in_cols = 0;
  const T* blocks = nullptr;
  int bi = 0;
  int bo = 0;
  const int32_t* group_ptr = nullptr;
  const int32_t* ids = nullptr;
  const int32_t* in_block = nullptr;
  T* out = nullptr;
  int64_t out_cols = 0;
};

// Each returns 0 on success or the cudaError_t of the launch.
template <typename T>
int LaunchGroupedProduct(const GroupedProductArgs<T>& args, int64_t num_groups,
                         int64_t m, void* stream);

// dvalues[p] = x[:, row(p) block]^T @ dy[:, col(p) block], zero in padding.
template <typename T>
int LaunchValuesGrad(const T* x, const T* dy, int64_t m, int64_t k, int64_t n,
                     int bh, int bw, const int32_t* block_row,
                     const int32_t* col_indices, int64_t nnzb, T* dvalues,
                     void* stream);

// out[p] = blocks[p]^T for every block.
template <typename T>
int LaunchTransposeBlocks(const T* blocks, int bh, int bw, int64_t nnzb, T* out,
                          void* stream);

}  // namespace gpu
}  // namespace tfbs

#endif  // TF_BLOCKSPARSE_OPS_BSR_MATMUL_GPU_KERNELS_H_
