"""Triton kernels of rlfuse, installed as ``rlfuse.triton_kernels``.

Kernel modules are imported on demand: whether ``@triton.jit`` builds GPU or interpreter
functions is decided when they are imported (``TRITON_INTERPRET=1`` must be set before).
"""
