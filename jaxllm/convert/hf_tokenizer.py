"""Hugging Face tokenizer files: tokenizer.json to a jaxllm Tokenizer, and back again.

Export also writes a tokenizer_config.json that names the BOS, EOS and PAD tokens.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import tokenizers

from jaxllm.convert.hf_config import CONFIG_FILE, _read_json
from jaxllm.convert.layout import ConversionError
from jaxllm.data.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    Tokenizer,
)

logger = logging.getLogger(__name__)

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
_RESERVED_TOKEN = re.compile(r"<\|reserved_special_token_\d+\|>")


def _role_tokens(hf_dir: Path, probe: tokenizers.Tokenizer) -> dict[str, str]:
    """Find the BOS, EOS and PAD token strings a model folder declares.

    tokenizer_config.json comes first (a string or an AddedToken object per role), then the
    `<role>_token_id` of config.json and generation_config.json (the first id of a list).
    """
    sources = []
    for name in (TOKENIZER_CONFIG_FILE, CONFIG_FILE, GENERATION_CONFIG_FILE):
        path = hf_dir / name
        values = _read_json(path, "file") if path.is_file() else {}
        sources.append(values if isinstance(values, dict) else {})
    tokenizer_config, *id_sources = sources

    roles = {}
    for role in ("bos", "eos", "pad"):
        token = tokenizer_config.get(f"{role}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and probe.token_to_id(token) is not None:
            roles[role] = token
            continue
        for values in id_sources:
            token_id = values.get(f"{role}_token_id")
            if isinstance(token_id, list):
                token_id = token_id[0] if token_id else None
            if isinstance(token_id, int) and probe.id_to_token(token_id) is not None:
                roles[role] = probe.id_to_token(token_id)
                break
    return roles


def _rename_token(data: dict, old: str, new: str) -> None:
    """Rename token `old` to `new` in a parsed tokenizer.json, keeping its id."""
    for entry in data.get("added_tokens") or []:
        if entry.get("content") == old:
            entry["content"] = new
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and old in vocab:
        vocab[new] = vocab.pop(old)
    elif isinstance(vocab, list):
        for piece in vocab:
            if piece and piece[0] == old:
                piece[0] = new

    def rename_in(node):
        if isinstance(node, dict):
            return {(new if key == old else key): rename_in(value) for key, value in node.items()}
        if isinstance(node, list):
            return [rename_in(value) for value in node]
        return new if node == old else node

    # The post-processor (for example TemplateProcessing) refers to special tokens by string.
    if data.get("post_processor") is not None:
        data["post_processor"] = rename_in(data["post_processor"])


def tokenizer_from_hf(hf_dir: str | Path, vocab_size: int) -> Tokenizer:
    """Load a model folder's tokenizer.json as a jaxllm Tokenizer that fits `vocab_size`.

    jaxllm finds its special tokens by name (SPECIAL_TOKENS, the Llama 3 names). Each one the
    vocabulary lacks is supplied, keeping ids, in this order of preference:
    1. for BOS, EOS and PAD, the folder's own token for that role is renamed (`<s>` becomes
       `<|begin_of_text|>`) if it is an added special token, is not the model's unknown
       token and has no jaxllm name already;
    2. an unused `<|reserved_special_token_N|>` of a Llama 3 vocabulary is renamed, lowest id
       first, so a Llama 3 tokenizer gets its `<|pad|>` without growing;
    3. the token is appended as a new special token, if its id stays below `vocab_size`.
    Appended tokens have untrained embedding rows.
    Raises ConversionError if tokenizer.json is missing or invalid, or the tokens do not fit.
    """
    hf_dir = Path(hf_dir)
    path = hf_dir / TOKENIZER_FILE
    if not path.is_file():
        raise ConversionError(
            f"{path} not found; jaxllm needs the fast-tokenizer file tokenizer.json (save the "
            "tokenizer with transformers' save_pretrained or the tokenizers library)"
        )
    data = _read_json(path, "tokenizer")
    try:
        probe = tokenizers.Tokenizer.from_str(json.dumps(data))
    except Exception as error:  # tokenizers raises a plain Exception for invalid content
        raise ConversionError(f"{path} is not a valid tokenizer.json ({error})") from None

    roles = _role_tokens(hf_dir, probe)
    # Only added special tokens are renamed; the model's unknown token is referenced by string.
    unk_token = (data.get("model") or {}).get("unk_token")
    renamable = {
        entry["content"]
        for entry in data.get("added_tokens") or []
        if entry.get("special") and entry.get("content") != unk_token
    }
    free_reserved = [
        content
        for _, content in sorted(
            (entry["id"], entry["content"]) for entry in data.get("added_tokens") or []
        )
        if _RESERVED_TOKEN.fullmatch(content) and content in renamable
    ]
    role_of = {
        BOS_TOKEN: roles.get("bos"), EOS_TOKEN: roles.get("eos"), PAD_TOKEN: roles.get("pad")
    }
    renamed: dict[str, str] = {}
    appended: list[str] = []
    for token in SPECIAL_TOKENS:
        if probe.token_to_id(token) is not None:
            continue
        role_token = role_of.get(token)
        renames_role = (
            role_token in renamable and role_token not in SPECIAL_TOKENS
            and role_token not in renamed
        )
        if renames_role:
            renamed[role_token] = token
            if role_token in free_reserved:
                free_reserved.remove(role_token)
        elif free_reserved:
            renamed[free_reserved.pop(0)] = token
        else:
            appended.append(token)

    for old, new in renamed.items():
        _rename_token(data, old, new)
    backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    if appended:
        backend.add_special_tokens(
            [tokenizers.AddedToken(token, special=True, normalized=False) for token in appended]
        )
    for old, new in renamed.items():
        logger.info("tokenizer: renamed %s (id %d) to %s", old, backend.token_to_id(new), new)
    for token in appended:
        logger.info("tokenizer: added %s at id %d", token, backend.token_to_id(token))

    tokenizer = Tokenizer(backend, source=f"tokenizer file {path}")
    if tokenizer.vocab_size > vocab_size:
        raise ConversionError(
            f"{path} needs {tokenizer.vocab_size} embedding rows with the jaxllm special tokens "
            f"({', '.join(appended) or 'none'} appended) but the model has vocab_size {vocab_size}"
        )
    return tokenizer


def write_hf_tokenizer(
    tokenizer: Tokenizer, out_dir: str | Path, *, max_seq_len: int
) -> list[Path]:
    """Write tokenizer.json and a tokenizer_config.json that names BOS, EOS and PAD."""
    out_dir = Path(out_dir)
    tokenizer_path = tokenizer.save(out_dir / TOKENIZER_FILE)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    config_path = out_dir / TOKENIZER_CONFIG_FILE
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    return [tokenizer_path, config_path]
