// Validation of a block-compressed-sparse-row (BSR) structure and the
// per-call column index used by the "x @ W" kernels.
//
// Header-only and free of TensorFlow includes on purpose: the TF op kernels,
// the CUDA launcher and the standalone GPU harness all validate with exactly
// this code, so a malformed matrix is rejected the same way everywhere.
#ifndef TF_BLOCKSPARSE_OPS_BSR_STRUCTURE_H_
#define TF_BLOCKSPARSE_OPS_BSR_STRUCTURE_H_

#include <cstdint>
#include <string>
#include <vector>

namespace tfbs {

// Geometry of one BSR product. W is [k, n] stored in blocks of [bh, bw];
// the edge blocks are zero padded, so nbr = ceil(k / bh), nbc = ceil(n / bw).
struct BsrGeometry {
  int64_t m = 0;     // rows of the dense operand
  int64_t k = 0;     // rows of W
  int64_t n = 0;     // columns of W
  int64_t bh = 0;    // block height
  int64_t bw = 0;    // block width
  int64_t nbr = 0;   // block rows
  int64_t nbc = 0;   // block columns
  int64_t nnzb = 0;  // stored blocks
};

// The largest dense dimension (K, N) and block dimension (bh, bw) accepted:
// 2^30. Then the padded shape (ceil(K / bh) * bh < K + bh) and the block
// grid fit int32 (the block indices, and the int32 shapes that the pure-TF
// fallback's graph ops use, which stop at 2^31 - 2), and every derived size
// (block elements, gates * units) fits int64 whatever the input. The Python
// layer (tf_blocksparse/bsr/validation.py MAX_DIMENSION) checks the same
// bound with the same messages.
constexpr int64_t kMaxDimension = int64_t{1} << 30;

// ceil(a / b) for a >= 0 and b > 0, without the overflow of (a + b - 1) / b.
inline int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// *out = a * b; false (and *out untouched) when it overflows int64.
inline bool CheckedMul(int64_t a, int64_t b, int64_t* out) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return false;
  *out = r;
  return true;
}

// Checks the block shape and the index arrays against the dense shape.
// Returns an empty string when valid, else a message naming the problem.
// Every size is bounded (kMaxDimension) before anything is derived from it,
// so no computation here or in the kernels overflows, and the messages only
// format values that were read or computed without overflow. Reads
// row_ptr[0..nbr] and col_indices[0..nnzb) only after the sizes were
// checked, so a bad input can never cause an out-of-bounds read.
inline std::string ValidateBsr(int64_t k, int64_t n, int64_t bh, int64_t bw,
                               int64_t nnzb, const int32_t* col_indices,
                               int64_t num_col_indices, const int32_t* row_ptr,
                               int64_t num_row_ptr, BsrGeometry* geo) {
  if (bh <= 0 || bw <= 0) {
    return "block shape must be positive, got (" + std::to_string(bh) + ", " +
           std::to_string(bw) + ")";
  }
  if (k < 0 || n < 0) {
    return "dense shape must be non-negative, got [" + std::to_string(k) +
           ", " + std::to_string(n) + "]";
  }
  if (k > kMaxDimension || n > kMaxDimension) {
    return "dense shape must be at most " + std::to_string(kMaxDimension) +
           " per dimension (int32 indices), got [" + std::to_string(k) +
           ", " + std::to_string(n) + "]";
  }
  if (bh > kMaxDimension || bw > kMaxDimension) {
    return "block shape must be at most " + std::to_string(kMaxDimension) +
           " per dimension, got (" + std::to_string(bh) + ", " +
           std::to_string(bw) + ")";
  }
  const int64_t nbr = CeilDiv(k, bh);
  const int64_t nbc = CeilDiv(n, bw);
  if (num_col_indices != nnzb) {
    return "col_indices has " + std::to_string(num_col_indices) +
           " entries but values holds " + std::to_string(nnzb) + " blocks";
  }
  if (num_row_ptr < 1 || num_row_ptr - 1 != nbr) {
    return "row_ptr must have ceil(" + std::to_string(k) + " / " +
           std::to_string(bh) + ") + 1 = " + std::to_string(nbr + 1) +
           " entries, got " + std::to_string(num_row_ptr);
  }
  if (row_ptr[0] != 0) {
    return "row_ptr[0] must be 0, got " + std::to_string(row_ptr[0]);
  }
  for (int64_t i = 0; i < nbr; ++i) {
    if (row_ptr[i + 1] < row_ptr[i]) {
      return "row_ptr must be non-decreasing, but row_ptr[" +
             std::to_string(i + 1) + "] = " + std::to_string(row_ptr[i + 1]) +
             " < row_ptr[" + std::to_string(i) + "] = " +
             std::to_string(row_ptr[i]);
    }
  }
  if (row_ptr[nbr] != nnzb) {
    return "row_ptr must end at the number of blocks " + std::to_string(nnzb) +
           ", got " + std::to_string(row_ptr[nbr]);
  }
  for (int64_t i = 0; i < nbr; ++i) {
    for (int64_t p = row_ptr[i]; p < row_ptr[i + 1]; ++p) {
      const int64_t c = col_indices[p];
      if (c < 0 || c >= nbc) {
        return "col_indices[" + std::to_string(p) + "] = " + std::to_string(c) +
               " is out of range [0, " + std::to_string(nbc) + ")";
      }
      if (p > row_ptr[i] && c <= col_indices[p - 1]) {
        return "col_indices must be strictly increasing within a block row, "
               "but block row " + std::to_string(i) + " has " +
               std::to_string(col_indices[p - 1]) + " before " +
               std::to_string(c);
      }
    }
  }
  geo->k = k;
  geo->n = n;
  geo->bh = bh;
  geo->bw = bw;
  geo->nbr = nbr;
  geo->nbc = nbc;
  geo->nnzb = nnzb;
  return std::string();
}

// Column-major view of a validated BSR structure: for block column j the
// blocks col_ptr[j]..col_ptr[j+1] are block_ids/block_rows, in row order.
// A counting sort, O(nnzb + nbc), deterministic; building it per call costs
// far less than the product and keeps the op's inputs plain BSR. Its
// O(nbc) memory is only bounded by the dense shape, so callers build it
// only once they have allocated a non-empty output of at least nbc columns.
struct BsrColumnIndex {
  std::vector<int32_t> col_ptr;
  std::vector<int32_t> block_ids;
  std::vector<int32_t> block_rows;
};

inline void BuildColumnIndex(const BsrGeometry& geo, const int32_t* col_indices,
                             const int32_t* row_ptr, BsrColumnIndex* out) {
  out->col_ptr.assign(geo.nbc + 1, 0);
  out->block_ids.resize(geo.nnzb);
  out->block_rows.resize(geo.nnzb);
  for (int64_t p = 0; p < geo.nnzb; ++p) ++out->col_ptr[col_indices[p] + 1];
  for (int64_t j = 0; j < geo.nbc; ++j) out->col_ptr[j + 1] += out->col_ptr[j];
  std::vector<int32_t> fill(out->col_ptr.begin(), out->col_ptr.end() - 1);
  for (int64_t i = 0; i < geo.nbr; ++i) {
    for (int32_t p = row_ptr[i]; p < row_ptr[i + 1]; ++p) {
      const int32_t slot = fill[col_indices[p]]++;
      out->block_ids[slot] = p;
      out->block_rows[slot] = static_cast<int32_t>(i);
    }
  }
}

}  // namespace tfbs

#endif  // TF_BLOCKSPARSE_OPS_BSR_STRUCTURE_H_
