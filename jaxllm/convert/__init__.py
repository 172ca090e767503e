"""Parameter conversion between jaxllm, torch state dicts and Hugging Face layouts.

`layout` maps tensor names and shapes; `hf` reads and writes Hugging Face model folders
(config.json, safetensors, tokenizer.json) and jaxllm run directories.
"""

from jaxllm.convert.hf import (
    DEFAULT_MAX_SHARD_BYTES,
    export_run_to_hf,
    hf_config_from_model,
    import_hf_run,
    load_hf_model,
    model_config_from_hf,
    read_hf_config,
    read_hf_weights,
    save_hf_model,
    tokenizer_from_hf,
    write_hf_tokenizer,
    write_hf_weights,
)
from jaxllm.convert.layout import ConversionError, from_hf_state_dict, hf_shapes, to_hf_state_dict

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
