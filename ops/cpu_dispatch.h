// Run-time choice of the CPU instruction set (cpu_isa.h) for the kernels.
//
// The widest ISA that both this build and the CPU (CPUID, and the OS's
// XSAVE state) support is taken, unless TF_BLOCKSPARSE_ISA (baseline, avx2,
// avx512, auto) or SelectCpuIsa() forces one. Each OpKernel asks once per
// call and runs the whole call on that ISA's table. Free of TensorFlow
// includes, compiled with the baseline flags.
#ifndef TF_BLOCKSPARSE_OPS_CPU_DISPATCH_H_
#define TF_BLOCKSPARSE_OPS_CPU_DISPATCH_H_

#include <string>

#include "bsr_matmul_cpu_kernels.h"
#include "bsr_rnn_cpu_kernels.h"
#include "cpu_isa.h"

namespace tfbs {

// The ISA for this call. False, with a message naming what the CPU lacks,
// when the forced ISA cannot run here.
bool ActiveCpuIsa(CpuIsa* isa, std::string* error);

// Forces an ISA by name ("auto" lets the CPU decide again). Returns an empty
// string, or why not (unknown name, not built, not supported by this CPU).
std::string SelectCpuIsa(const std::string& name);

// JSON object: the ISA in use, why, what was built, the CPU features seen.
std::string CpuKernelInfoJson();

template <typename T>
const CpuKernels<T>& MatmulKernelsFor(CpuIsa isa);

template <typename T>
void RunRnnSequenceOn(CpuIsa isa, const RnnSequenceArgs<T>& args,
                      const ParallelFor& parallel_for);

}  // namespace tfbs

#endif  // TF_BLOCKSPARSE_OPS_CPU_DISPATCH_H_
