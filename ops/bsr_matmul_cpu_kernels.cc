// Register-tiled CPU kernels for BSR products, compiled once per ISA
// (cpu_isa.h sets the namespace, the vector width and the register count).
//
// Four kernels, chosen per call by Plan() (the one tile table):
// - ScatterProduct (x @ W, up to 4 dense rows): the blocks in storage order,
//   each added into its block column of a per-thread output; grouping by
//   block column instead reads small blocks a block row apart, a cache
//   miss each (4x4 blocks at M = 1 are one cache line apiece).
// - GatherProduct (dy @ W^T, up to 7 dense rows): a block row's blocks in
//   storage order, each block row a lane-wise dot product with dy, summed
//   across lanes once per block row; no block is copied or transposed.
// - RowProduct: vectors along a block's output columns, one broadcast of
//   the dense operand per row; best when there are few dense rows and the
//   block is at least a vector wide (M = 1..8 with 16x16 blocks: GEMV-like).
// - PanelProduct: vectors along the dense rows (the operand packed into
//   panels of one vector of rows), the weights broadcast from memory; every
//   block shape fills whole vectors, and dy @ W^T reads the stored blocks
//   transposed without a copy.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

#include "bsr_matmul_cpu_kernels.h"
#include "cpu_isa.h"

TFBS_ISA_BEGIN

namespace tfbs {
namespace TFBS_ISA_NS {
namespace {

constexpr int kVecBytes = TFBS_VEC_BYTES;
// Accumulators a tile may hold: the rest of the registers keep the loaded
// operands and the broadcasts.
constexpr int kAccRegs = TFBS_VEC_REGS == 32 ? 24 : 12;

// GCC/Clang vector extension type holding `kBytes` bytes of T. Explicit
// vectors keep the accumulator tile in registers (the auto-vectoriser did
// not: 1.4 GFLOP/s).
template <typename T, int kBytes>
struct Vec {
  typedef T type __attribute__((vector_size(kBytes)));
};

// All lanes set to s. Written as s - 0, which compilers fold to a plain
// broadcast since it is exact for every s; s + 0 is not (-0.0 + 0.0 = +0.0)
// and costs a real addition per broadcast.
template <typename V, typename T>
inline V Broadcast(T s) {
  return s - V{};
}

template <typename V, typename T>
inline V LoadVec(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // unaligned load
  return v;
}

inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------- transposes

// Integer vector of the same lane count as Vec<T, kBytes>: shuffle masks.
template <typename T, int kBytes>
struct MaskVec {
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I type __attribute__((vector_size(kBytes)));
};

// Step S of TransposeSquare for the row pair (a, b) = (r[i], r[i + S]):
// indices into the concatenation [a, b]; the low result keeps a's lanes
// with bit S clear and takes b's from S below, the high one the rest.
template <typename MI, int L, int S, bool kHigh, int... J>
constexpr MI StepMask(std::integer_sequence<int, J...>) {
  return MI{(kHigh ? ((J & S) ? L + J : J + S) : ((J & S) ? L + J - S : J))...};
}

template <typename V, typename MI, int L, int S>
inline void TransposeSteps(V* r) {
  if constexpr (S >= 1) {
    constexpr MI lo = StepMask<MI, L, S, false>(std::make_integer_sequence<int, L>());
    constexpr MI hi = StepMask<MI, L, S, true>(std::make_integer_sequence<int, L>());
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) {
      if (i & S) continue;
      const V a = r[i], b = r[i + S];
      r[i] = __builtin_shuffle(a, b, lo);
      r[i + S] = __builtin_shuffle(a, b, hi);
    }
    TransposeSteps<V, MI, L, S / 2>(r);
  }
}

// Transposes the L x L tile r[0..L) (a vector per row) in registers:
// log2(L) steps, each swapping the off-diagonal S x S sub-blocks of every
// 2S x 2S block, L log2(L) two-source shuffles in all where element moves
// through memory would cost L * L loads and stores (the panel layouts'
// packing and their output were a fifth of a 256-row product).
template <typename T, typename V>
inline void TransposeSquare(V* r) {
  constexpr int L = sizeof(V) / sizeof(T);
  TransposeSteps<V, typename MaskVec<T, sizeof(V)>::type, L, L / 2>(r);
}

// ---------------------------------------------------------------- row tiles

// Bytes per vector for a row of `lanes` T: a full register when the row
// fills one, else the whole row (4 floats -> 16 bytes).
template <typename T, int lanes>
constexpr int RowVecBytes() {
  constexpr int kRow = lanes * static_cast<int>(sizeof(T));
  return kRow >= kVecBytes ? kVecBytes : kRow;
}

// Dense rows kept in registers per tile, at most kMaxRows (a divisor of
// the OpKernel's 48 rows per work unit).
constexpr int kMaxRows = TFBS_VEC_REGS == 32 ? 12 : 8;
template <typename T, int kLanes>
constexpr int RowsPerTile() {
  constexpr int kVec = RowVecBytes<T, kLanes>() / static_cast<int>(sizeof(T));
  constexpr int kVecsPerRow = (kLanes + kVec - 1) / kVec;
  // The accumulators, and beside them a block row's vectors and one
  // broadcast: more spills to the stack (32x32 blocks with 16 registers).
  constexpr int kFit = (TFBS_VEC_REGS - kVecsPerRow - 1) / kVecsPerRow;
  constexpr int kBudget = kAccRegs / kVecsPerRow;
  constexpr int kRows = kFit < kBudget ? kFit : kBudget;
  return kRows < 1 ? 1 : (kRows > kMaxRows ? kMaxRows : kRows);
}

// Independent accumulator sets a tile of kAcc accumulators spreads the
// block's rows over: an FMA's result is ready only a few cycles later, so a
// tile with few accumulators (one dense row, narrow blocks) would wait on
// its own chain at every block row. The count divides BI.
template <int BI, int kAcc>
constexpr int ChainsFor() {
  int c = kAcc >= 8 ? 1 : 8 / kAcc;
  c = c > 4 ? 4 : c;
  while (BI % c != 0) --c;
  return c;
}

// Blocks ahead of the one in use whose first lines are prefetched.
constexpr int kPrefetchAhead = 8;

// One tile of kRows dense rows times one group, for blocks [BI, BO].
template <typename T, int BI, int BO, int kRows>
inline void ProductTile(const GroupedProductArgs<T>& a, int64_t g, int64_t m) {
  constexpr int kBytes = RowVecBytes<T, BO>();
  constexpr int kW = kBytes / static_cast<int>(sizeof(T));
  constexpr int kNV = BO / kW;
  static_assert(BO % kW == 0, "block width must fill whole vectors");
  constexpr int kC = ChainsFor<BI, kRows * kNV>();
  typedef typename Vec<T, kBytes>::type V;
  V acc[kC][kRows][kNV];
#pragma GCC unroll 4
  for (int c = 0; c < kC; ++c)
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < kNV; ++v) acc[c][r][v] = V{};
  const int64_t ld = a.in_row_stride;
  const T* in_rows = a.in + m * ld;
  const int32_t p_end = a.group_ptr[g + 1];
  for (int32_t p = a.group_ptr[g]; p < p_end; ++p) {
    const int64_t id = a.ids ? a.ids[p] : p;
    const T* blk = a.blocks + id * a.block_elems;
    if (a.ids != nullptr && p + kPrefetchAhead < p_end) {
      // A block column's blocks lie a block row apart in storage: with
      // small blocks the hardware prefetcher sees no stream and every
      // block is a cache miss. Ask for the one kPrefetchAhead later.
      const T* next = a.blocks + a.ids[p + kPrefetchAhead] * a.block_elems;
      constexpr int kLines = (BI * BO * sizeof(T) + 63) / 64;
#pragma GCC unroll 4
      for (int l = 0; l < (kLines < 4 ? kLines : 4); ++l)
        __builtin_prefetch(next + l * (64 / sizeof(T)));
    }
    const int64_t c0 = static_cast<int64_t>(a.in_block[p]) * BI;
    const T* x = in_rows + a.in_block[p] * a.in_block_stride;
    auto step = [&](int i, int c) __attribute__((always_inline)) {
      V b[kNV];
#pragma GCC unroll 8
      for (int v = 0; v < kNV; ++v) b[v] = LoadVec<V>(blk + i * BO + v * kW);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const V xv = Broadcast<V>(x[r * ld + i]);
#pragma GCC unroll 8
        for (int v = 0; v < kNV; ++v) acc[c][r][v] += xv * b[v];
      }
    };
    if (c0 + BI <= a.in_cols) {
#pragma GCC unroll 4
      for (int i = 0; i < BI; i += kC)
#pragma GCC unroll 4
        for (int c = 0; c < kC; ++c) step(i + c, c);
    } else {  // bottom edge block: its padded rows have no input
      const int imax = static_cast<int>(a.in_cols - c0);
      for (int i = 0; i < imax; ++i) step(i, 0);
    }
  }
#pragma GCC unroll 4
  for (int c = 1; c < kC; ++c)
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < kNV; ++v) acc[0][r][v] += acc[c][r][v];
  const int64_t o0 = g * BO;
  const int64_t omax = Min(BO, a.out_cols - o0);
  T* out = a.out + m * a.out_cols + o0;
  for (int r = 0; r < kRows; ++r) {
    if (omax == BO) {
      std::memcpy(out + r * a.out_cols, &acc[0][r][0], sizeof(T) * BO);
    } else {
      T row[BO];
      std::memcpy(row, &acc[0][r][0], sizeof(T) * BO);
      for (int64_t o = 0; o < omax; ++o) out[r * a.out_cols + o] = row[o];
    }
  }
}

