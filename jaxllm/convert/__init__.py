"""Parameter conversion between jaxllm, torch state dicts and Hugging Face layouts.

`layout` maps tensor names and shapes. `hf_config`, `safetensors_io` and `hf_tokenizer` read
and write a Hugging Face model folder's config.json, safetensors weights and tokenizer.json.
`hf` reads and writes whole folders and converts them to and from jaxllm run directories.
"""

from jaxllm.convert.hf import export_run_to_hf, import_hf_run, load_hf_model, save_hf_model
from jaxllm.convert.hf_config import hf_config_from_model, model_config_from_hf, read_hf_config
from jaxllm.convert.hf_tokenizer import tokenizer_from_hf, write_hf_tokenizer
from jaxllm.convert.layout import ConversionError, from_hf_state_dict, hf_shapes, to_hf_state_dict
from jaxllm.convert.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    read_hf_weights,
    write_hf_weights,
)

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "ConversionError",
    "export_run_to_hf",
    "from_hf_state_dict",
    "hf_config_from_model",
    "hf_shapes",
    "import_hf_run",
    "load_hf_model",
    "model_config_from_hf",
    "read_hf_config",
    "read_hf_weights",
    "save_hf_model",
    "to_hf_state_dict",
    "tokenizer_from_hf",
    "write_hf_tokenizer",
    "write_hf_weights",
]
