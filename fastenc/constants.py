"""Constants shared by the Python package and the C++ extension: the one place each is written.

Torch-free and made of literals only: the build reads this file (``build_tools/constants_header.py``) and
generates the C++ header ``fastenc_constants.h`` in its build folder (``ONEDNN_MIN_MACS`` ->
``fastenc::constants::kOnednnMinMacs``), and the rebuild stamp tracks it. ``tests/test_constants.py`` checks
that the built extension agrees.
"""

# Multiply-adds per GEMM (tokens · in · out) from which the CPU path's oneDNN inner product beats ATen's GEMM:
# below it oneDNN's per-call cost (~20 µs: primitive lookup, tensor wrapping) outweighs its faster kernel
# (measured: MiniLM's 384→1536 at 1-2 tokens, 0.6-1.2 M; from 8 tokens, or 768→3072 at 1 token, oneDNN wins 1.6x).
ONEDNN_MIN_MACS = 1 << 21

# The fused CPU stack runs a large batch in chunks of whole sequences, each with at most this many elements in its
# widest intermediate (the QKV projection's or FFN1's output rows; one longer sequence is a chunk of its own): the
# chunk's buffers stay below glibc's largest mmap threshold (32 MiB), so they are reused from the heap instead of
# being mapped, page-faulted and zeroed at every GEMM (at 4096 BERT-base tokens in fp32, 115 k page faults a call,
# 10% of its time), and they stay in the L3 cache between the ops that write and read them.  Measured on the 2-core
# Zen 4 VM, B=32 x 128 tokens, 4 layers: BERT-base fp32 -9%, bf16 -6%, MiniLM fp32 -10%, int8 level (smaller
# buffers); 4 Mi elements keeps oneDNN's GEMMs at M >= 1280 rows (at 640 rows its bf16 GEMMs lose 5%).
ENCODER_CHUNK_ELEMENTS = 1 << 22

# FFN activations, in the order of the C++ enum Act (csrc/common/activation.h): relu, erf-GELU (torch's default
# `gelu`), tanh-GELU; then the gated ones, act(a) · g with [a, g] = (x W1ᵀ + b1).chunk(2, -1), the activated
# half first (HF ModernBERT's Wi): geglu (erf-GELU), swiglu (SiLU).
ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
GATED_ACTIVATIONS = ("geglu", "swiglu")

# The floating dtypes of fastenc's kernels (Triton and C++: csrc/common/dtype.h's dispatch_dtype), by torch name.
# The reference also computes in float64 (fastenc.ops._common.FLOAT_DTYPES).
KERNEL_DTYPES = ("float32", "float16", "bfloat16")