// Blocks one column wide ([BI, 1]): a dot product per row and block. The
// lanes are reduced once at the end, so the loop vectorises without
// reassociating the sum across blocks.
template <typename T, int BI, int kRows>
inline void DotTile(const GroupedProductArgs<T>& a, int64_t g, int64_t m) {
  T lanes[kRows][BI];
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < BI; ++i) lanes[r][i] = T(0);
  const int64_t ld = a.in_row_stride;
  const T* in_rows = a.in + m * ld;
  for (int32_t p = a.group_ptr[g]; p < a.group_ptr[g + 1]; ++p) {
    const int64_t id = a.ids ? a.ids[p] : p;
    const T* __restrict blk = a.blocks + id * a.block_elems;
    const int64_t c0 = static_cast<int64_t>(a.in_block[p]) * BI;
    const T* __restrict x = in_rows + a.in_block[p] * a.in_block_stride;
    if (c0 + BI <= a.in_cols) {
      for (int r = 0; r < kRows; ++r)
        for (int i = 0; i < BI; ++i) lanes[r][i] += x[r * ld + i] * blk[i];
    } else {
      const int64_t imax = a.in_cols - c0;
      for (int r = 0; r < kRows; ++r)
        for (int64_t i = 0; i < imax; ++i) lanes[r][i] += x[r * ld + i] * blk[i];
    }
  }
  if (g >= a.out_cols) return;
  T* out = a.out + m * a.out_cols + g;
  for (int r = 0; r < kRows; ++r) {
    T s = T(0);
    for (int i = 0; i < BI; ++i) s += lanes[r][i];
    out[r * a.out_cols] = s;
  }
}

template <typename T, int BI, int BO, int kRows>
inline void RowTile(const GroupedProductArgs<T>& a, int64_t g, int64_t m) {
  if constexpr (BO == 1) DotTile<T, BI, kRows>(a, g, m);
  else ProductTile<T, BI, BO, kRows>(a, g, m);
}

template <typename T, int BI, int BO>
void RowFixed(const GroupedProductArgs<T>& a, int64_t g_begin, int64_t g_end,
              int64_t m_begin, int64_t m_end) {
  constexpr int kRows = RowsPerTile<T, (BO == 1 ? BI : BO)>();
  for (int64_t g = g_begin; g < g_end; ++g) {
    int64_t m = m_begin;
    for (; m + kRows <= m_end; m += kRows) RowTile<T, BI, BO, kRows>(a, g, m);
    // The rest (fewer than kRows <= 12 rows) in tiles of 8, 4, 2, 1: a
    // batch of 8 is one tile, not eight single rows that each re-read
    // every block.
    if constexpr (kRows > 8) {
      if (m + 8 <= m_end) { RowTile<T, BI, BO, 8>(a, g, m); m += 8; }
    }
    if constexpr (kRows > 4) {
      if (m + 4 <= m_end) { RowTile<T, BI, BO, 4>(a, g, m); m += 4; }
    }
    if constexpr (kRows > 2) {
      if (m + 2 <= m_end) { RowTile<T, BI, BO, 2>(a, g, m); m += 2; }
    }
    if (m < m_end) RowTile<T, BI, BO, 1>(a, g, m);
  }
}

template <typename T>
void RowGeneric(const GroupedProductArgs<T>& a, int64_t g_begin,
                int64_t g_end, int64_t m_begin, int64_t m_end) {
  const int64_t bi = a.bi, bo = a.bo;
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t o0 = g * bo;
    const int64_t omax = Min(bo, a.out_cols - o0);
    for (int64_t m = m_begin; m < m_end; ++m) {
      T* out = a.out + m * a.out_cols + o0;
      for (int64_t o = 0; o < omax; ++o) out[o] = T(0);
      for (int32_t p = a.group_ptr[g]; p < a.group_ptr[g + 1]; ++p) {
        const int64_t id = a.ids ? a.ids[p] : p;
        const T* blk = a.blocks + id * a.block_elems;
        const int64_t c0 = static_cast<int64_t>(a.in_block[p]) * bi;
        const int64_t imax = Min(bi, a.in_cols - c0);
        const T* x = a.in + m * a.in_row_stride + a.in_block[p] * a.in_block_stride;
        for (int64_t i = 0; i < imax; ++i) {
          const T xv = x[i];
          for (int64_t o = 0; o < omax; ++o)
            out[o] += xv * blk[i * a.w_row + o * a.w_col];
        }
      }
    }
  }
}

// The block shapes with a specialised row kernel: square 4..32 and the
// TFLite-friendly 4x1 / 16x1 with their transposes. Others run generic.
template <typename T>
void RowProduct(const GroupedProductArgs<T>& a, int64_t gb, int64_t ge,
                int64_t mb, int64_t me) {
  const int64_t bi = a.bi, bo = a.bo;
  if (a.w_col == 1 && a.w_row == bo) {
#define TFBS_CASE(I, O) \
  if (bi == I && bo == O) return RowFixed<T, I, O>(a, gb, ge, mb, me);
    TFBS_CASE(4, 4) TFBS_CASE(8, 8) TFBS_CASE(16, 16) TFBS_CASE(32, 32)
    TFBS_CASE(4, 1) TFBS_CASE(16, 1) TFBS_CASE(1, 4) TFBS_CASE(1, 16)
#undef TFBS_CASE
  }
  RowGeneric<T>(a, gb, ge, mb, me);
}

