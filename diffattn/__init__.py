"""diffattn: a dual-backend (MLX / PyTorch) benchmark suite for the Differential Transformer.

This package imports numpy only; a backend's framework is imported when the backend is loaded.
"""
from diffattn.config import ATTENTIONS, PRESETS, AdamWConfig, ConfigError, ModelConfig, TrainConfig, preset

__version__ = "0.1.0"
__all__ = ["ATTENTIONS", "PRESETS", "AdamWConfig", "ConfigError", "ModelConfig", "TrainConfig", "preset", "__version__"]
