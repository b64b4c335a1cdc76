// CPU compute kernels of the BSR matmul ops, free of TensorFlow includes.
//
// The arithmetic (bsr_matmul_cpu_kernels.cc) is compiled once per
// instruction set (cpu_isa.h) into namespaces tfbs::isa_baseline,
// tfbs::isa_avx2, tfbs::isa_avx512; each fills one CpuKernels<T> table, and
// the OpKernels take the table of the ISA chosen at run time
// (cpu_dispatch.h), once per call, so that every step of one call runs the
// same path.
#ifndef TF_BLOCKSPARSE_OPS_BSR_MATMUL_CPU_KERNELS_H_
#define TF_BLOCKSPARSE_OPS_BSR_MATMUL_CPU_KERNELS_H_

#include <cstdint>

namespace tfbs {

// out[m, g*bo : g*bo+bo] = sum over p in [group_ptr[g], group_ptr[g+1]) of
//     in[m, in_block[p]*bi : +bi] @ Wp                 (Wp is [bi, bo])
// where Wp[i][o] = blocks[id(p) * block_elems + i * w_row + o * w_col] and
// id(p) = ids[p], or p when ids is null. Reads and writes are clipped to
// in_cols / out_cols, so the padding of edge blocks is never read or
// written (it may hold anything).
//
// x @ W uses it with groups = block columns of W (the column index of the
// layout), w_row = bw, w_col = 1; dy @ W^T with groups = block rows of W and
// the stored blocks read transposed: w_row = 1, w_col = bw.
//
// Two dense-operand layouts:
// - row tiles (RowProduct): element (m, c) of `in` at in[(c / bi) *
//   in_block_stride + m * in_row_stride + c % bi]; vectors run along the
//   block's output columns, so it needs w_col == 1.
// - panels (PanelProduct): `in` packed by PackPanels into panels of
//   `lanes` rows, [ceil(m / lanes), in_cols, lanes]; vectors run along the
//   rows m, so every block shape (4x4, 16x1, ...) fills whole vectors and
//   transposed blocks need no copy.
template <typename T>
struct GroupedProductArgs {
  const T* in = nullptr;
  int64_t m = 0;  // rows of the dense operand (panels: to clip the output)
  int64_t in_cols = 0;
  int64_t in_row_stride = 0;
  int64_t in_block_stride = 0;
  const T* blocks = nullptr;
  int64_t bi = 0;
  int64_t bo = 0;
  int64_t block_elems = 0;
  int64_t w_row = 0;
  int64_t w_col = 1;
  const int32_t* group_ptr = nullptr;
  const int32_t* ids = nullptr;
  const int32_t* in_block = nullptr;
  T* out = nullptr;
  int64_t out_cols = 0;
};

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

// x @ W for few dense rows, in storage order: for each block row r in
// [r_begin, r_end) and each of its blocks p,
//     out[:, col_indices[p]*bw : +bw] += in[:, r*bh : +bh] @ blocks[p]
// with out [m, out_stride] (out_stride >= number of block columns * bw: the
// columns of a right edge block past n land in padding the caller drops;
// rows of a bottom edge block past k are not read). The blocks stream in
// the order they are stored, where grouping by block column jumps a block
// row between blocks; each thread accumulates into its own `out`.
template <typename T>
struct ScatterArgs {
  const T* in = nullptr;  // [m, k] row-major
  int64_t m = 0, k = 0, bh = 0, bw = 0;
  const T* blocks = nullptr;
  const int32_t* row_ptr = nullptr;
  const int32_t* col_indices = nullptr;
  T* out = nullptr;
  int64_t out_stride = 0;
};

// Which kernel a product of this shape takes, from the ISA's tile table.
struct ProductPlan {
  bool scatter = false;  // ScatterProduct (x @ W only), else as below
  bool gather = false;   // GatherProduct (dy @ W^T only), else as below;
                         // lanes: its vector width
  bool panels = false;  // PanelProduct, else RowProduct
  int64_t lanes = 1;    // panel height (rows per vector) when panels
  int64_t tile_panels = 1;  // panels per register tile: work units of a
                            // multiple of it leave no odd tail
  bool pack_rows = false;  // RowProduct: pack the operand by block columns
};

// One ISA's kernels. Ranges: groups [g_begin, g_end), rows [m_begin, m_end)
// (RowProduct) or panels [q_begin, q_end) (PanelProduct), blocks
// [p_begin, p_end), input blocks / panels [b_begin, b_end).
template <typename T>
struct CpuKernels {
  const char* isa_name;
  ProductPlan (*plan)(int64_t m, int64_t bi, int64_t bo, bool transposed);
  void (*row_product)(const GroupedProductArgs<T>& args, int64_t g_begin,
                      int64_t g_end, int64_t m_begin, int64_t m_end);
  void (*panel_product)(const GroupedProductArgs<T>& args, int64_t g_begin,
                        int64_t g_end, int64_t q_begin, int64_t q_end);
  // Packs row-major in [m, cols] into [ceil(cols / bi), m, bi], zero
  // padding the last block (contiguous rows within each input block).
  void (*pack_block_columns)(const T* in, int64_t m, int64_t cols, int64_t bi,
                             T* out, int64_t b_begin, int64_t b_end);
  // Packs row-major in [m, cols] into panels [ceil(m / lanes), cols, lanes]
  // of this ISA's vector width (ProductPlan::lanes), rows past m zero.
  void (*pack_panels)(const T* in, int64_t m, int64_t cols, T* out,
                      int64_t b_begin, int64_t b_end);
  void (*transpose_blocks)(const T* blocks, int64_t bh, int64_t bw, T* out,
                           int64_t p_begin, int64_t p_end);
  void (*values_grad)(const ValuesGradArgs<T>& args, int64_t p_begin,
                      int64_t p_end);
  void (*scatter_product)(const ScatterArgs<T>& args, int64_t r_begin,
                          int64_t r_end);
  // dy @ W^T for a few dense rows (plan.gather), groups = block rows
  // [g_begin, g_end) of W, the blocks read in storage order, untransposed
  // (GroupedProductArgs as for the transposed product; in_row_stride and
  // the packing are not used).
  void (*gather_product)(const GroupedProductArgs<T>& args, int64_t g_begin,
                         int64_t g_end);
  // Its dense operand when a block row is narrower than a vector:
  // out[c][r][l] = in[r][c * seg + l % seg] (zero past cols), l < lanes.
  void (*repeat_segments)(const T* in, int64_t m, int64_t cols, int64_t seg,
                          int64_t lanes, T* out);
};

#define TFBS_DECLARE_MATMUL_KERNELS(ns)        \
  namespace ns {                               \
  template <typename T>                        \
  const CpuKernels<T>& MatmulKernels();        \
  }
TFBS_DECLARE_MATMUL_KERNELS(isa_baseline)
TFBS_DECLARE_MATMUL_KERNELS(isa_avx2)
TFBS_DECLARE_MATMUL_KERNELS(isa_avx512)
#undef TFBS_DECLARE_MATMUL_KERNELS

}  // namespace tfbs

#endif  // TF_BLOCKSPARSE_OPS_BSR_MATMUL_CPU_KERNELS_H_
