// Time loop of the fused block-sparse recurrences.
//
// Per step the work is small (at batch 8 a few hundred microseconds or
// less), so each step costs one ParallelFor when the gate width is a
// multiple of the block width: a shard owns a range of unit blocks, computes
// the recurrent product for the block columns of all gates of those units
// (column u of gate i, f, c, o ...) and applies the gate math to them right
// away, without a second barrier. Other widths take a product pass over all
// block columns, then a gate pass over units.
#include "bsr_rnn_cpu_kernels.h"

// Without it GCC will not if-convert the selects in ExpF/TanhF (a compare
// "may trap"), and the activation loops stay scalar: 0.6 ms per LSTM step
// at 1024 units instead of a few microseconds. Only this file's arithmetic
// is affected; no code here relies on floating-point exceptions.
#pragma GCC optimize("no-trapping-math")

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "bsr_matmul_cpu_kernels.h"
#include "cpu_isa.h"

TFBS_ISA_BEGIN

namespace tfbs {
namespace TFBS_ISA_NS {
namespace {

// Units processed together in the gate pass (stack scratch per span).
constexpr int64_t kSpan = 64;

// exp for float, branch free so that the loops below vectorise: 2^n times a
// degree-6 polynomial on [-ln2/2, ln2/2], accurate to about 2 ulp. libm's
// expf/tanhf are scalar calls and would cost more than the sparse product.
inline float ExpF(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  // Round to nearest by the 1.5 * 2^23 trick: plain float adds, which
  // vectorise where floor/nearbyint calls may not.
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}
inline float SigmoidF(float x) { return 1.f / (1.f + ExpF(-x)); }

// tanh from exp(-2|x|) (no overflow, no cancellation except near 0, where
// the odd Taylor series to x^7 takes over: error below 1e-7 for |x| < 0.2).
inline float TanhF(float x) {
  const float ax = x < 0.f ? -x : x;
  const float e = ExpF(-2.f * ax);
  const float big = (1.f - e) / (1.f + e);
  const float x2 = ax * ax;
  const float small =
      ax * (1.f + x2 * (-1.f / 3.f + x2 * (2.f / 15.f + x2 * (-17.f / 315.f))));
  const float t = ax < 0.2f ? small : big;
  return x < 0.f ? -t : t;
}

template <typename T>
inline T Sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }
template <>
inline float Sigmoid<float>(float x) { return SigmoidF(x); }

template <typename T>
inline T Tanh(T x) { return std::tanh(x); }
template <>
inline float Tanh<float>(float x) { return TanhF(x); }

// x[0..n) = activation(x[0..n)); the switch is outside the loops.
template <typename T>
void Activate(Activation a, T* __restrict x, int64_t n) {
  switch (a) {
    case Activation::kTanh:
      for (int64_t i = 0; i < n; ++i) x[i] = Tanh<T>(x[i]);
      return;
    case Activation::kSigmoid:
      for (int64_t i = 0; i < n; ++i) x[i] = Sigmoid<T>(x[i]);
      return;
    case Activation::kRelu:
      for (int64_t i = 0; i < n; ++i) x[i] = std::max(x[i], T(0));
      return;
    case Activation::kLinear:
      return;
    case Activation::kHardSigmoid:
      // Keras: clip(0.2 x + 0.5, 0, 1), in the same order of operations.
      for (int64_t i = 0; i < n; ++i)
        x[i] = std::min(std::max(x[i] * T(0.2) + T(0.5), T(0)), T(1));
      return;
  }
}

// State of one sequence run, shared by the shards of every step.
template <typename T>
class Recurrence {
 public:
  Recurrence(const RnnSequenceArgs<T>& a, const ParallelFor& parallel_for)
      : a_(a),
        parallel_for_(parallel_for),
        gates_(NumGates(a.cell)),
        width_(gates_ * a.units),
        h_prev_(a.h0, a.h0 + a.batch * a.units),
        h_next_(a.batch * a.units),
        rec_(a.batch * width_) {
    if (a.cell == RnnCell::kGru && !a.reset_after) {
      rh_.resize(a.batch * a.units);
      z_.resize(a.batch * a.units);
    }
    if (a.cell == RnnCell::kLstm) {
      std::copy(a.c0, a.c0 + a.batch * a.units, a.c_out);
    }
    // The blocks in column order, so that each block column is one
    // contiguous stream: read in storage (row) order, consecutive blocks of
    // a column are a whole block row apart, a page or more, and every step
    // re-reads them all. One copy per sequence, amortised over the steps.
    const int64_t block_elems = a.bh * a.bw;
    const int64_t nnzb = a.col_ptr[a.nbc];
    packed_.resize(nnzb * block_elems);
    for (int64_t q = 0; q < nnzb; ++q) {
      std::copy(a.blocks + a.block_ids[q] * block_elems,
                a.blocks + (a.block_ids[q] + 1) * block_elems,
                packed_.data() + q * block_elems);
    }
    product_.in_cols = a.units;
    product_.in_row_stride = a.units;
    product_.in_block_stride = a.bh;
    product_.blocks = packed_.data();
    product_.m = a.batch;
    product_.bi = a.bh;
    product_.bo = a.bw;
    product_.block_elems = block_elems;
    product_.w_row = a.bw;
    product_.w_col = 1;
    product_.group_ptr = a.col_ptr;
    product_.ids = nullptr;  // position q in column order is the block
    product_.in_block = a.block_rows;
    product_.out = rec_.data();
    product_.out_cols = width_;
    aligned_ = a.units % a.bw == 0;
    unit_blocks_ = aligned_ ? a.units / a.bw : 0;
  }

