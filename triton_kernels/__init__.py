"""fastenc's Triton kernels, installed as ``fastenc.triton_kernels``.

One file per op: ``@triton.jit`` kernels, the launcher that validates inputs and
picks the grid, and launch heuristics in ``configs.py``.  Kernels know nothing of
fastenc's modules: they take tensors and return tensors.
"""
