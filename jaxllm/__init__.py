"""jaxllm: train, align and sample Llama-3-style language models in JAX and Flax."""

__version__ = "0.1.0"