  void Run() {
    const int64_t T_ = a_.time;
    for (int64_t s = 0; s < T_; ++s) {
      const int64_t t = a_.go_backwards ? T_ - 1 - s : s;
      Step(s, t);
      h_prev_.swap(h_next_);
    }
    std::copy(h_prev_.begin(), h_prev_.end(), a_.h_out);
  }

 private:
  // Cycles of the product for one block column at this batch size.
  int64_t ColumnCost() const {
    const int64_t blocks_per_col = a_.nbc > 0 ? (col_total() / a_.nbc + 1) : 1;
    return std::max<int64_t>(1, 2 * a_.batch * blocks_per_col * a_.bh * a_.bw);
  }
  int64_t col_total() const { return a_.col_ptr[a_.nbc]; }

  void Product(const T* in, int64_t g_begin, int64_t g_end) {
    GroupedProductArgs<T> p = product_;
    p.in = in;
    MatmulKernels<T>().row_product(p, g_begin, g_end, 0, a_.batch);
  }

  void Step(int64_t s, int64_t t) {
    const bool gru_split = a_.cell == RnnCell::kGru && !a_.reset_after;
    const int64_t gate_cost = 40 * a_.batch * gates_;
    if (aligned_) {
      const int64_t ub = unit_blocks_;
      const int64_t first_pass_gates = gru_split ? 2 : gates_;
      const int64_t cost = first_pass_gates * ColumnCost() + gate_cost * a_.bw;
      parallel_for_(ub, cost, [&](int64_t u0, int64_t u1) {
        for (int64_t q = 0; q < first_pass_gates; ++q)
          Product(h_prev_.data(), q * ub + u0, q * ub + u1);
        Gates(s, t, u0 * a_.bw, u1 * a_.bw, /*phase=*/0);
      });
      if (gru_split) {
        parallel_for_(ub, ColumnCost() + gate_cost * a_.bw,
                      [&](int64_t u0, int64_t u1) {
                        Product(rh_.data(), 2 * ub + u0, 2 * ub + u1);
                        Gates(s, t, u0 * a_.bw, u1 * a_.bw, /*phase=*/1);
                      });
      }
      return;
    }
    // Gate boundaries fall inside blocks: product pass, then gate pass.
    const int64_t H = a_.units;
    const int64_t spans = (H + kSpan - 1) / kSpan;
    auto gate_pass = [&](int phase) {
      parallel_for_(spans, gate_cost * kSpan, [&](int64_t b0, int64_t b1) {
        Gates(s, t, b0 * kSpan, std::min(H, b1 * kSpan), phase);
      });
    };
    auto product_pass = [&](const T* in, int64_t g0, int64_t g1) {
      parallel_for_(g1 - g0, ColumnCost(), [&](int64_t b0, int64_t b1) {
        Product(in, g0 + b0, g0 + b1);
      });
    };
    if (!gru_split) {
      product_pass(h_prev_.data(), 0, a_.nbc);
      gate_pass(0);
      return;
    }
    product_pass(h_prev_.data(), 0, (2 * H + a_.bw - 1) / a_.bw);
    gate_pass(0);
    product_pass(rh_.data(), (2 * H) / a_.bw, a_.nbc);
    gate_pass(1);
  }

  // Gate math and state update for units [j0, j1) of every batch row. GRU
  // without reset_after runs in two phases around the second product.
  void Gates(int64_t s, int64_t t, int64_t j0, int64_t j1, int phase) {
    for (int64_t b = 0; b < a_.batch; ++b) {
      for (int64_t j = j0; j < j1; j += kSpan) {
        const int64_t n = std::min(kSpan, j1 - j);
        GateSpan(s, t, b, j, n, phase);
      }
    }
  }

