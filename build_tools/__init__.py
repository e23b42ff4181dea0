"""Build helpers of the fastenc._C extension, imported by ``setup.py`` and ``scripts/``; not installed.

``toolchain``: compiler flags and where CUDA, cuBLASLt and the CUTLASS headers are; ``cutlass_objects``: the
stamped, cached CUTLASS sm90 objects; ``build_stamp``: the key of every build input, so that
``scripts/run.sh`` skips an install whose inputs did not change; ``cpu_kernels``: the CPU kernel objects, one per
capability; ``constants_header`` and ``precompiled_header``: the generated headers; ``files``: writing generated
files only when they change.
"""
