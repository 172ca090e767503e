"""Benchmarks of decoding and training speed, each against a ceiling measured in the same run.

`python -m jaxllm.bench decode` races greedy decoding with and without a KV cache, jaxllm
beside the eager PyTorch reference `torchref`, against a memory-bandwidth roofline.
`python -m jaxllm.bench train` measures the train step's tokens/s and FLOP/s against a matmul
ceiling. docs/benchmarks.md records the commands and results.
"""

from jaxllm.bench.decode import DecodeSettings, run_decode_benchmark
from jaxllm.bench.roofline import measure_bandwidth, measure_matmul_flops
from jaxllm.bench.train import TrainSettings, run_train_benchmark

__all__ = [
    "DecodeSettings",
    "TrainSettings",
    "measure_bandwidth",
    "measure_matmul_flops",
    "run_decode_benchmark",
    "run_train_benchmark",
]
