// Run-time CPU dispatch (as ATen's DispatchStub and ATEN_CPU_CAPABILITY).
//
// A kernel file (csrc/<op>/cpu/*.cpp) is compiled once per capability of the build (build_tools/cpu_kernels.py),
// with that capability's -m flags and -DCPU_CAPABILITY=<NAME>, and defines everything in
// namespace fastenc::cpu::CPU_CAPABILITY, ending with one constant table of function pointers:
//     FASTENC_DEFINE_CPU_KERNELS(LayerNormKernels) = {&fwd_out, &bwd_out};
// The table type is declared once, in the op's header, with FASTENC_DECLARE_CPU_KERNELS(LayerNormKernels)
// (which declares its per-capability tables weak: a capability the build did not compile for that file reads
// as null), and registered once in a baseline file with FASTENC_REGISTER_CPU_KERNELS(LayerNormKernels) for the
// report.  Baseline code calls cpu_kernels<LayerNormKernels>().fwd(...): the table of the highest compiled
// capability <= capability() (the CPU's, capped by FASTENC_CPU_CAPABILITY), chosen on the first call; after it,
// one load and one indirect call.  The tables are constant data: no code of a kernel object runs unless chosen.
#pragma once

#include <array>
#include <string>
#include <vector>

namespace fastenc::cpu {

// x86 instruction-set levels, lowest first; each implies the ones before it.  avx2: AVX2 + FMA + F16C;
// avx512: F, BW, VL, DQ (Skylake-SP); avx512_vnni: + VNNI (Cascade Lake, Ice Lake); avx512_bf16: + BF16 (Cooper
// Lake, Zen 4); amx: + AMX-TILE, AMX-BF16, AMX-INT8 (Sapphire Rapids).
enum class Capability : int { kDefault = 0, kAvx2, kAvx512, kAvx512Vnni, kAvx512Bf16, kAmx };
inline constexpr int kCapabilities = 6;

const char* capability_name(Capability c);  // "default", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"

// The capabilities from which a kernel chosen in baseline code (by capability(), not through a table) runs: the
// int8 GEMM's AVX2 and VNNI kernels (linear/int8_linear.cpp), the panel GEMM's fp32 and bf16 ones
// (linear/panel_gemm.cpp), the encoder's AMX chunking (encoder/encoder.cpp).  Each is a capped test run.
inline constexpr Capability kGatedCapabilities[] = {Capability::kAvx2, Capability::kAvx512, Capability::kAvx512Vnni,
                                                    Capability::kAvx512Bf16, Capability::kAmx};
// What this CPU (and its OS) supports, from cpuid and xgetbv (amx: with Linux's permission to use the tiles).
Capability cpu_capability();
// FASTENC_CPU_CAPABILITY as a capability (a cap: it never raises the level above the CPU's), or -1 when unset;
// any other value is a ValueError naming the variable.  Read once.
int capability_limit();
// The capability in use: the CPU's, capped by FASTENC_CPU_CAPABILITY.
Capability capability();

// One table type's variants by capability (null where the build compiled none) and its name.
struct KernelVariants {
  const char* name;
  std::array<const void*, kCapabilities> tables;
};
// The table of the highest capability <= capability() among v's, else null.
const void* best_table(const KernelVariants& v);
// The ValueError of a call to a kernel that has no variant for this CPU.
[[noreturn]] void no_kernels(const KernelVariants& v);
// Every table type registered with FASTENC_REGISTER_CPU_KERNELS (filled while the extension loads).
std::vector<const KernelVariants*>& kernel_registry();
bool register_kernels(const KernelVariants* v);

template <typename T>
struct KernelTables;  // specialised by FASTENC_DECLARE_CPU_KERNELS(T): static const KernelVariants variants

template <typename T>
const T& cpu_kernels() {
  static const T* const chosen = static_cast<const T*>(best_table(KernelTables<T>::variants));
  if (chosen == nullptr) no_kernels(KernelTables<T>::variants);
  return *chosen;
}

}  // namespace fastenc::cpu

#define FASTENC_CPU_TABLE_(CAP, T) \
  namespace CAP {                  \
  extern const T T##_table __attribute__((weak)); \
  }
// In namespace fastenc::cpu, after the definition of the table type T.
#define FASTENC_DECLARE_CPU_KERNELS(T)                                                                         \
  FASTENC_CPU_TABLE_(DEFAULT, T)                                                                               \
  FASTENC_CPU_TABLE_(AVX2, T)                                                                                  \
  FASTENC_CPU_TABLE_(AVX512, T)                                                                                \
  FASTENC_CPU_TABLE_(AVX512_VNNI, T)                                                                           \
  FASTENC_CPU_TABLE_(AVX512_BF16, T)                                                                           \
  FASTENC_CPU_TABLE_(AMX, T)                                                                                   \
  template <>                                                                                                  \
  struct KernelTables<T> {                                                                                     \
    static inline const KernelVariants variants{                                                               \
        #T, {&DEFAULT::T##_table, &AVX2::T##_table, &AVX512::T##_table, &AVX512_VNNI::T##_table,                 \
             &AVX512_BF16::T##_table, &AMX::T##_table}};                                                       \
  };
// In a kernel file, in namespace fastenc::cpu::CPU_CAPABILITY: FASTENC_DEFINE_CPU_KERNELS(T) = {...};
#define FASTENC_DEFINE_CPU_KERNELS(T) const T T##_table  // external linkage: declared extern above
// In one baseline file, in namespace fastenc::cpu.
#define FASTENC_REGISTER_CPU_KERNELS(T) \
  [[maybe_unused]] static const bool T##_registered = register_kernels(&KernelTables<T>::variants)
