"""The backends: `backends.mlx` (MLX) and `backends.cuda` (PyTorch + Triton).

Import names follow folders from the repository root (docs/design.md, "Packaging"); diffattn's
registry (diffattn/backend.py) loads them by these names.
"""