// ------------------------------------------------------------ scatter rows

// Dense rows up to which x @ W takes ScatterProduct.
constexpr int64_t kScatterMaxRows = 4;

// kRows dense rows times the blocks of block rows [rb, re), added into
// out. The output vectors of one block are independent of the next block's
// (another column), so out-of-order execution overlaps the FMA chains of
// consecutive small blocks by itself; only long chains (16 rows and more,
// few accumulators) are split, since extra chains cost zeroing and adds.
template <typename T, int BI, int BO, int kRows>
void ScatterRows(const ScatterArgs<T>& a, int64_t rb, int64_t re) {
  constexpr int kBytes = RowVecBytes<T, BO>();
  constexpr int kW = kBytes / static_cast<int>(sizeof(T));
  constexpr int kNV = BO / kW;
  static_assert(BO % kW == 0, "block width must fill whole vectors");
  constexpr int kC = (BI >= 16 && kRows * kNV < 4) ? 2 : 1;
  typedef typename Vec<T, kBytes>::type V;
  const int64_t ld = a.k, os = a.out_stride;
  for (int64_t r = rb; r < re; ++r) {
    const int64_t c0 = r * BI;
    const int imax = static_cast<int>(Min(BI, a.k - c0));
    const T* x = a.in + c0;
    for (int32_t p = a.row_ptr[r]; p < a.row_ptr[r + 1]; ++p) {
      const T* blk = a.blocks + static_cast<int64_t>(p) * (BI * BO);
      T* out = a.out + static_cast<int64_t>(a.col_indices[p]) * BO;
      V acc[kC][kRows][kNV];
#pragma GCC unroll 8
      for (int rr = 0; rr < kRows; ++rr)
#pragma GCC unroll 8
        for (int v = 0; v < kNV; ++v) {
          acc[0][rr][v] = LoadVec<V>(out + rr * os + v * kW);
#pragma GCC unroll 4
          for (int c = 1; c < kC; ++c) acc[c][rr][v] = V{};
        }
      auto step = [&](int i, int c) __attribute__((always_inline)) {
        V b[kNV];
#pragma GCC unroll 8
        for (int v = 0; v < kNV; ++v) b[v] = LoadVec<V>(blk + i * BO + v * kW);
#pragma GCC unroll 8
        for (int rr = 0; rr < kRows; ++rr) {
          const V xv = Broadcast<V>(x[rr * ld + i]);
#pragma GCC unroll 8
          for (int v = 0; v < kNV; ++v) acc[c][rr][v] += xv * b[v];
        }
      };
      if (imax == BI) {
#pragma GCC unroll 4
        for (int i = 0; i < BI; i += kC)
#pragma GCC unroll 4
          for (int c = 0; c < kC; ++c) step(i + c, c);
      } else {  // bottom edge block: its padded rows have no input
        for (int i = 0; i < imax; ++i) step(i, 0);
      }
#pragma GCC unroll 8
      for (int rr = 0; rr < kRows; ++rr)
#pragma GCC unroll 8
        for (int v = 0; v < kNV; ++v) {
#pragma GCC unroll 4
          for (int c = 1; c < kC; ++c) acc[0][rr][v] += acc[c][rr][v];
          std::memcpy(out + rr * os + v * kW, &acc[0][rr][v], sizeof(V));
        }
    }
  }
}

template <typename T, int BI, int BO>
void ScatterFixed(const ScatterArgs<T>& a, int64_t rb, int64_t re) {
  switch (a.m) {
    case 1: return ScatterRows<T, BI, BO, 1>(a, rb, re);
    case 2: return ScatterRows<T, BI, BO, 2>(a, rb, re);
    case 3: return ScatterRows<T, BI, BO, 3>(a, rb, re);
    default: return ScatterRows<T, BI, BO, 4>(a, rb, re);
  }
}

// The shapes Plan() sends here: each has a ScatterFixed instance.
inline bool ScatterShape(int64_t bi, int64_t bo) {
  return (bi == bo && (bi == 4 || bi == 8 || bi == 16 || bi == 32)) ||
         (bi == 1 && (bo == 4 || bo == 16));
}

template <typename T>
void ScatterProduct(const ScatterArgs<T>& a, int64_t rb, int64_t re) {
  const int64_t bi = a.bh, bo = a.bw;
#define TFBS_CASE(I, O) \
  if (bi == I && bo == O) return ScatterFixed<T, I, O>(a, rb, re);
  TFBS_CASE(4, 4) TFBS_CASE(8, 8) TFBS_CASE(16, 16) TFBS_CASE(32, 32)
  TFBS_CASE(1, 4) TFBS_CASE(1, 16)
#undef TFBS_CASE
}

// ------------------------------------------------------------- gather rows

// Dense rows up to which dy @ W^T takes GatherProduct (from 8 rows the
// panels, one vector of rows, are as fast; 8 dense rows leave too few
// registers for the accumulators).
constexpr int64_t kGatherMaxRows = 7;

// dy @ W^T for kRows dense rows and groups (block rows of W) [gb, ge).
// A block row's blocks are contiguous in storage, and row i of a stored
// [BH, BW] block times dy's segment is a dot product: its products are
// summed lane-wise across all the row's blocks, and across lanes once at
// the end, so no block is copied or transposed. The block is read as flat
// vectors of L lanes: with BW >= L a vector is part of one block row; with
// BW < L it holds L / BW rows, and dy's segment comes repeated L / BW times
// (the caller's copy, see GatherProduct), so a 4x4 block is one FMA.
// Sum of a vector's lanes, by halving (log2 of the lanes adds, not one
// scalar add per lane).
template <typename T, int kBytes>
inline T SumLanes(typename Vec<T, kBytes>::type v) {
  if constexpr (kBytes == static_cast<int>(sizeof(T))) {
    return v[0];
  } else {
    typedef typename Vec<T, kBytes / 2>::type H;
    H lo, hi;
    std::memcpy(&lo, &v, kBytes / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + kBytes / 2, kBytes / 2);
    return SumLanes<T, kBytes / 2>(lo + hi);
  }
}

