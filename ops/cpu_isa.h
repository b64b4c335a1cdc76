// The instruction sets the CPU arithmetic is built for, and what one
// arithmetic translation unit needs to know about its own.
//
// Every ops/*_cpu_kernels.cc is compiled once per ISA with
// -DTFBS_CPU_ISA=<CpuIsa value> and the baseline flags; the wider ISA is
// switched on inside the file with TFBS_ISA_BEGIN, placed after the system
// headers. That order matters: the standard library's inline functions and
// templates (std::vector, std::function, ...) are then compiled with the
// baseline flags in every copy, so whichever copy the linker keeps runs on
// any CPU. Only our own code, inside the ISA's namespace, gets the wide
// instructions, and cpu_dispatch.cc calls it only after CPUID said yes.
//
// An ARM NEON path is one more enum value, one more block below and one
// more compile of the same files.
#ifndef TF_BLOCKSPARSE_OPS_CPU_ISA_H_
#define TF_BLOCKSPARSE_OPS_CPU_ISA_H_

namespace tfbs {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline constexpr int kNumCpuIsas = 3;

}  // namespace tfbs

#ifdef TFBS_CPU_ISA

#if TFBS_CPU_ISA == 0
// x86-64-v2 (SSE4.2) on x86, the compiler's default elsewhere.
#define TFBS_ISA_NS isa_baseline
#define TFBS_VEC_BYTES 16
#define TFBS_VEC_REGS 16
#define TFBS_ISA_BEGIN
#define TFBS_ISA_END
#elif TFBS_CPU_ISA == 1
#define TFBS_ISA_NS isa_avx2
#define TFBS_VEC_BYTES 32
#define TFBS_VEC_REGS 16
#define TFBS_ISA_BEGIN \
  _Pragma("GCC push_options") \
  _Pragma("GCC target(\"avx2,fma,bmi,bmi2,f16c,popcnt\")")
#define TFBS_ISA_END _Pragma("GCC pop_options")
#elif TFBS_CPU_ISA == 2
// prefer-vector-width=512: GCC auto-vectorises with 256-bit vectors by
// default even where 512-bit ones exist; the gate loops want all 16 lanes.
#define TFBS_ISA_NS isa_avx512
#define TFBS_VEC_BYTES 64
#define TFBS_VEC_REGS 32
#define TFBS_ISA_BEGIN                                                     \
  _Pragma("GCC push_options")                                              \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,f16c,popcnt,prefer-vector-width=512\")")
#define TFBS_ISA_END _Pragma("GCC pop_options")
#else
#error "unknown TFBS_CPU_ISA"
#endif

#endif  // TFBS_CPU_ISA

#endif  // TF_BLOCKSPARSE_OPS_CPU_ISA_H_
