"""fastenc's Triton kernels, installed as ``fastenc.triton_kernels``.

Per op, ``<op>.py`` holds the ``@triton.jit`` kernels and the launchers that validate inputs,
allocate outputs and pick the grid, and ``<op>_config.py`` the launch policy as data (tiles,
warps and stages per architecture, shared-memory fitting), which the launchers read.
``specs.py`` holds the ahead-of-time compile specs of every shipped kernel for the kernel
inspector; ``dropout_rng.py`` the dropout decision the attention and LayerNorm kernels share.
Kernels know nothing of fastenc's modules: they take tensors and return tensors.
"""
