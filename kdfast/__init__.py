"""kdfast: fast knowledge distillation on Accelerate."""

__version__ = "0.1.0"
