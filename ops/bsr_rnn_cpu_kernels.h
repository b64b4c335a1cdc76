// CPU arithmetic of the fused block-sparse recurrence ops (LSTM, GRU,
// SimpleRNN over a whole sequence). Free of TensorFlow includes, like
// bsr_matmul_cpu_kernels.h, and compiled once per ISA the same way; the TF
// kernel hands in the thread pool as a plain callback.
//
// The input projection x @ W (+ bias) of all timesteps is done before the
// op as one BSR matmul with M = batch * T (the cuDNN paper's first rule);
// this code runs the time loop: per step one BSR product h_{t-1} @ U with
// all gates in one matrix, then one pass of the gate non-linearities and
// the state update.
#ifndef TF_BLOCKSPARSE_OPS_BSR_RNN_CPU_KERNELS_H_
#define TF_BLOCKSPARSE_OPS_BSR_RNN_CPU_KERNELS_H_

#include <cstdint>
#include <functional>
#include <string>

namespace tfbs {

enum class RnnCell { kSimple, kGru, kLstm };

enum class Activation { kTanh, kSigmoid, kRelu, kLinear, kHardSigmoid };

// Parses a Keras activation name; false when it has no fused version.
// (Defined in cpu_dispatch.cc: it is not arithmetic.)
bool ParseActivation(const std::string& name, Activation* out);

// Number of gate blocks of width `units` in the recurrent matrix.
inline int64_t NumGates(RnnCell cell) {
  return cell == RnnCell::kLstm ? 4 : (cell == RnnCell::kGru ? 3 : 1);
}

// Runs fn(begin, end) over [0, n) in parallel shards and returns when all
// are done; cost_per_unit is a rough cycle count per index.
using ParallelFor = std::function<void(
    int64_t n, int64_t cost_per_unit,
    const std::function<void(int64_t, int64_t)>& fn)>;

template <typename T>
struct RnnSequenceArgs {
  RnnCell cell = RnnCell::kLstm;
  int64_t batch = 0;
  int64_t time = 0;
  int64_t units = 0;
  const T* x_proj = nullptr;          // [batch, time, gates * units]
  const T* h0 = nullptr;              // [batch, units]
  const T* c0 = nullptr;              // [batch, units], LSTM only
  const uint8_t* mask = nullptr;      // [batch, time] or null (all steps)
  const T* recurrent_bias = nullptr;  // [gates * units] or null
  // Recurrent matrix U [units, gates * units] in BSR form with its
  // column index (see BuildColumnIndex): blocks [bh, bw].
  const T* blocks = nullptr;
  int64_t bh = 0;
  int64_t bw = 0;
  int64_t nbc = 0;
  const int32_t* col_ptr = nullptr;
  const int32_t* block_ids = nullptr;
  const int32_t* block_rows = nullptr;
  Activation activation = Activation::kTanh;
  Activation recurrent_activation = Activation::kSigmoid;
  bool reset_after = true;  // GRU: reset gate applied after the product
  bool go_backwards = false;
  bool zero_output_for_mask = false;
  T* outputs = nullptr;  // [batch, time, units], in processing order
  T* h_out = nullptr;    // [batch, units]
  T* c_out = nullptr;    // [batch, units], LSTM only
};

// Runs the recurrence with Keras semantics: a masked step keeps the states
// and outputs the previous output (or zeros with zero_output_for_mask);
// go_backwards reads the inputs from the last step to the first.
// One per ISA (bsr_rnn_cpu_kernels.cc); the OpKernel calls the one of the
// ISA it chose for the call (RunRnnSequenceOn in cpu_dispatch.h).
#define TFBS_DECLARE_RNN_KERNELS(ns)                     \
  namespace ns {                                         \
  template <typename T>                                  \
  void RunRnnSequence(const RnnSequenceArgs<T>& args,    \
                      const ParallelFor& parallel_for);  \
  }
TFBS_DECLARE_RNN_KERNELS(isa_baseline)
TFBS_DECLARE_RNN_KERNELS(isa_avx2)
TFBS_DECLARE_RNN_KERNELS(isa_avx512)
#undef TFBS_DECLARE_RNN_KERNELS

}  // namespace tfbs

#endif  // TF_BLOCKSPARSE_OPS_BSR_RNN_CPU_KERNELS_H_
