// CUTLASS 3.x GEMM1 of the FFN on Hopper with the bias + erf-GELU epilogue fused:
//   h[M, N] = gelu(x[M, K] · W1[N, K]ᵀ + b1[N])   (and pre = x W1ᵀ + b1 into aux when AUX)
// TMA warp-specialized cooperative mainloop (KernelTmaWarpSpecializedCooperative) and the
// epilogue visitor LinCombPerColBiasEltAct(Aux) with cutlass::epilogue::thread::GELU (erf).
// x and W1 are K-major (the nn.Linear "TN" GEMM), h row-major.  Tile 128x256x64, one-CTA
// clusters: the common BERT shapes (d = 768/1024, f = 4d) fill the 132 SMs from 2k tokens.
// Preconditions (checked by the dispatch table and cuda/ffn_cutlass.cpp): bf16, K, N and the
// leading dims multiples of 8, 16-byte aligned pointers (TMA); can_implement re-checks them.
// Torch-free: CUDA + CUTLASS headers only (see ffn_sm90.h).  Each (dtype, AUX) instantiation
// lives in its own .cu file.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <type_traits>

#include "ffn/cuda/cutlass/ffn_sm90.h"

namespace fastenc {

// Stride (ld, 1, 0) of a matrix whose inner dimension is contiguous, leading dim ld, batch 1.
template <class Stride>
Stride sm90_row_stride(int64_t ld) {
  static_assert(cute::is_constant<1, std::remove_cv_t<std::remove_reference_t<decltype(cute::get<1>(Stride{}))>>>::value,
                "the inner dimension must be the contiguous one");
  Stride s{};
  cute::get<0>(s) = ld;
  cute::get<2>(s) = 0;
  return s;
}

template <typename Element, bool AUX>
struct Sm90LinearBiasGelu {
  using LayoutA = cutlass::layout::RowMajor;     // x  [M, K]
  using LayoutB = cutlass::layout::ColumnMajor;  // W1 [N, K], K contiguous
  using LayoutD = cutlass::layout::RowMajor;     // h  [M, N]
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;

  using FusionOp = std::conditional_t<
      AUX,
      cutlass::epilogue::fusion::LinCombPerColBiasEltActAux<LayoutD, cutlass::epilogue::thread::GELU, Element, float,
                                                            Element, Element>,
      cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::GELU, Element, float, Element>>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlign, Element, LayoutD, kAlign,
      cutlass::epilogue::TmaWarpSpecializedCooperative, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign, float,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const Sm90GemmArgs& p) {
    using StrideD = typename Kernel::StrideD;
    const StrideD stride_d = sm90_row_stride<StrideD>(p.ldh);
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {p.M, p.N, p.K, 1},
        {static_cast<const Element*>(p.x), sm90_row_stride<typename Kernel::StrideA>(p.ldx),
         static_cast<const Element*>(p.w1), sm90_row_stride<typename Kernel::StrideB>(p.ldw)},
        {{}, nullptr, stride_d, static_cast<Element*>(p.h), stride_d}};
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 1.f;
    fusion.beta = 0.f;
    fusion.bias_ptr = static_cast<const Element*>(p.b1);
    if constexpr (AUX) {
      fusion.aux_ptr = static_cast<Element*>(p.pre);
      fusion.dAux = sm90_row_stride<StrideD>(p.ldpre);
    }
    args.hw_info.device_id = p.device;
    args.hw_info.sm_count = p.sm_count > 0
                                ? p.sm_count
                                : cutlass::KernelHardwareInfo::query_device_multiprocessor_count(p.device);
    return args;
  }

  static size_t workspace_size(const Sm90GemmArgs& p) { return Gemm::get_workspace_size(arguments(p)); }

  static Sm90Status run(const Sm90GemmArgs& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    if (AUX && p.pre == nullptr) return {"arguments", "the aux variant needs a pre-activation pointer"};
    const typename Gemm::Arguments args = arguments(p);
    if (workspace_bytes < Gemm::get_workspace_size(args)) return {"arguments", "workspace smaller than workspace_size()"};
    Gemm gemm;
    cutlass::Status st = gemm.can_implement(args);
    if (st != cutlass::Status::kSuccess) return {"can_implement", cutlass::cutlassGetStatusString(st)};
    st = gemm.initialize(args, workspace, stream);
    if (st != cutlass::Status::kSuccess) return {"initialize", cutlass::cutlassGetStatusString(st)};
    st = gemm.run(stream);
    if (st != cutlass::Status::kSuccess) return {"run", cutlass::cutlassGetStatusString(st)};
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return {"launch", cudaGetErrorString(err)};
    return {};
  }
};

}  // namespace fastenc