template <typename T, int BH, int BW, int kRows>
void GatherRows(const GroupedProductArgs<T>& a, int64_t gb, int64_t ge) {
  constexpr int L = kVecBytes / static_cast<int>(sizeof(T));
  constexpr bool kRepeated = BW < L;
  constexpr int kRowsPerVec = kRepeated ? L / BW : 1;
  constexpr int kVecsPerRow = kRepeated ? 1 : BW / L;
  static_assert(kRepeated ? (L % BW == 0 && BH % (L / BW) == 0) : BW % L == 0,
                "block rows must tile whole vectors");
  // Vector rows of a block: its rows, or its groups of kRowsPerVec rows.
  constexpr int kVRows = BH / kRowsPerVec;
  // A pass takes IC vector rows: one accumulator per dense row and vector
  // row (a row's parts add into it, since only the sum of its lanes is
  // wanted), beside the dy vectors and a loaded block vector; the passes
  // of a block row are of equal size.
  constexpr int kFree = TFBS_VEC_REGS - kRows * kVecsPerRow - 4;
  constexpr int kChunkRaw0 = (kFree < kAccRegs ? kFree : kAccRegs) / kRows;
  constexpr int kChunkRaw = kChunkRaw0 < 1 ? 1 : kChunkRaw0;
  constexpr int kPasses = (kVRows + kChunkRaw - 1) / kChunkRaw;
  constexpr int IC = (kVRows + kPasses - 1) / kPasses;
  // Accumulator sets over alternate blocks when a pass has too few
  // independent FMA chains to cover the FMA latency.
  constexpr int kSetsRaw = kChunkRaw / IC;
  constexpr int kWant = (8 + kRows * IC * kVecsPerRow - 1) / (kRows * IC * kVecsPerRow);
  constexpr int kSets0 = kWant > kSetsRaw ? kSetsRaw : (kWant > 4 ? 4 : kWant);
  constexpr int kSets = kSets0 < 1 ? 1 : kSets0;
  typedef typename Vec<T, kVecBytes>::type V;
  const int64_t ld = a.in_row_stride, cs = a.in_block_stride;
  for (int64_t g = gb; g < ge; ++g) {
    const int64_t r0 = g * BH;
    const int64_t imax = Min(BH, a.out_cols - r0);
    const int32_t p_begin = a.group_ptr[g], p_end = a.group_ptr[g + 1];
    // A block row's last block is its rightmost (sorted column indices):
    // the only one that can be a right edge block.
    const int32_t p_full =
        (p_end > p_begin &&
         static_cast<int64_t>(a.in_block[p_end - 1]) * BW + BW > a.in_cols)
            ? p_end - 1 : p_end;
    for (int i0 = 0; i0 < kVRows; i0 += IC) {
      V acc[kSets][kRows][IC];
#pragma GCC unroll 4
      for (int c = 0; c < kSets; ++c)
#pragma GCC unroll 8
        for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 32
          for (int u = 0; u < IC; ++u) acc[c][r][u] = V{};
      // acc[c] += vector rows [i0, i0 + IC) of a block times dy's vectors.
      auto step = [&](const T* blk, const T* dy, int64_t dy_ld, int c)
                      __attribute__((always_inline)) {
        V d[kRows][kVecsPerRow];
#pragma GCC unroll 8
        for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
          for (int v = 0; v < kVecsPerRow; ++v) d[r][v] = LoadVec<V>(dy + r * dy_ld + v * L);
#pragma GCC unroll 32
        for (int u = 0; u < IC; ++u) {
          if (i0 + u >= kVRows) break;  // a shorter last pass
#pragma GCC unroll 4
          for (int v = 0; v < kVecsPerRow; ++v) {
            const V b = LoadVec<V>(blk + ((i0 + u) * kVecsPerRow + v) * L);
#pragma GCC unroll 8
            for (int r = 0; r < kRows; ++r) acc[c][r][u] += b * d[r][v];
          }
        }
      };
      int32_t p = p_begin;
      for (; p + kSets <= p_full; p += kSets) {
#pragma GCC unroll 4
        for (int c = 0; c < kSets; ++c)
          step(a.blocks + static_cast<int64_t>(p + c) * (BH * BW),
               a.in + a.in_block[p + c] * cs, ld, c);
      }
      for (; p < p_full; ++p)
        step(a.blocks + static_cast<int64_t>(p) * (BH * BW), a.in + a.in_block[p] * cs, ld, 0);
      if (p_full < p_end) {
        // Right edge block: dy has no columns past n, and the block's
        // padding there may hold anything (NaN too): both read as zero.
        const int64_t jmax = a.in_cols - static_cast<int64_t>(a.in_block[p_full]) * BW;
        constexpr int kSeg = kRepeated ? L : BW;
        T eb[BH * BW];
        const T* blk = a.blocks + static_cast<int64_t>(p_full) * (BH * BW);
        for (int i = 0; i < BH; ++i)
          for (int j = 0; j < BW; ++j) eb[i * BW + j] = j < jmax ? blk[i * BW + j] : T(0);
        T ed[kRows][kSeg];
        const T* dy = a.in + a.in_block[p_full] * cs;
        for (int r = 0; r < kRows; ++r)
          for (int j = 0; j < kSeg; ++j) ed[r][j] = (j % BW) < jmax ? dy[r * ld + j] : T(0);
        step(eb, &ed[0][0], kSeg, 0);
      }
#pragma GCC unroll 4
      for (int c = 1; c < kSets; ++c)
#pragma GCC unroll 8
        for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 32
          for (int u = 0; u < IC; ++u) acc[0][r][u] += acc[c][r][u];
      // Lanes to rows: vector row i0 + u is block row i0 + u, or rows
      // (i0 + u) * kRowsPerVec + s, each a BW-lane segment.
      for (int r = 0; r < kRows; ++r) {
        T* out = a.out + r * a.out_cols + r0;
        for (int u = 0; u < IC && i0 + u < kVRows; ++u) {
          if constexpr (!kRepeated) {
            if (i0 + u < imax) out[i0 + u] = SumLanes<T, kVecBytes>(acc[0][r][u]);
          } else {
            T lanes[L];
            std::memcpy(lanes, &acc[0][r][u], sizeof(V));
            for (int s = 0; s < kRowsPerVec; ++s) {
              const int64_t i = static_cast<int64_t>(i0 + u) * kRowsPerVec + s;
              if (i >= imax) break;
              T sum = T(0);
              for (int l = 0; l < BW; ++l) sum += lanes[s * BW + l];
              out[i] = sum;
            }
          }
        }
      }
    }
  }
}

template <typename T, int BH, int BW>
void GatherFixed(const GroupedProductArgs<T>& a, int64_t gb, int64_t ge) {
  switch (a.m) {
    case 1: return GatherRows<T, BH, BW, 1>(a, gb, ge);
    case 2: return GatherRows<T, BH, BW, 2>(a, gb, ge);
    case 3: return GatherRows<T, BH, BW, 3>(a, gb, ge);
    case 4: return GatherRows<T, BH, BW, 4>(a, gb, ge);
    case 5: return GatherRows<T, BH, BW, 5>(a, gb, ge);
    case 6: return GatherRows<T, BH, BW, 6>(a, gb, ge);
    default: return GatherRows<T, BH, BW, 7>(a, gb, ge);
  }
}

// The shapes Plan() sends to GatherProduct (each has a GatherFixed
// instance whose rows tile whole vectors on every ISA).
inline bool GatherShape(int64_t bh, int64_t bw) {
  return bh == bw && (bh == 4 || bh == 8 || bh == 16 || bh == 32);
}

// out[c][r][l] = in[r][c * seg + l % seg] for l < lanes (a multiple of
// seg), zero past cols: each block column's segment of dy repeated to fill
// a vector, the m rows of one block column side by side (a block's dy
// vectors in consecutive lines).
template <typename T>
void RepeatSegments(const T* in, int64_t m, int64_t cols, int64_t seg,
                    int64_t lanes, T* out) {
  const int64_t segs = (cols + seg - 1) / seg;
  for (int64_t c = 0; c < segs; ++c) {
    const int64_t width = Min(seg, cols - c * seg);
    for (int64_t r = 0; r < m; ++r) {
      T* dst = out + (c * m + r) * lanes;
      std::memcpy(dst, in + r * cols + c * seg, sizeof(T) * width);
      for (int64_t j = width; j < seg; ++j) dst[j] = T(0);
      for (int64_t l = seg; l < lanes; l += seg) std::memcpy(dst + l, dst, sizeof(T) * seg);
    }
  }
}

