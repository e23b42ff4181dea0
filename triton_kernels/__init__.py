"""fastenc's Triton kernels, installed as ``fastenc.triton_kernels``.

One file per op: ``@triton.jit`` kernels, their launch heuristics, and the launcher that
validates inputs and picks the grid; ``dropout_rng.py`` holds the dropout decision the
attention and LayerNorm kernels share.  Kernels know nothing of fastenc's modules: they
take tensors and return tensors.
"""
