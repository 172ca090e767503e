"""Pytest setup of the parity suite: full float32 matmul precision and the device parameter."""

import pytest

from parity.harness import gpu_available, pin_precision

pin_precision()


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.skipif(
    not gpu_available(), reason="no GPU visible to both JAX and PyTorch"))])
def device(request) -> str:
    """Each device test runs on the CPU, and on the GPU when JAX and PyTorch both see one."""
    return request.param