template <typename T>
void GatherProduct(const GroupedProductArgs<T>& a, int64_t gb, int64_t ge) {
  const int64_t bh = a.bo, bw = a.bi;
#define TFBS_CASE(H, W) \
  if (bh == H && bw == W) return GatherFixed<T, H, W>(a, gb, ge);
  TFBS_CASE(4, 4) TFBS_CASE(8, 8) TFBS_CASE(16, 16) TFBS_CASE(32, 32)
#undef TFBS_CASE
}

// ------------------------------------------------------------------- panels

// A tile of OC output columns (from o0) times NV panels (from q) of one
// group. kUnitCol: the weights of one input row are contiguous (x @ W),
// which lets the compiler address the broadcasts with constant offsets.
// The tile is written to buf as [NV panels][OC columns][L rows], panel
// stride L * L (SegmentBuffer's layout).
template <typename T, typename V, int OC, int NV, bool kUnitCol, int BI, bool kSquare>
inline void PanelTile(const GroupedProductArgs<T>& a, int64_t g, int64_t o0,
                      int64_t q, T* buf) {
  constexpr int L = sizeof(V) / sizeof(T);
  V acc[OC][NV];
#pragma GCC unroll 16
  for (int o = 0; o < OC; ++o)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[o][v] = V{};
  const int64_t pstride = a.in_cols * L;
  const T* xq = a.in + q * pstride;
  // Square blocks of a known side have every weight offset a constant:
  // with w_row read at run time GCC kept the 16 row offsets of a 16 x 16
  // block in spilled registers (M = 16: 15 % of the tile's time).
  const int64_t w_row = kSquare ? (kUnitCol ? BI : 1) : a.w_row;
  const int64_t w_col = kUnitCol ? 1 : (kSquare ? BI : a.w_col);
  const int64_t block_elems = kSquare ? int64_t{BI} * BI : a.block_elems;
  const int32_t p_end = a.group_ptr[g + 1];
  for (int32_t p = a.group_ptr[g]; p < p_end; ++p) {
    const int64_t id = a.ids ? a.ids[p] : p;
    const T* w = a.blocks + id * block_elems + o0 * w_col;
    if (a.ids != nullptr && p + kPrefetchAhead < p_end) {
      // As in ProductTile: a block column's blocks are far apart. One line
      // is a whole 4x4 block; larger blocks are streams the hardware
      // prefetcher follows once started.
      __builtin_prefetch(a.blocks + a.ids[p + kPrefetchAhead] * block_elems +
                         o0 * w_col);
    }
    const int64_t bi = BI > 0 ? BI : a.bi;
    const int64_t c0 = static_cast<int64_t>(a.in_block[p]) * bi;
    const int64_t imax = Min(bi, a.in_cols - c0);
    const T* x = xq + c0 * L;
    auto row = [&](const T* xr, const T* wr) {
      V xv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) xv[v] = LoadVec<V>(xr + v * pstride);
#pragma GCC unroll 16
      for (int o = 0; o < OC; ++o) {
        const V wv = Broadcast<V>(wr[o * w_col]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[o][v] += wv * xv[v];
      }
    };
    if (BI > 0 && imax == BI) {
      // A whole block of a known height: no loop exit to mispredict and
      // constant offsets (about 40 cycles a block at 16 rows).
#pragma GCC unroll 32
      for (int i = 0; i < BI; ++i) row(x + i * L, w + i * w_row);
    } else {
      for (int64_t i = 0; i < imax; ++i, x += L, w += w_row) row(x, w);
    }
  }
  // Lanes are rows: the tile goes to the segment buffer as it is, and
  // FlushSegment transposes whole L x L squares into the output.
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v)
#pragma GCC unroll 16
    for (int o = 0; o < OC; ++o)
      std::memcpy(buf + (v * L + o) * L, &acc[o][v], sizeof(V));
}

// Output columns of the next tile chunk, `width` columns of a segment
// left (width <= the segment's L): 8, then 4, then the rest, so the block
// widths users prune to (1, 4, 8, 16, 32) need no odd chunk. With 16
// registers a chunk of 8 leaves one panel per tile (9 loads per 8 FMAs);
// 4 columns take 3 panels (7 loads per 12). Plan() sizes work units by it.
constexpr int64_t ChunkCols(int64_t width, int64_t lanes) {
  return (TFBS_VEC_REGS == 32 && lanes >= 8 && width >= 8) ? 8 : (width >= 4 ? 4 : width);
}

// Panels per tile for OC output columns: as many accumulators as fit.
constexpr int PanelsFor(int oc) {
  const int nv = kAccRegs / oc;
  return nv < 1 ? 1 : (nv > 8 ? 8 : nv);
}

// Columns [o0, o0 + OC) of panels [q_begin, q_end) into seg, the buffer
// of the segment the columns lie in (seg points at its column o0).
template <typename T, typename V, int OC, bool kUnitCol, int BI, bool kSquare>
void PanelColumns(const GroupedProductArgs<T>& a, int64_t g, int64_t o0,
                  int64_t q_begin, int64_t q_end, T* seg) {
  constexpr int L = sizeof(V) / sizeof(T);
  constexpr int kMaxNv = PanelsFor(OC);
  const int64_t n = q_end - q_begin;
  int64_t full = n / kMaxNv, left = n % kMaxNv;
  // A tail of one panel makes a tile of one load per OC broadcasts: split
  // the last full tile and it into two even ones instead (3 + 1 -> 2 + 2).
  if (left == 1 && full > 0 && kMaxNv >= 3) {
    --full;
    left += kMaxNv;
  }
  int64_t q = q_begin;
  for (int64_t t = 0; t < full; ++t, q += kMaxNv)
    PanelTile<T, V, OC, kMaxNv, kUnitCol, BI, kSquare>(a, g, o0, q, seg + (q - q_begin) * L * L);
  // The tail: one or two calls with exact counts (each at most kMaxNv).
  while (left > 0) {
    const int64_t nv = left > kMaxNv ? left / 2 : left;
    T* buf = seg + (q - q_begin) * L * L;
    switch (nv) {
#define TFBS_NV(N)                                                           \
  case N:                                                                    \
    if constexpr (N <= kMaxNv) PanelTile<T, V, OC, N, kUnitCol, BI, kSquare>(a, g, o0, q, buf); \
    break;
      TFBS_NV(1) TFBS_NV(2) TFBS_NV(3) TFBS_NV(4) TFBS_NV(5) TFBS_NV(6)
      TFBS_NV(7) TFBS_NV(8)
#undef TFBS_NV
      default:
        break;
    }
    q += nv;
    left -= nv;
  }
}

// Panels whose tiles one segment buffer holds: [kSegPanels][L cols][L rows].
constexpr int64_t kSegPanels = 8;

