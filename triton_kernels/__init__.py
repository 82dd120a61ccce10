"""Triton kernels for fusedcnn, one module per layer family (installed as fusedcnn.triton_kernels).

Each module holds @triton.jit kernels and their launchers; launchers check
their arguments and choose the grid. They run on CUDA tensors, and on CPU
tensors under TRITON_INTERPRET=1 (tests).
"""
