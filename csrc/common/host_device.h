// FASTENC_HD: a function both the CPU code (g++) and the CUDA kernels (nvcc: __host__ __device__) compile, and
// FASTENC_UNROLL: an unrolled loop on the device (nothing on the host).
#pragma once

#if defined(__CUDACC__)
#define FASTENC_HD __host__ __device__ __forceinline__
#define FASTENC_UNROLL _Pragma("unroll")
#else
#define FASTENC_HD inline
#define FASTENC_UNROLL
#endif
