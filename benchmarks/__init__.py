"""flax-resnet benchmarks against PyTorch: ``python benchmarks/run.py`` (see its docstring)."""
