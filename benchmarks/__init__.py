"""fusedcnn's benchmark harness (not part of the installed package; run from a checkout).

    python benchmarks/kernels.py --preset cpu      # kernel microbenchmarks, every backend vs torch
    python benchmarks/e2e_mnist.py --preset cpu    # VGG16/MNIST training, every backend vs torch eager/compile
    pytest benchmarks --benchmark-only             # the same kernel cases under pytest-benchmark

benchmarks/NOTES.md says how times, FLOPs, bytes and peaks are counted.
"""
