// CPUID detection and the ISA switch of the CPU kernels (cpu_dispatch.h).
// Compiled with the baseline flags: it runs before anything wider is known
// to be safe.
#include "cpu_dispatch.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define TFBS_X86 1
#endif

namespace tfbs {

bool ParseActivation(const std::string& name, Activation* out) {
  if (name == "tanh") *out = Activation::kTanh;
  else if (name == "sigmoid") *out = Activation::kSigmoid;
  else if (name == "relu") *out = Activation::kRelu;
  else if (name == "linear") *out = Activation::kLinear;
  else if (name == "hard_sigmoid") *out = Activation::kHardSigmoid;
  else return false;
  return true;
}

namespace {

const char* const kIsaNames[kNumCpuIsas] = {"baseline", "avx2", "avx512"};

struct CpuFeatures {
  std::vector<std::string> present;  // every feature we look at that is there
  bool isa[kNumCpuIsas] = {true, false, false};
  std::string missing[kNumCpuIsas];  // what each ISA lacks, comma separated
};

#ifdef TFBS_X86
// XCR0 through xgetbv: which register states the OS saves. A CPU with
// AVX-512 under an OS (or hypervisor) that does not save ZMM state cannot
// use it.
uint64_t Xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}
#endif

CpuFeatures DetectFeatures() {
  CpuFeatures f;
#ifdef TFBS_X86
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const unsigned c1 = c;
  unsigned b7 = 0, c7 = 0, d7 = 0, a71 = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    b7 = b;
    c7 = c;
    d7 = d;
  }
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) a71 = a;
  const bool osxsave = c1 & (1u << 27);
  const uint64_t xcr0 = osxsave ? Xcr0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  const bool os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;
  struct Flag {
    const char* name;
    bool on;
  };
  const Flag flags[] = {
      {"sse4_2", ((c1 >> 20) & 1) != 0},
      {"popcnt", ((c1 >> 23) & 1) != 0},
      {"avx", ((c1 >> 28) & 1) != 0 && os_avx},
      {"f16c", ((c1 >> 29) & 1) && os_avx},
      {"fma", ((c1 >> 12) & 1) && os_avx},
      {"avx2", ((b7 >> 5) & 1) && os_avx},
      {"bmi", ((b7 >> 3) & 1) != 0},
      {"bmi2", ((b7 >> 8) & 1) != 0},
      {"avx512f", ((b7 >> 16) & 1) && os_avx512},
      {"avx512dq", ((b7 >> 17) & 1) && os_avx512},
      {"avx512bw", ((b7 >> 30) & 1) && os_avx512},
      {"avx512vl", ((b7 >> 31) & 1) && os_avx512},
      {"avx512_vnni", ((c7 >> 11) & 1) && os_avx512},
      {"avx512_bf16", ((a71 >> 5) & 1) && os_avx512},
      {"amx_tile", ((d7 >> 24) & 1) && os_amx},
      {"amx_bf16", ((d7 >> 22) & 1) && os_amx},
  };
  // TF_BLOCKSPARSE_HIDE_CPU_FEATURES=avx512f,... makes the dispatch act as
  // on a CPU without them: how the tests and benchmarks see what an older
  // machine would run, on this one.
  const char* hide_env = std::getenv("TF_BLOCKSPARSE_HIDE_CPU_FEATURES");
  const std::string hide = "," + std::string(hide_env ? hide_env : "") + ",";
  auto hidden = [&](const char* name) {
    return hide.find("," + std::string(name) + ",") != std::string::npos;
  };
  auto has = [&](const char* name) {
    for (const Flag& fl : flags)
      if (std::string(fl.name) == name) return fl.on && !hidden(name);
    return false;
  };
  for (const Flag& fl : flags)
    if (fl.on && !hidden(fl.name)) f.present.push_back(fl.name);
  // Each ISA needs exactly what its TFBS_ISA_BEGIN target line enables.
  const std::vector<std::vector<const char*>> needs = {
      {},
      {"avx2", "fma", "bmi", "bmi2", "f16c", "popcnt"},
      {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "bmi",
       "bmi2", "f16c", "popcnt"},
  };
  for (int i = 1; i < kNumCpuIsas; ++i) {
    for (const char* n : needs[i]) {
      if (has(n)) continue;
      if (!f.missing[i].empty()) f.missing[i] += ", ";
      f.missing[i] += n;
    }
    f.isa[i] = f.missing[i].empty();
  }
#else
  for (int i = 1; i < kNumCpuIsas; ++i) f.missing[i] = "an x86-64 CPU";
#endif
  return f;
}

bool Built(int isa) {
#ifdef TFBS_X86
  return isa >= 0 && isa < kNumCpuIsas;
#else
  return isa == 0;
#endif
}

const CpuFeatures& Features() {
  static const CpuFeatures* features = new CpuFeatures(DetectFeatures());
  return *features;
}

int WidestSupported() {
  for (int i = kNumCpuIsas - 1; i > 0; --i)
    if (Built(i) && Features().isa[i]) return i;
  return 0;
}

// The selection: -1 automatic, else the forced ISA; plus the reason, and an
// error when the forced one cannot run (then every op call fails with it).
struct Selection {
  std::mutex mu;
  std::atomic<int> forced{-1};
  std::atomic<bool> broken{false};
  std::string reason;
  std::string error;
};

Selection& State();