  void GateSpan(int64_t s, int64_t t, int64_t b, int64_t j, int64_t n,
                int phase) {
    const int64_t H = a_.units;
    const T* __restrict x = a_.x_proj + (b * a_.time + t) * width_;
    const T* __restrict r = rec_.data() + b * width_;
    const T* __restrict rb = a_.recurrent_bias;
    const T* __restrict hp = h_prev_.data() + b * H + j;
    T* __restrict hn = h_next_.data() + b * H + j;
    const bool valid = a_.mask == nullptr || a_.mask[b * a_.time + t] != 0;
    T* __restrict out = a_.outputs + (b * a_.time + s) * H + j;
    if (!valid) {
      if (phase == 0) {
        // A masked step keeps the states and repeats the previous output.
        std::copy(hp, hp + n, hn);
        if (a_.zero_output_for_mask || s == 0) {
          std::fill(out, out + n, T(0));
        } else {
          std::copy(out - H, out - H + n, out);
        }
        if (!rh_.empty()) {  // the second GRU phase must leave them alone
          std::copy(hp, hp + n, rh_.data() + b * H + j);
        }
      }
      return;
    }
    T g0[kSpan], g1[kSpan], g2[kSpan], g3[kSpan];
    auto pre = [&](int q, T* dst) {
      const int64_t o = q * H + j;
      if (rb != nullptr) {
        for (int64_t i = 0; i < n; ++i) dst[i] = x[o + i] + r[o + i] + rb[o + i];
      } else {
        for (int64_t i = 0; i < n; ++i) dst[i] = x[o + i] + r[o + i];
      }
    };
    switch (a_.cell) {
      case RnnCell::kSimple: {
        pre(0, g0);
        Activate(a_.activation, g0, n);
        std::copy(g0, g0 + n, hn);
        break;
      }
      case RnnCell::kLstm: {
        pre(0, g0);
        pre(1, g1);
        pre(2, g2);
        pre(3, g3);
        Activate(a_.recurrent_activation, g0, n);
        Activate(a_.recurrent_activation, g1, n);
        Activate(a_.activation, g2, n);
        Activate(a_.recurrent_activation, g3, n);
        T* __restrict c = a_.c_out + b * H + j;
        for (int64_t i = 0; i < n; ++i) {
          c[i] = g1[i] * c[i] + g0[i] * g2[i];
          g2[i] = c[i];
        }
        Activate(a_.activation, g2, n);
        for (int64_t i = 0; i < n; ++i) hn[i] = g3[i] * g2[i];
        break;
      }
      case RnnCell::kGru: {
        if (a_.reset_after) {
          pre(0, g0);
          pre(1, g1);
          Activate(a_.recurrent_activation, g0, n);
          Activate(a_.recurrent_activation, g1, n);
          const int64_t o = 2 * H + j;
          for (int64_t i = 0; i < n; ++i) {
            const T rec_h = r[o + i] + (rb != nullptr ? rb[o + i] : T(0));
            g2[i] = x[o + i] + g1[i] * rec_h;
          }
          Activate(a_.activation, g2, n);
          for (int64_t i = 0; i < n; ++i)
            hn[i] = g0[i] * hp[i] + (T(1) - g0[i]) * g2[i];
        } else if (phase == 0) {
          pre(0, g0);
          pre(1, g1);
          Activate(a_.recurrent_activation, g0, n);
          Activate(a_.recurrent_activation, g1, n);
          T* __restrict z = z_.data() + b * H + j;
          T* __restrict rh = rh_.data() + b * H + j;
          for (int64_t i = 0; i < n; ++i) {
            z[i] = g0[i];
            rh[i] = g1[i] * hp[i];
          }
          return;  // output after phase 1
        } else {
          const int64_t o = 2 * H + j;
          const T* __restrict z = z_.data() + b * H + j;
          for (int64_t i = 0; i < n; ++i) g2[i] = x[o + i] + r[o + i];
          Activate(a_.activation, g2, n);
          for (int64_t i = 0; i < n; ++i)
            hn[i] = z[i] * hp[i] + (T(1) - z[i]) * g2[i];
        }
        break;
      }
    }
    std::copy(hn, hn + n, out);
  }

  const RnnSequenceArgs<T>& a_;
  const ParallelFor& parallel_for_;
  const int64_t gates_;
  const int64_t width_;
  std::vector<T> h_prev_, h_next_, rec_, rh_, z_, packed_;
  GroupedProductArgs<T> product_;
  bool aligned_ = false;
  int64_t unit_blocks_ = 0;
};

}  // namespace

template <typename T>
void RunRnnSequence(const RnnSequenceArgs<T>& args,
                    const ParallelFor& parallel_for) {
  if (args.batch == 0 || args.units == 0) return;
  Recurrence<T> recurrence(args, parallel_for);
  recurrence.Run();
}

template void RunRnnSequence<float>(const RnnSequenceArgs<float>&,
                                    const ParallelFor&);
template void RunRnnSequence<double>(const RnnSequenceArgs<double>&,
                                     const ParallelFor&);

}  // namespace TFBS_ISA_NS
}  // namespace tfbs

TFBS_ISA_END