// Writes a segment (sw <= L output columns from the group's column s0, for
// panels [q_begin, q_end)) from its buffer to the output, clipped to m rows
// and out_cols columns: each panel's L x L square transposed in registers
// and stored a row at a time, or element by element when the segment is
// too narrow (1-3 columns) for a transpose to pay.
template <typename T, typename V>
void FlushSegment(const GroupedProductArgs<T>& a, int64_t g, int64_t s0,
                  int64_t sw, int64_t q_begin, int64_t q_end, const T* seg) {
  constexpr int L = sizeof(V) / sizeof(T);
  const int64_t col0 = g * a.bo + s0;
  const int64_t ocols = Min(sw, a.out_cols - col0);
  if (ocols <= 0) return;
  for (int64_t q = q_begin; q < q_end; ++q) {
    const T* buf = seg + (q - q_begin) * L * L;
    const int64_t r0 = q * L;
    const int64_t rows = Min(L, a.m - r0);
    T* out = a.out + r0 * a.out_cols + col0;
    if (sw < 4) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = 0; o < ocols; ++o) out[r * a.out_cols + o] = buf[o * L + r];
      continue;
    }
    V t[L];
#pragma GCC unroll 16
    for (int o = 0; o < L; ++o) t[o] = o < sw ? LoadVec<V>(buf + o * L) : V{};
    TransposeSquare<T, V>(t);
    if (ocols == L) {
      for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * a.out_cols, &t[r], sizeof(V));
    } else if (ocols == 4 && L > 4) {  // 4x4 blocks: a quarter vector a row
      for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * a.out_cols, &t[r], sizeof(T) * 4);
    } else if (ocols == 8 && L > 8) {
      for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * a.out_cols, &t[r], sizeof(T) * 8);
    } else {  // other widths: through memory, element by element
      T e[L][L];
      for (int r = 0; r < L; ++r) std::memcpy(e[r], &t[r], sizeof(V));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = 0; o < ocols; ++o) out[r * a.out_cols + o] = e[r][o];
    }
  }
}

template <typename T, typename V, bool kUnitCol, int BI, bool kSquare>
void PanelGroups(const GroupedProductArgs<T>& a, int64_t g_begin,
                 int64_t g_end, int64_t q_begin, int64_t q_end) {
  constexpr int L = sizeof(V) / sizeof(T);
  alignas(64) T seg[kSegPanels * L * L];
  const int64_t bo = a.bo;
  for (int64_t qs = q_begin; qs < q_end; qs += kSegPanels) {
    const int64_t qe = Min(q_end, qs + kSegPanels);
    for (int64_t g = g_begin; g < g_end; ++g) {
      // Segments of L output columns (one transposed square per panel),
      // each in chunks of ChunkCols columns.
      for (int64_t s0 = 0; s0 < bo; s0 += L) {
        const int64_t s1 = Min(bo, s0 + L);
        // Written as fixed loops rather than a switch on ChunkCols in one
        // loop: that form compiled 4x4 tiles 2.3x slower with AVX-512.
        int64_t o0 = s0;
        // One panel (M <= L rows) fills only 8 of 32 registers with chunks
        // of 8: 16 columns halve the passes over the panel and keep 16 FMA
        // chains in flight (Zen 5, 2048^2, 90 %, M = 16: 0.82-0.94 of the
        // time of chunks of 8 for 16 x 16 and 32 x 32 blocks).
        if constexpr (TFBS_VEC_REGS == 32 && L >= 16) {
          if (qe - qs == 1) {
            for (; s1 - o0 >= 16; o0 += 16)
              PanelColumns<T, V, 16, kUnitCol, BI, kSquare>(a, g, o0, qs, qe, seg + (o0 - s0) * L);
          }
        }
        if constexpr (TFBS_VEC_REGS == 32 && L >= 8) {
          for (; ChunkCols(s1 - o0, L) == 8; o0 += 8)
            PanelColumns<T, V, 8, kUnitCol, BI, kSquare>(a, g, o0, qs, qe, seg + (o0 - s0) * L);
        }
        for (; ChunkCols(s1 - o0, L) == 4; o0 += 4)
          PanelColumns<T, V, 4, kUnitCol, BI, kSquare>(a, g, o0, qs, qe, seg + (o0 - s0) * L);
        T* rest = seg + (o0 - s0) * L;
        switch (s1 - o0) {
          case 3: PanelColumns<T, V, 3, kUnitCol, BI, kSquare>(a, g, o0, qs, qe, rest); break;
          case 2: PanelColumns<T, V, 2, kUnitCol, BI, kSquare>(a, g, o0, qs, qe, rest); break;
          case 1: PanelColumns<T, V, 1, kUnitCol, BI, kSquare>(a, g, o0, qs, qe, rest); break;
          default: break;
        }
        FlushSegment<T, V>(a, g, s0, s1 - s0, qs, qe, seg);
      }
    }
  }
}

template <typename T>
void PanelProduct(const GroupedProductArgs<T>& a, int64_t gb, int64_t ge,
                  int64_t qb, int64_t qe) {
  typedef typename Vec<T, kVecBytes>::type V;
  // The block heights users prune to get their input-row loop unrolled,
  // with 32 registers: with 16 (AVX2, 4x4 blocks) the unrolled loop ran
  // 20 % slower than the plain one.
  // Square blocks, the shapes users prune to, also get their weight
  // strides as constants (Zen 5, 2048^2, 90 %: 0.79-0.99 of the time of
  // run-time strides for 4 x 4 .. 32 x 32, both products, M = 16 .. 256;
  // 32 x 32 at M = 64 1.00-1.04, within the noise).
  const bool unit_col = a.w_col == 1;
  const bool square = a.bi == a.bo && a.block_elems == a.bi * a.bo &&
                      (unit_col ? a.w_row == a.bo : a.w_row == 1 && a.w_col == a.bo);
#define TFBS_BI(N)                                                            \
  if (TFBS_VEC_REGS == 32 && a.bi == N) {                                     \
    if (square) {                                                             \
      if (unit_col) PanelGroups<T, V, true, N, true>(a, gb, ge, qb, qe);      \
      else PanelGroups<T, V, false, N, true>(a, gb, ge, qb, qe);              \
    } else if (unit_col) {                                                    \
      PanelGroups<T, V, true, N, false>(a, gb, ge, qb, qe);                   \
    } else {                                                                  \
      PanelGroups<T, V, false, N, false>(a, gb, ge, qb, qe);                  \
    }                                                                         \
    return;                                                                   \
  }
  TFBS_BI(4) TFBS_BI(8) TFBS_BI(16) TFBS_BI(32)
#undef TFBS_BI
  if (unit_col) PanelGroups<T, V, true, 0, false>(a, gb, ge, qb, qe);
  else PanelGroups<T, V, false, 0, false>(a, gb, ge, qb, qe);
}

