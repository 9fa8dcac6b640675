"""shrinkjax: distill, quantize, prune and accelerate LLMs in JAX/Flax NNX."""

__version__ = "0.1.0"
