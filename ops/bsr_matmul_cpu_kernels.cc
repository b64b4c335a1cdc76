// Register-tiled CPU kernels for BSR products, specialised on block shape.
//
// The one dispatch point is DispatchBlockShape() at the bottom: the block
// shapes users prune to (square 4..32 and the TFLite-friendly 4x1 / 16x1,
// whose transposes the backward pass needs) get a kernel whose inner loops
// have compile-time trip counts, so the compiler keeps the accumulator tile
// in vector registers; every other shape takes the generic runtime loop.
#include "bsr_matmul_cpu_kernels.h"

#include <algorithm>
#include <cstring>

namespace tfbs {
namespace {

// Rows of the dense operand kept in registers per tile: enough accumulators
// to hide FMA latency, few enough to leave registers for the block row and
// the broadcast (16 AVX2 registers).
template <typename T, int kLanes>
constexpr int RowsPerTile() {
  constexpr int kVec = 32 / static_cast<int>(sizeof(T));
  constexpr int kVecsPerRow = (kLanes + kVec - 1) / kVec;
  constexpr int kRows = 12 / kVecsPerRow;
  return kRows < 1 ? 1 : (kRows > 8 ? 8 : kRows);
}

// GCC/Clang vector extension type holding `kBytes` bytes of T. Explicit
// vectors (rather than hoping the auto-vectoriser keeps a 2-D accumulator
// array in registers, which it did not: 1.4 GFLOP/s) give the FMA tile below.
template <typename T, int kBytes>
struct Vec {
  typedef T type __attribute__((vector_size(kBytes)));
};

// Bytes per vector for a row of `lanes` T: a full AVX register when the row
// fills one, else the whole row (4 floats -> 16 bytes).
template <typename T, int lanes>
constexpr int VecBytes() {
  constexpr int kRow = lanes * static_cast<int>(sizeof(T));
  return kRow >= 32 ? 32 : kRow;
}

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

// One tile of kRows dense rows times one group, for blocks [BI, BO].
template <typename T, int BI, int BO, int kRows>
inline void ProductTile(const GroupedProductArgs<T>& a, int64_t g, int64_t m) {
  constexpr int kBytes = VecBytes<T, BO>();
  constexpr int kW = kBytes / static_cast<int>(sizeof(T));
  constexpr int kNV = BO / kW;
  static_assert(BO % kW == 0, "block width must fill whole vectors");
  typedef typename Vec<T, kBytes>::type V;
  V acc[kRows][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) acc[r][v] = V{};
  const int64_t ld = a.in_row_stride;
  const T* in_rows = a.in + m * ld;
  for (int32_t p = a.group_ptr[g]; p < a.group_ptr[g + 1]; ++p) {
    const int64_t id = a.ids ? a.ids[p] : p;
    const T* blk = a.blocks + id * (BI * BO);
    const int64_t c0 = static_cast<int64_t>(a.in_block[p]) * BI;
    const T* x = in_rows + a.in_block[p] * a.in_block_stride;
    // The bottom edge block's padded rows have no input: stop at in_cols.
    auto step = [&](int i) __attribute__((always_inline)) {
      V b[kNV];
#pragma GCC unroll 8
      for (int v = 0; v < kNV; ++v) b[v] = LoadVec<V>(blk + i * BO + v * kW);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const V xv = Broadcast<V>(x[r * ld + i]);
#pragma GCC unroll 8
        for (int v = 0; v < kNV; ++v) acc[r][v] += xv * b[v];
      }
    };
    if (c0 + BI <= a.in_cols) {
#pragma GCC unroll 4
      for (int i = 0; i < BI; ++i) step(i);
    } else {  // bottom edge block: its padded rows have no input
      const int imax = static_cast<int>(a.in_cols - c0);
      for (int i = 0; i < imax; ++i) step(i);
    }
  }
  const int64_t o0 = g * BO;
  const int64_t omax = std::min<int64_t>(BO, a.out_cols - o0);
  T* out = a.out + m * a.out_cols + o0;
  for (int r = 0; r < kRows; ++r) {
    if (omax == BO) {
      std::memcpy(out + r * a.out_cols, &acc[r][0], sizeof(T) * BO);
    } else {
      T row[BO];
      std::memcpy(row, &acc[r][0], sizeof(T) * BO);
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
    const T* __restrict blk = a.blocks + id * BI;
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

template <typename T, int BI, int BO>
void ProductFixed(const GroupedProductArgs<T>& a, int64_t g_begin,
                  int64_t g_end, int64_t m_begin, int64_t m_end) {
  constexpr int kRows = RowsPerTile<T, (BO == 1 ? BI : BO)>();
  for (int64_t g = g_begin; g < g_end; ++g) {
    int64_t m = m_begin;
    for (; m + kRows <= m_end; m += kRows) {
      if constexpr (BO == 1) DotTile<T, BI, kRows>(a, g, m);
      else ProductTile<T, BI, BO, kRows>(a, g, m);
    }
    for (; m < m_end; ++m) {
      if constexpr (BO == 1) DotTile<T, BI, 1>(a, g, m);
      else ProductTile<T, BI, BO, 1>(a, g, m);
    }
  }
}

template <typename T>
void ProductGeneric(const GroupedProductArgs<T>& a, int64_t g_begin,
                    int64_t g_end, int64_t m_begin, int64_t m_end) {
  const int64_t bi = a.bi, bo = a.bo;
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t o0 = g * bo;
    const int64_t omax = std::min<int64_t>(bo, a.out_cols - o0);
    for (int64_t m = m_begin; m < m_end; ++m) {
      T* out = a.out + m * a.out_cols + o0;
      for (int64_t o = 0; o < omax; ++o) out[o] = T(0);
      for (int32_t p = a.group_ptr[g]; p < a.group_ptr[g + 1]; ++p) {
        const int64_t id = a.ids ? a.ids[p] : p;
        const T* blk = a.blocks + id * bi * bo;
        const int64_t c0 = static_cast<int64_t>(a.in_block[p]) * bi;
        const int64_t imax = std::min<int64_t>(bi, a.in_cols - c0);
        const T* x = a.in + m * a.in_row_stride + a.in_block[p] * a.in_block_stride;
        for (int64_t i = 0; i < imax; ++i) {
          const T xv = x[i];
          for (int64_t o = 0; o < omax; ++o) out[o] += xv * blk[i * bo + o];
        }
      }
    }
  }
}

// The only place that maps a runtime block shape to a specialised kernel.
template <typename T, template <typename, int, int> class Fn, typename... A>
void DispatchBlockShape(int64_t bi, int64_t bo, A&&... args) {
#define TFBS_CASE(I, O) \
  if (bi == I && bo == O) return Fn<T, I, O>::Run(args...);
  TFBS_CASE(4, 4) TFBS_CASE(8, 8) TFBS_CASE(16, 16) TFBS_CASE(32, 32)
  TFBS_CASE(4, 1) TFBS_CASE(16, 1) TFBS_CASE(1, 4) TFBS_CASE(1, 16)
#undef TFBS_CASE
  Fn<T, 0, 0>::Run(args...);  // 0 x 0 selects the generic kernel
}

template <typename T, int BI, int BO>
struct ProductFn {
  static void Run(const GroupedProductArgs<T>& a, int64_t gb, int64_t ge,
                  int64_t mb, int64_t me) {
    if constexpr (BI == 0) ProductGeneric<T>(a, gb, ge, mb, me);
    else ProductFixed<T, BI, BO>(a, gb, ge, mb, me);
  }
};

// dvalues of one block, in chunks of kChunk block rows so that the
// accumulator chunk stays in registers while the dense rows stream by.
template <typename T, int BH, int BW>
void ValuesGradBlock(const ValuesGradArgs<T>& a, int64_t p) {
  constexpr int kVec = 32 / static_cast<int>(sizeof(T));
  constexpr int kVecsPerRow = (BW + kVec - 1) / kVec;
  constexpr int kChunkRaw = 12 / kVecsPerRow;
  constexpr int kChunk = kChunkRaw < 1 ? 1 : (kChunkRaw > BH ? BH : kChunkRaw);
  const int64_t r0 = static_cast<int64_t>(a.block_row[p]) * BH;
  const int64_t c0 = static_cast<int64_t>(a.col_indices[p]) * BW;
  const int64_t imax = std::min<int64_t>(BH, a.k - r0);
  const bool full_cols = c0 + BW <= a.n;
  T* dv = a.dvalues + p * (BH * BW);
  std::memset(dv, 0, sizeof(T) * BH * BW);
  for (int64_t i0 = 0; i0 < imax; i0 += kChunk) {
    T acc[kChunk][BW];
    for (int i = 0; i < kChunk; ++i)
      for (int o = 0; o < BW; ++o) acc[i][o] = T(0);
    const int64_t ic = std::min<int64_t>(kChunk, imax - i0);
    for (int64_t m = 0; m < a.m; ++m) {
      const T* __restrict xr = a.x + m * a.k + r0 + i0;
      const T* __restrict dyr = a.dy + m * a.n + c0;
      if (full_cols && ic == kChunk) {
        for (int i = 0; i < kChunk; ++i) {
          const T xv = xr[i];
          for (int o = 0; o < BW; ++o) acc[i][o] += xv * dyr[o];
        }
      } else {
        const int64_t omax = std::min<int64_t>(BW, a.n - c0);
        for (int64_t i = 0; i < ic; ++i)
          for (int64_t o = 0; o < omax; ++o) acc[i][o] += xr[i] * dyr[o];
      }
    }
    for (int64_t i = 0; i < ic; ++i)
      for (int o = 0; o < BW; ++o) dv[(i0 + i) * BW + o] = acc[i][o];
  }
}

template <typename T>
void ValuesGradGeneric(const ValuesGradArgs<T>& a, int64_t p) {
  const int64_t bh = a.bh, bw = a.bw;
  const int64_t r0 = static_cast<int64_t>(a.block_row[p]) * bh;
  const int64_t c0 = static_cast<int64_t>(a.col_indices[p]) * bw;
  const int64_t imax = std::min<int64_t>(bh, a.k - r0);
  const int64_t omax = std::min<int64_t>(bw, a.n - c0);
  T* dv = a.dvalues + p * bh * bw;
  std::memset(dv, 0, sizeof(T) * bh * bw);
  for (int64_t m = 0; m < a.m; ++m) {
    const T* xr = a.x + m * a.k + r0;
    const T* dyr = a.dy + m * a.n + c0;
    for (int64_t i = 0; i < imax; ++i)
      for (int64_t o = 0; o < omax; ++o) dv[i * bw + o] += xr[i] * dyr[o];
  }
}

template <typename T, int BH, int BW>
struct ValuesGradFn {
  static void Run(const ValuesGradArgs<T>& a, int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      if constexpr (BH == 0) ValuesGradGeneric<T>(a, p);
      else ValuesGradBlock<T, BH, BW>(a, p);
    }
  }
};

}  // namespace

template <typename T>
void GroupedBlockProduct(const GroupedProductArgs<T>& args, int64_t g_begin,
                         int64_t g_end, int64_t m_begin, int64_t m_end) {
  DispatchBlockShape<T, ProductFn>(args.bi, args.bo, args, g_begin, g_end,
                                   m_begin, m_end);
}

template <typename T>
void BsrValuesGrad(const ValuesGradArgs<T>& args, int64_t p_begin,
                   int64_t p_end) {
  DispatchBlockShape<T, ValuesGradFn>(args.bh, args.bw, args, p_begin, p_end);
}

template <typename T>
void PackBlockColumns(const T* in, int64_t m, int64_t cols, int64_t bi, T* out,
                      int64_t b_begin, int64_t b_end) {
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t c0 = b * bi;
    const int64_t width = std::min<int64_t>(bi, cols - c0);
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

#define TFBS_INSTANTIATE(T)                                                  \
  template void GroupedBlockProduct<T>(const GroupedProductArgs<T>&, int64_t, \
                                       int64_t, int64_t, int64_t);          \
  template void BsrValuesGrad<T>(const ValuesGradArgs<T>&, int64_t, int64_t); \
  template void TransposeBlocks<T>(const T*, int64_t, int64_t, T*, int64_t,  \
                                   int64_t);                                 \
  template void PackBlockColumns<T>(const T*, int64_t, int64_t, int64_t, T*, \
                                    int64_t, int64_t);
TFBS_INSTANTIATE(float)
TFBS_INSTANTIATE(double)
#undef TFBS_INSTANTIATE

}  // namespace tfbs
