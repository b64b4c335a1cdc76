// CPU compute kernels of the BSR matmul ops, free of TensorFlow includes so
// that this translation unit can be compiled with -O3 -march=native without
// changing the ABI of anything TensorFlow sees (Eigen's alignment, for one).
#ifndef TF_BLOCKSPARSE_OPS_BSR_MATMUL_CPU_KERNELS_H_
#define TF_BLOCKSPARSE_OPS_BSR_MATMUL_CPU_KERNELS_H_

#include <cstdint>

namespace tfbs {

// out[m, g*bo : g*bo+bo] = sum over p in [group_ptr[g], group_ptr[g+1]) of
//     in[m, in_block[p]*bi : +bi] @ blocks[id(p)]      (blocks are [bi, bo])
// with id(p) = ids[p], or p when ids is null. Reads and writes are clipped
// to in_cols / out_cols, so padded edge blocks never touch memory outside
// the dense operands.
//
// x @ W uses it with groups = block columns of W (the per-call column
// index), dy @ W^T with groups = block rows of W and transposed blocks.
//
// Element (m, c) of `in` is read at in[(c / bi) * in_block_stride +
// m * in_row_stride + c % bi], which covers both a row-major [m, in_cols]
// operand (in_block_stride = bi, in_row_stride = in_cols) and one packed
// by PackBlockColumns (contiguous rows within each input block).
template <typename T>
struct GroupedProductArgs {
  const T* in = nullptr;
  int64_t in_cols = 0;
  int64_t in_row_stride = 0;
  int64_t in_block_stride = 0;
  const T* blocks = nullptr;
  int64_t bi = 0;
  int64_t bo = 0;
  const int32_t* group_ptr = nullptr;
  const int32_t* ids = nullptr;
  const int32_t* in_block = nullptr;
  T* out = nullptr;
  int64_t out_cols = 0;
};

// Computes groups [g_begin, g_end) for dense rows [m_begin, m_end).
template <typename T>
void GroupedBlockProduct(const GroupedProductArgs<T>& args, int64_t g_begin,
                         int64_t g_end, int64_t m_begin, int64_t m_end);

// dvalues[p] = x[:, row(p)*bh : +bh]^T @ dy[:, col(p)*bw : +bw] for p in
// [p_begin, p_end); the padded part of an edge block gets a zero gradient.
template <typename T>
struct ValuesGradArgs {
  const T* x = nullptr;   // [m, k]
  const T* dy = nullptr;  // [m, n]
  int64_t m = 0, k = 0, n = 0, bh = 0, bw = 0;
  const int32_t* block_row = nullptr;  // [nnzb], row of each block
  const int32_t* col_indices = nullptr;
  T* dvalues = nullptr;  // [nnzb, bh, bw]
};

template <typename T>
void BsrValuesGrad(const ValuesGradArgs<T>& args, int64_t p_begin,
                   int64_t p_end);

// Packs row-major in [m, cols] into [ceil(cols / bi), m, bi], zero padding
// the last block, for input blocks [b_begin, b_end). A block of rows is
// then contiguous, which the hardware prefetcher follows; reading the
// row-major operand instead jumps a whole row per dense row.
template <typename T>
void PackBlockColumns(const T* in, int64_t m, int64_t cols, int64_t bi, T* out,
                      int64_t b_begin, int64_t b_end);

// Transposes every block: out[p] = blocks[p]^T, for p in [p_begin, p_end).
template <typename T>
void TransposeBlocks(const T* blocks, int64_t bh, int64_t bw, T* out,
                     int64_t p_begin, int64_t p_end);

}  // namespace tfbs

#endif  // TF_BLOCKSPARSE_OPS_BSR_MATMUL_CPU_KERNELS_H_
