"""Training data: documents, the BPE tokenizer, token windows and batches.

`prepare_data` runs the whole pipeline for a `DataConfig`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np

from jaxllm.config import DataConfig
from jaxllm.data.batching import BatchSampler, token_windows, unigram_entropy, validation_batches
from jaxllm.data.corpus import (
    DataError,
    Document,
    cache_root,
    fetch_shakespeare,
    load_documents,
    split_documents,
)
from jaxllm.data.tokenizer import (
    BOS_TOKEN,
    END_HEADER_TOKEN,
    EOS_TOKEN,
    EOT_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    START_HEADER_TOKEN,
    Tokenizer,
    train_tokenizer,
)

__all__ = [
    "BOS_TOKEN",
    "END_HEADER_TOKEN",
    "EOS_TOKEN",
    "EOT_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "START_HEADER_TOKEN",
    "BatchSampler",
    "DataError",
    "Document",
    "PreparedData",
    "Tokenizer",
    "cache_root",
    "fetch_shakespeare",
    "load_documents",
    "prepare_data",
    "split_documents",
    "token_windows",
    "train_tokenizer",
    "unigram_entropy",
    "validation_batches",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Tokenizer and int32 token windows of shape [num_windows, seq_len + 1] for one run."""

    tokenizer: Tokenizer
    train_windows: np.ndarray
    val_windows: np.ndarray
    # Nats per token of the unigram distribution of train_windows: the loss to beat.
    train_unigram_entropy: float
    num_train_documents: int
    num_val_documents: int


def prepare_data(
    data_config: DataConfig, vocab_size: int, tokenizer_path: str | os.PathLike | None = None
) -> PreparedData:
    """Load, split, tokenize and window the corpus of `data_config`.

    The tokenizer is read from `tokenizer_path` if given, else from `data_config.tokenizer`
    if set. Otherwise a BPE with at most `vocab_size` tokens is trained on the training
    documents only. Either way it must fit in `vocab_size` embedding rows.
    Raises DataError for unusable input, including too little text for one training or one
    validation window.
    """
    documents = load_documents(data_config)
    train_docs, val_docs = split_documents(documents, data_config.val_fraction)

    source = tokenizer_path if tokenizer_path is not None else data_config.tokenizer
    if source is not None:
        tokenizer = Tokenizer.load(source)
    else:
        tokenizer = train_tokenizer((doc.text for doc in train_docs), vocab_size)
    tokenizer.check_fits(vocab_size)

    start = time.perf_counter()
    # One call for both splits, because encode_batch spreads the documents over its threads.
    ids = tokenizer.encode_batch([doc.text for doc in train_docs + val_docs])
    train_ids, val_ids = ids[:len(train_docs)], ids[len(train_docs):]
    logger.info("encoded %d documents in %.1f s", len(ids), time.perf_counter() - start)

    bos_id, eos_id = tokenizer.bos_id, tokenizer.eos_id
    train_windows = token_windows(train_ids, data_config.seq_len, bos_id, eos_id)
    val_tokens = sum(len(ids) + 2 for ids in val_ids)
    if val_tokens < data_config.seq_len + 1:
        raise DataError(
            f"the validation split ({len(val_docs)} of {len(train_docs) + len(val_docs)} "
            f"documents) gives only {val_tokens} tokens, fewer than the "
            f"{data_config.seq_len + 1} of one window; raise data.val_fraction (now "
            f"{data_config.val_fraction}), use a smaller data.seq_len or add more data"
        )
    val_windows = token_windows(val_ids, data_config.seq_len, bos_id, eos_id)

    prepared = PreparedData(
        tokenizer=tokenizer,
        train_windows=train_windows,
        val_windows=val_windows,
        train_unigram_entropy=unigram_entropy(train_windows),
        num_train_documents=len(train_docs),
        num_val_documents=len(val_docs),
    )
    logger.info(
        "data: %d train and %d validation documents, %d train and %d validation windows of %d "
        "tokens, vocab %d, unigram entropy %.3f nats",
        prepared.num_train_documents, prepared.num_val_documents, train_windows.shape[0],
        val_windows.shape[0], data_config.seq_len + 1, tokenizer.vocab_size,
        prepared.train_unigram_entropy,
    )
    return prepared
