"""Parity suite: jaxllm against the PyTorch reference in torchref/ and against transformers.

`pytest parity` runs the ladder (parity/rungs.py) and the Hugging Face round trips;
`python -m parity` prints the ladder's differences as a table. See docs/parity.md.
"""