// The tile table. Panels need a vector of rows to fill; with fewer rows the
// row tiles win when the block is a vector wide (they broadcast the few
// rows instead of wasting lanes), and the transposed product, whose row
// tiles need a copy of every block per call, takes panels sooner.
template <typename T>
ProductPlan Plan(int64_t m, int64_t bi, int64_t bo, bool transposed) {
  constexpr int64_t kLanes = kVecBytes / sizeof(T);
  ProductPlan plan;
  const bool wide_block = bo * static_cast<int64_t>(sizeof(T)) >= kVecBytes;
  // Blocks two vectors wide or more keep row tiles up to two vectors of
  // rows: their tile reuses each broadcast for two FMAs (32 x 32 at M = 16
  // on Zen 5: 0.71-0.91 of the panel tiles' time; equal at M = 32).
  const bool two_vectors = bo * static_cast<int64_t>(sizeof(T)) >= 2 * kVecBytes;
  const int64_t min_rows = transposed ? kLanes / 2
                           : two_vectors ? 2 * kLanes
                           : wide_block ? kLanes : kLanes / 2;
  plan.scatter = !transposed && m <= kScatterMaxRows && ScatterShape(bi, bo);
  plan.gather = transposed && m <= kGatherMaxRows && GatherShape(bo, bi);
  // With 16 registers a panel tile holds too few accumulators for the
  // loads it makes; row tiles of blocks a vector wide or more do better,
  // even when dy @ W^T must copy the blocks transposed for them first.
  const bool panels_pay = TFBS_VEC_REGS == 32 || !wide_block;
  plan.panels = !plan.scatter && !plan.gather && panels_pay && m >= min_rows;
  plan.lanes = kLanes;
  plan.tile_panels = PanelsFor(static_cast<int>(ChunkCols(Min(bo, kLanes), kLanes)));
  plan.pack_rows = !plan.panels && m >= 32;
  return plan;
}

// Panels of one vector of rows: each L x L square (L rows, L columns) is
// loaded a row per vector, transposed in registers and stored as L
// contiguous column vectors; rows past m and columns past cols read zero.
template <typename T>
void PackPanels(const T* in, int64_t m, int64_t cols, T* out,
                int64_t q_begin, int64_t q_end) {
  typedef typename Vec<T, kVecBytes>::type V;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  for (int64_t q = q_begin; q < q_end; ++q) {
    T* dst = out + q * cols * L;
    const int64_t r0 = q * L;
    const int64_t rows = Min(L, m - r0);
    const T* src = in + r0 * cols;
    for (int64_t c0 = 0; c0 < cols; c0 += L) {
      const int64_t w = Min(L, cols - c0);
      V t[L];
      if (rows == L && w == L) {
#pragma GCC unroll 16
        for (int l = 0; l < L; ++l) t[l] = LoadVec<V>(src + l * cols + c0);
      } else {  // an edge square: element by element, zero outside
        T e[L][L] = {};
        for (int64_t l = 0; l < rows; ++l)
          for (int64_t j = 0; j < w; ++j) e[l][j] = src[l * cols + c0 + j];
        for (int l = 0; l < L; ++l) t[l] = LoadVec<V>(e[l]);
      }
      TransposeSquare<T, V>(t);
      if (w == L) {
#pragma GCC unroll 16
        for (int j = 0; j < L; ++j) std::memcpy(dst + (c0 + j) * L, &t[j], sizeof(V));
      } else {
        for (int64_t j = 0; j < w; ++j) std::memcpy(dst + (c0 + j) * L, &t[j], sizeof(V));
      }
    }
  }
}

template <typename T>
void PackBlockColumns(const T* in, int64_t m, int64_t cols, int64_t bi, T* out,
                      int64_t b_begin, int64_t b_end) {
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t c0 = b * bi;
    const int64_t width = Min(bi, cols - c0);
    T* dst = out + b * m * bi;
    for (int64_t r = 0; r < m; ++r) {
      std::memcpy(dst + r * bi, in + r * cols + c0, sizeof(T) * width);
      for (int64_t i = width; i < bi; ++i) dst[r * bi + i] = T(0);
    }
  }
}

template <typename T>
void TransposeBlocks(const T* blocks, int64_t bh, int64_t bw, T* out,
                     int64_t p_begin, int64_t p_end) {
  const int64_t size = bh * bw;
  for (int64_t p = p_begin; p < p_end; ++p) {
    const T* src = blocks + p * size;
    T* dst = out + p * size;
    for (int64_t i = 0; i < bh; ++i)
      for (int64_t o = 0; o < bw; ++o) dst[o * bh + i] = src[i * bw + o];
  }
}

// ----------------------------------------------------------- values grad

// dvalues of one block: a [BH, BW] tile of accumulators (vectors along the
// block's columns, BH rows in chunks that fit the registers) while the
// dense rows stream by, each row one load of dy and BH broadcasts of x.
template <typename T, int BH, int BW>
void ValuesGradBlock(const ValuesGradArgs<T>& a, int64_t p) {
  constexpr int kBytes = RowVecBytes<T, BW>();
  constexpr int kW = kBytes / static_cast<int>(sizeof(T));
  constexpr int kNV = BW / kW;
  static_assert(BW % kW == 0, "block width must fill whole vectors");
  typedef typename Vec<T, kBytes>::type V;
  constexpr int kChunkRaw = kAccRegs / kNV;
  constexpr int kChunk = kChunkRaw < 1 ? 1 : (kChunkRaw > BH ? BH : kChunkRaw);
  const int64_t r0 = static_cast<int64_t>(a.block_row[p]) * BH;
  const int64_t c0 = static_cast<int64_t>(a.col_indices[p]) * BW;
  const int64_t imax = Min(BH, a.k - r0);
  const int64_t omax = Min(BW, a.n - c0);
  T* dv = a.dvalues + p * (BH * BW);
  // Every element of an inner block is written below; only an edge block's
  // padding needs zeros (at M = 1 the product is one store per element,
  // and a memset first would double the stores).
  if (imax < BH || omax < BW) std::memset(dv, 0, sizeof(T) * BH * BW);
  for (int64_t i0 = 0; i0 < imax; i0 += kChunk) {
    const int64_t ic = Min(kChunk, imax - i0);
    V acc[kChunk][kNV];
    for (int i = 0; i < kChunk; ++i)
      for (int v = 0; v < kNV; ++v) acc[i][v] = V{};
    const T* xr = a.x + r0 + i0;
    const T* dyr = a.dy + c0;
    if (omax == BW && ic == kChunk) {
      for (int64_t m = 0; m < a.m; ++m, xr += a.k, dyr += a.n) {
        V d[kNV];
        for (int v = 0; v < kNV; ++v) d[v] = LoadVec<V>(dyr + v * kW);
        for (int i = 0; i < kChunk; ++i) {
          const V xv = Broadcast<V>(xr[i]);
          for (int v = 0; v < kNV; ++v) acc[i][v] += xv * d[v];
        }
      }
    } else {  // edge block: dy's columns past n and x's rows past k are absent
      for (int64_t m = 0; m < a.m; ++m, xr += a.k, dyr += a.n) {
        T row[BW] = {};
        for (int64_t o = 0; o < omax; ++o) row[o] = dyr[o];
        V d[kNV];
        for (int v = 0; v < kNV; ++v) d[v] = LoadVec<V>(row + v * kW);
        for (int64_t i = 0; i < ic; ++i) {
          const V xv = Broadcast<V>(xr[i]);
          for (int v = 0; v < kNV; ++v) acc[i][v] += xv * d[v];
        }
      }
    }
    if (omax == BW && ic == kChunk) {  // whole rows: vector stores
#pragma GCC unroll 32
      for (int i = 0; i < kChunk; ++i)
        std::memcpy(dv + (i0 + i) * BW, &acc[i][0], sizeof(T) * BW);
    } else {
      for (int64_t i = 0; i < ic; ++i) {
        T row[BW];
        std::memcpy(row, &acc[i][0], sizeof(T) * BW);
        for (int64_t o = 0; o < omax; ++o) dv[(i0 + i) * BW + o] = row[o];
      }
    }
  }
}

