// Run-time CPU dispatch (cpu_kernels.h): what the CPU supports, the FASTENC_CPU_CAPABILITY cap, the choice of
// a kernel table.  Baseline code: compiled without -m flags, it runs on any x86-64.
#include "common/cpu_kernels.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <sstream>

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastenc::cpu {

namespace {

constexpr const char* kNames[kCapabilities] = {"default", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"};
constexpr const char* kEnv = "FASTENC_CPU_CAPABILITY";

#if defined(__x86_64__)
bool bit(unsigned reg, int i) { return (reg >> i) & 1u; }

// The OS-enabled register state (XCR0); valid only when cpuid reports OSXSAVE.
uint64_t xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

// Linux hands out AMX tile data only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA), as oneDNN asks.
bool amx_permitted() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

Capability detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Capability::kDefault;
  const bool fma = bit(c, 12), osxsave = bit(c, 27), avx = bit(c, 28), f16c = bit(c, 29);
  if (!(fma && osxsave && avx && f16c) || (xcr0() & 0x6) != 0x6) return Capability::kDefault;  // XMM, YMM state
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !bit(b, 5)) return Capability::kDefault;    // AVX2
  const uint64_t xcr = xcr0();
  // F (ebx 16), DQ (17), BW (30), VL (31); opmask, ZMM_Hi256 and Hi16_ZMM state (XCR0 bits 5-7).
  if (!(bit(b, 16) && bit(b, 17) && bit(b, 30) && bit(b, 31)) || (xcr & 0xE0) != 0xE0) return Capability::kAvx2;
  const bool vnni = bit(c, 11), amx = bit(d, 22) && bit(d, 24) && bit(d, 25);  // AMX-BF16, AMX-TILE, AMX-INT8
  unsigned a1 = 0, b1, c1, d1;
  const bool bf16 = __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && bit(a1, 5);
  if (!vnni) return Capability::kAvx512;
  if (!bf16) return Capability::kAvx512Vnni;
  // XTILECFG and XTILEDATA state (XCR0 bits 17, 18).
  if (!amx || (xcr & 0x60000) != 0x60000 || !amx_permitted()) return Capability::kAvx512Bf16;
  return Capability::kAmx;
}
#else
Capability detect() { return Capability::kDefault; }
#endif

}  // namespace

const char* capability_name(Capability c) { return kNames[static_cast<int>(c)]; }

Capability cpu_capability() {
  static const Capability c = detect();
  return c;
}

int capability_limit() {
  static const int limit = [] {
    const char* env = std::getenv(kEnv);
    if (env == nullptr || *env == '\0') return -1;
    std::string v(env);
    std::transform(v.begin(), v.end(), v.begin(), [](unsigned char ch) { return std::tolower(ch); });
    for (int i = 0; i < kCapabilities; ++i) {
      if (v == kNames[i]) return i;
    }
    TORCH_CHECK_VALUE(false, kEnv, "='", env, "': expected one of default, avx2, avx512, avx512_vnni, avx512_bf16, "
                      "amx (a cap on the CPU kernels' instruction set), or unset");
  }();
  return limit;
}

Capability capability() {
  const int cpu = static_cast<int>(cpu_capability()), limit = capability_limit();
  return static_cast<Capability>(limit < 0 ? cpu : std::min(cpu, limit));
}

const void* best_table(const KernelVariants& v) {
  for (int c = static_cast<int>(capability()); c >= 0; --c) {
    if (v.tables[c] != nullptr) return v.tables[c];
  }
  return nullptr;
}

void no_kernels(const KernelVariants& v) {
  std::ostringstream built;
  for (int c = 0; c < kCapabilities; ++c) {
    if (v.tables[c] != nullptr) built << (built.tellp() > 0 ? ", " : "") << kNames[c];
  }
  TORCH_CHECK_VALUE(false, "fastenc: no CPU kernel ", v.name, " for this CPU's instruction set ",
                    capability_name(capability()), " (this CPU: ", capability_name(cpu_capability()), ", ", kEnv,
                    ": ", capability_limit() < 0 ? "unset" : kNames[capability_limit()], "); fastenc._C has it for ",
                    built.str().empty() ? "none" : built.str());
}

std::vector<const KernelVariants*>& kernel_registry() {
  static std::vector<const KernelVariants*> tables;
  return tables;
}

bool register_kernels(const KernelVariants* v) {
  kernel_registry().push_back(v);
  return true;
}

}  // namespace fastenc::cpu
