// CUTLASS 3.x GEMM1 of the FFN on Hopper with the bias + erf-GELU epilogue fused:
//   h[M, N] = gelu(x[M, K] · W1[N, K]ᵀ + b1[N])   (and pre = x W1ᵀ + b1 into aux when AUX)
// TMA warp-specialized cooperative mainloop (KernelTmaWarpSpecializedCooperative) and the
// epilogue visitor LinCombPerColBiasEltAct(Aux) with cutlass::epilogue::thread::GELU (erf).
// x and W1 are K-major (the nn.Linear "TN" GEMM), h row-major.  Tile 128x256x64, one-CTA
// clusters: the common BERT shapes (d = 768/1024, f = 4d) fill the 132 SMs from 2k tokens.
// Preconditions (checked by the dispatch table): fp16/bf16, K and N multiples of 8,
// 16-byte aligned pointers.  Each (dtype, AUX) instantiation lives in its own .cu file.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "cuda/cutlass/ffn_sm90.h"

namespace fastenc {

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

  static void run(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& h,
                  const at::Tensor& pre) {
    const int M = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1)), N = static_cast<int>(w1.size(0));
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    const auto* a = reinterpret_cast<const Element*>(x.data_ptr());
    const auto* b = reinterpret_cast<const Element*>(w1.data_ptr());
    auto* d = reinterpret_cast<Element*>(h.data_ptr());
    const StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1));
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {M, N, K, 1},
                                  {a, cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, K, 1)), b,
                                   cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1))},
                                  {{}, nullptr, stride_d, d, stride_d}};
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 1.f;
    fusion.beta = 0.f;
    fusion.bias_ptr = reinterpret_cast<const Element*>(b1.data_ptr());
    if constexpr (AUX) {
      fusion.aux_ptr = reinterpret_cast<Element*>(pre.data_ptr());
      fusion.dAux = stride_d;
    }
    args.hw_info.device_id = x.get_device();
    args.hw_info.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

    Gemm gemm;
    TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess,
                "fastenc ffn: the CUTLASS sm90 GEMM cannot implement M=", M, " N=", N, " K=", K);
    at::Tensor workspace =
        at::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))}, x.options().dtype(at::kByte));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    TORCH_CHECK(gemm.initialize(args, workspace.data_ptr(), stream) == cutlass::Status::kSuccess,
                "fastenc ffn: CUTLASS sm90 GEMM initialize failed");
    TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, "fastenc ffn: CUTLASS sm90 GEMM launch failed");
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace fastenc