// Several inner blocks of one block row at once (a run of up to kNB blocks
// stored one after another): one broadcast of x then serves every block of
// the run, where a block alone makes a broadcast per FMA (17 loads per 16
// FMAs with 16x16 blocks; a run of 3 with 8 rows: 11 loads per 24). The
// dense rows go by in chunks whose x and dy lines stay in L1 for the row
// passes (the partial sums wait in dvalues between chunks).
template <typename T, int BH, int BW>
struct RunTile {
  static constexpr int kBytes = RowVecBytes<T, BW>();
  static constexpr int kW = kBytes / static_cast<int>(sizeof(T));
  static constexpr int kNV = BW / kW;
  static constexpr int Rows() {
    int r = kNV == 1 ? 8 : kAccRegs / (kNV * 3);
    r = r < 1 ? 1 : (r > BH ? BH : r);
    while (BH % r != 0) --r;
    return r;
  }
  static constexpr int kRows = Rows();
  static constexpr int NB() {
    const int nb = kAccRegs / (kRows * kNV);
    return nb < 1 ? 1 : (nb > 6 ? 6 : nb);
  }
  static constexpr int kNB = NB();
};

constexpr int64_t kGradRowChunk = 64;

template <typename T, int BH, int BW, int NB>
void ValuesGradRun(const ValuesGradArgs<T>& a, int64_t p) {
  typedef RunTile<T, BH, BW> Tile;
  constexpr int kW = Tile::kW, kNV = Tile::kNV, kRows = Tile::kRows;
  typedef typename Vec<T, Tile::kBytes>::type V;
  const int64_t r0 = static_cast<int64_t>(a.block_row[p]) * BH;
  const T* dyc[NB];
  T* dv[NB];
  for (int j = 0; j < NB; ++j) {
    dyc[j] = a.dy + static_cast<int64_t>(a.col_indices[p + j]) * BW;
    dv[j] = a.dvalues + (p + j) * (BH * BW);
  }
  // At least one chunk: with no dense rows the blocks get their zeros.
  for (int64_t m0 = 0; m0 == 0 || m0 < a.m; m0 += kGradRowChunk) {
    const int64_t m1 = Min(a.m, m0 + kGradRowChunk);
    for (int i0 = 0; i0 < BH; i0 += kRows) {
      V acc[kRows][NB][kNV];
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 6
        for (int j = 0; j < NB; ++j)
#pragma GCC unroll 4
          for (int v = 0; v < kNV; ++v)
            acc[i][j][v] = m0 == 0 ? V{} : LoadVec<V>(dv[j] + (i0 + i) * BW + v * kW);
      const T* xr = a.x + m0 * a.k + r0 + i0;
      for (int64_t m = m0; m < m1; ++m, xr += a.k) {
        V d[NB][kNV];
#pragma GCC unroll 6
        for (int j = 0; j < NB; ++j)
#pragma GCC unroll 4
          for (int v = 0; v < kNV; ++v) d[j][v] = LoadVec<V>(dyc[j] + m * a.n + v * kW);
#pragma GCC unroll 8
        for (int i = 0; i < kRows; ++i) {
          const V xv = Broadcast<V>(xr[i]);
#pragma GCC unroll 6
          for (int j = 0; j < NB; ++j)
#pragma GCC unroll 4
            for (int v = 0; v < kNV; ++v) acc[i][j][v] += xv * d[j][v];
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 6
        for (int j = 0; j < NB; ++j)
          std::memcpy(dv[j] + (i0 + i) * BW, &acc[i][j][0], sizeof(T) * BW);
    }
  }
}

// Blocks [pb, pe): runs of inner blocks of one block row through
// ValuesGradRun, edge blocks (and the rest) one at a time.
template <typename T, int BH, int BW>
void ValuesGradRuns(const ValuesGradArgs<T>& a, int64_t pb, int64_t pe) {
  constexpr int kNB = RunTile<T, BH, BW>::kNB;
  auto inner = [&](int64_t p) {
    return static_cast<int64_t>(a.block_row[p]) * BH + BH <= a.k &&
           static_cast<int64_t>(a.col_indices[p]) * BW + BW <= a.n;
  };
  int64_t p = pb;
  while (p < pe) {
    int64_t nb = 0;
    while (nb < kNB && p + nb < pe && a.block_row[p + nb] == a.block_row[p] &&
           inner(p + nb))
      ++nb;
    switch (nb) {
#define TFBS_NB(N)                                                    \
  case N:                                                             \
    if constexpr (N <= kNB && N > 1) ValuesGradRun<T, BH, BW, N>(a, p); \
    break;
      TFBS_NB(2) TFBS_NB(3) TFBS_NB(4) TFBS_NB(5) TFBS_NB(6)
#undef TFBS_NB
      default:
        nb = 1;
        ValuesGradBlock<T, BH, BW>(a, p);
        break;
    }
    p += nb;
  }
}

// Any shape: the block's dvalues summed over m in a stack tile.
template <typename T>
void ValuesGradGeneric(const ValuesGradArgs<T>& a, int64_t p) {
  const int64_t bh = a.bh, bw = a.bw;
  const int64_t r0 = static_cast<int64_t>(a.block_row[p]) * bh;
  const int64_t c0 = static_cast<int64_t>(a.col_indices[p]) * bw;
  const int64_t imax = Min(bh, a.k - r0);
  const int64_t omax = Min(bw, a.n - c0);
  T* dv = a.dvalues + p * bh * bw;
  std::memset(dv, 0, sizeof(T) * bh * bw);
  for (int64_t m = 0; m < a.m; ++m) {
    const T* xr = a.x + m * a.k + r0;
    const T* dyr = a.dy + m * a.n + c0;
    for (int64_t i = 0; i < imax; ++i) {
      const T xv = xr[i];
      for (int64_t o = 0; o < omax; ++o) dv[i * bw + o] += xv * dyr[o];
    }
  }
}

template <typename T>
void ValuesGrad(const ValuesGradArgs<T>& a, int64_t pb, int64_t pe) {
  const int64_t bh = a.bh, bw = a.bw;
#define TFBS_CASE(H, W)                                             \
  if (bh == H && bw == W) {                                         \
    ValuesGradRuns<T, H, W>(a, pb, pe);                            \
    return;                                                         \
  }
  TFBS_CASE(4, 4) TFBS_CASE(8, 8) TFBS_CASE(16, 16) TFBS_CASE(32, 32)
  TFBS_CASE(1, 4) TFBS_CASE(1, 16)
#undef TFBS_CASE
  for (int64_t p = pb; p < pe; ++p) ValuesGradGeneric<T>(a, p);
}

#define TFBS_STR2(x) #x
#define TFBS_STR(x) TFBS_STR2(x)

template <typename T>
const CpuKernels<T> kKernels = {
    TFBS_STR(TFBS_ISA_NS), &Plan<T>, &RowProduct<T>, &PanelProduct<T>,
    &PackBlockColumns<T>, &PackPanels<T>, &TransposeBlocks<T>,
    &ValuesGrad<T>,        &ScatterProduct<T>,     &GatherProduct<T>,
    &RepeatSegments<T>,
};

}  // namespace

template <typename T>
const CpuKernels<T>& MatmulKernels() {
  return kKernels<T>;
}

template const CpuKernels<float>& MatmulKernels<float>();
template const CpuKernels<double>& MatmulKernels<double>();

}  // namespace TFBS_ISA_NS
}  // namespace tfbs

TFBS_ISA_END