int ParseIsa(const std::string& name) {
  for (int i = 0; i < kNumCpuIsas; ++i)
    if (name == kIsaNames[i]) return i;
  return name == "auto" || name.empty() ? -1 : -2;
}

// Sets the selection; returns the error text (empty when it can run).
std::string Apply(Selection& s, const std::string& name, const char* source,
                  bool from_env) {
  const int isa = ParseIsa(name);
  std::string error;
  if (isa == -2) {
    error = std::string(source) + " = '" + name +
            "' is not an ISA: use one of auto, baseline, avx2, avx512";
  } else if (isa >= 0 && !Built(isa)) {
    error = std::string(source) + " = '" + name +
            "', but this build has no " + name + " kernels (not an x86-64 build)";
  } else if (isa >= 0 && !Features().isa[isa]) {
    error = std::string(source) + " = '" + name + "', but this CPU lacks " +
            Features().missing[isa] + "; unset it or choose an ISA it has";
  }
  std::lock_guard<std::mutex> lock(s.mu);
  // A bad environment setting fails every op (running another ISA than the
  // one asked for would be silent); a bad request at run time is refused
  // and leaves the selection as it was.
  if (!error.empty() && !from_env) return error;
  s.error = error;
  s.broken = !error.empty();
  if (error.empty()) {
    s.forced = isa;
    s.reason = isa < 0 ? std::string("widest ISA this CPU supports")
                       : std::string("forced by ") + source;
  }
  return error;
}

Selection& State() {
  static Selection* s = [] {
    auto* sel = new Selection;
    sel->reason = "widest ISA this CPU supports";
    const char* env = std::getenv("TF_BLOCKSPARSE_ISA");
    if (env != nullptr && *env != '\0') Apply(*sel, env, "TF_BLOCKSPARSE_ISA", true);
    return sel;
  }();
  return *s;
}

std::string Quote(const std::string& s) { return "\"" + s + "\""; }

}  // namespace

bool ActiveCpuIsa(CpuIsa* isa, std::string* error) {
  Selection& s = State();
  if (s.broken) {
    std::lock_guard<std::mutex> lock(s.mu);
    *error = s.error;
    return false;
  }
  const int forced = s.forced;
  *isa = static_cast<CpuIsa>(forced >= 0 ? forced : WidestSupported());
  return true;
}

std::string SelectCpuIsa(const std::string& name) {
  return Apply(State(), name, "the requested ISA", false);
}

std::string CpuKernelInfoJson() {
  Selection& s = State();
  CpuIsa isa = CpuIsa::kBaseline;
  std::string error;
  const bool ok = ActiveCpuIsa(&isa, &error);
  std::string json = "{\"isa\": ";
  json += ok ? Quote(kIsaNames[static_cast<int>(isa)]) : "null";
  {
    std::lock_guard<std::mutex> lock(s.mu);
    json += ", \"reason\": " + Quote(ok ? s.reason : s.error);
  }
  json += ", \"error\": " + (ok ? std::string("null") : Quote(error));
  json += ", \"built\": [";
  for (int i = 0, first = 1; i < kNumCpuIsas; ++i) {
    if (!Built(i)) continue;
    json += (first ? "" : ", ") + Quote(kIsaNames[i]);
    first = 0;
  }
  json += "], \"supported\": [";
  for (int i = 0, first = 1; i < kNumCpuIsas; ++i) {
    if (!Built(i) || !Features().isa[i]) continue;
    json += (first ? "" : ", ") + Quote(kIsaNames[i]);
    first = 0;
  }
  json += "], \"missing\": {";
  for (int i = 1, first = 1; i < kNumCpuIsas; ++i) {
    if (Features().isa[i]) continue;
    json += (first ? "" : ", ") + Quote(kIsaNames[i]) + ": " +
            Quote(Features().missing[i]);
    first = 0;
  }
  json += "}, \"cpu_features\": [";
  const auto& present = Features().present;
  for (size_t i = 0; i < present.size(); ++i)
    json += (i ? ", " : "") + Quote(present[i]);
  json += "]}";
  return json;
}

template <typename T>
const CpuKernels<T>& MatmulKernelsFor(CpuIsa isa) {
  switch (isa) {
#ifdef TFBS_X86
    case CpuIsa::kAvx512:
      return isa_avx512::MatmulKernels<T>();
    case CpuIsa::kAvx2:
      return isa_avx2::MatmulKernels<T>();
#endif
    default:
      return isa_baseline::MatmulKernels<T>();
  }
}

template <typename T>
void RunRnnSequenceOn(CpuIsa isa, const RnnSequenceArgs<T>& args,
                      const ParallelFor& parallel_for) {
  switch (isa) {
#ifdef TFBS_X86
    case CpuIsa::kAvx512:
      return isa_avx512::RunRnnSequence<T>(args, parallel_for);
    case CpuIsa::kAvx2:
      return isa_avx2::RunRnnSequence<T>(args, parallel_for);
#endif
    default:
      return isa_baseline::RunRnnSequence<T>(args, parallel_for);
  }
}

template const CpuKernels<float>& MatmulKernelsFor<float>(CpuIsa);
template const CpuKernels<double>& MatmulKernelsFor<double>(CpuIsa);
template void RunRnnSequenceOn<float>(CpuIsa, const RnnSequenceArgs<float>&,
                                      const ParallelFor&);
template void RunRnnSequenceOn<double>(CpuIsa, const RnnSequenceArgs<double>&,
                                       const ParallelFor&);

}  // namespace tfbs
