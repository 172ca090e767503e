"""Byte-level BPE tokenizer with the Llama 3 special tokens, over Hugging Face `tokenizers`.

Every string encodes, because the base vocabulary contains all 256 bytes. Special tokens never
come from text: a string that spells `<|eot_id|>` encodes as ordinary bytes, and callers
insert special tokens by id (`bos_id`, `token_id(...)`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxllm.data.corpus import DataError

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
# Llama 3 chat-format tokens, reserved for chat fine-tuning.
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN)

NUM_BYTES = 256
# rw-r--r--, the mode of a file created under the usual umask 022.
READABLE_FILE_MODE = 0o644
MIN_VOCAB_SIZE = NUM_BYTES + len(SPECIAL_TOKENS)
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """A `tokenizers.Tokenizer` that contains every token of SPECIAL_TOKENS.

    The constructor sets `encode_special_tokens` on the wrapped tokenizer. It raises
    DataError when a special token is missing, naming the tokenizer by `source`.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, source: str = "the tokenizer"):
        missing = [token for token in SPECIAL_TOKENS if backend.token_to_id(token) is None]
        if missing:
            raise DataError(
                f"{source} is missing the special tokens {', '.join(missing)}; leave "
                "data.tokenizer empty so that jaxllm trains a tokenizer with them"
            )
        # Text that spells a special token is split like any other text.
        backend.encode_special_tokens = True
        self._backend = backend
        self._special_ids = tuple(backend.token_to_id(token) for token in SPECIAL_TOKENS)
        self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped Hugging Face tokenizer."""
        return self._backend

    @property
    def bos_id(self) -> int:
        """Id of `<|begin_of_text|>`."""
        return self._special_ids[0]

    @property
    def eos_id(self) -> int:
        """Id of `<|end_of_text|>`."""
        return self._special_ids[1]

    @property
    def pad_id(self) -> int:
        """Id of `<|pad|>`."""
        return self._special_ids[2]

    @property
    def vocab_size(self) -> int:
        """Embedding rows the tokenizer needs: the largest token id plus one."""
        return self._vocab_size

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids of SPECIAL_TOKENS, in that order."""
        return self._special_ids

    def token_id(self, token: str) -> int:
        """Return the id of `token`, raising DataError if the vocabulary lacks it."""
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise DataError(f"token {token!r} is not in the vocabulary")
        return token_id

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encode `text` to token ids, optionally framed by BOS and EOS."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """Encode many texts on the tokenizers thread pool; the result equals `encode` per text."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(encoding.ids, add_bos, add_eos) for encoding in encodings]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Decode token ids to text, dropping special tokens unless `skip_special` is False.

        Byte sequences that are not valid UTF-8, such as a sequence cut inside a character,
        decode to U+FFFD. Ids outside the vocabulary are skipped (tokenizers 0.23.3).
        """
        return self._backend.decode([int(token_id) for token_id in ids],
                                    skip_special_tokens=skip_special)

    def check_fits(self, model_vocab_size: int) -> None:
        """Raise DataError if some token id would not fit in `model_vocab_size` embedding rows."""
        if self.vocab_size > model_vocab_size:
            raise DataError(
                f"the tokenizer has {self.vocab_size} tokens but model.vocab_size is "
                f"{model_vocab_size}; retrain the tokenizer with at most {model_vocab_size} "
                f"tokens or raise model.vocab_size to at least {self.vocab_size}"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as JSON and return the file path.

        `path` is the file to write, or an existing folder to write `tokenizer.json` into.
        The write is atomic: a temporary file in the same folder is renamed over the target.
        """
        target = Path(path)
        if target.is_dir():
            target = target / TOKENIZER_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            # mkstemp creates the file readable by its owner only; a tokenizer is not secret.
            os.fchmod(descriptor, READABLE_FILE_MODE)
            with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
                stream.write(self._backend.to_str(pretty=True))
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer.json file, or `tokenizer.json` inside a folder.

        Raises DataError if the file is missing, is not valid JSON or not a tokenizer, or lacks
        a special token.
        """
        file = Path(path)
        if file.is_dir():
            file = file / TOKENIZER_FILE
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(
                f"tokenizer file {file} not found; set data.tokenizer to an existing "
                "tokenizer.json or leave it empty to train one"
            ) from None
        except UnicodeDecodeError:
            raise DataError(f"tokenizer file {file} is not UTF-8 text; "
                            "point data.tokenizer at a tokenizer.json") from None
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"tokenizer file {file} is not valid JSON ({error.msg} at line {error.lineno}); "
                "point data.tokenizer at a tokenizer.json"
            ) from None
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as error:  # tokenizers raises a plain Exception for invalid content
            raise DataError(
                f"tokenizer file {file} is not a valid tokenizer.json ({error}); "
                "point data.tokenizer at a tokenizer.json saved by the tokenizers library"
            ) from None
        return cls(backend, source=f"tokenizer file {file}")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with SPECIAL_TOKENS at ids 0 to 5 and return it.

    The vocabulary has at most `vocab_size` tokens, fewer when the text runs out of pairs to
    merge. Training on the same texts in the same order gives the same tokenizer, also across
    processes (checked with tokenizers 0.23.3).
    Raises DataError if `vocab_size` is below MIN_VOCAB_SIZE (256 bytes plus the specials).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE, which needs at least "
            f"{MIN_VOCAB_SIZE} tokens (256 bytes and {len(SPECIAL_TOKENS)} special tokens); "
            "raise model.vocab_size"
        )
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    start = time.perf_counter()
    backend.train_from_iterator(texts, trainer)
    tokenizer = Tokenizer(backend, source="the trained tokenizer")
    logger.info("trained a byte-level BPE with %d tokens in %.1f s", tokenizer.vocab_size,
                time.perf_counter() - start)
    return tokenizer
