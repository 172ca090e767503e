"""Token windows for next-token training, deterministic batches and the unigram baseline.

A window contains seq_len + 1 tokens: the model reads `window[:-1]` and predicts `window[1:]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxllm.data.corpus import DataError


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def token_windows(
    token_docs: Sequence[Sequence[int]], seq_len: int, bos_id: int, eos_id: int
) -> np.ndarray:
    """Pack documents into non-overlapping int32 windows of shape [num_windows, seq_len + 1].

    Each document becomes BOS, its ids, EOS. The documents are concatenated in order into one
    stream, which is cut into consecutive windows. The tokens after the last full window are
    dropped. Raises DataError if the stream is shorter than one window.
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}; set data.seq_len")
    window_len = seq_len + 1
    lengths = np.array([len(doc) + 2 for doc in token_docs], dtype=np.int64)
    total = int(lengths.sum())
    num_windows = total // window_len
    if num_windows == 0:
        raise DataError(
            f"{_count(len(token_docs), 'document')} give only {total} tokens with BOS and EOS, "
            f"fewer than the {window_len} of one window (data.seq_len={seq_len} plus one); "
            "use a smaller data.seq_len or more data"
        )

    stream = np.empty(total, dtype=np.int32)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    stream[starts] = bos_id
    stream[ends - 1] = eos_id
    for doc, start, end in zip(token_docs, starts, ends):
        stream[start + 1:end - 1] = doc
    return stream[:num_windows * window_len].reshape(num_windows, window_len)


class BatchSampler:
    """Training batches as a pure function of the global step.

    The windows are read in epochs. Epoch e visits every window once, in the order of
    `np.random.default_rng([seed, e]).permutation(num_windows)`, and the epochs form one
    endless sequence. Batch `step` is elements `step * batch_size` to
    `(step + 1) * batch_size - 1` of that sequence, so a batch may span two epochs, and a run
    resumed at step s gets the batches an uninterrupted run would.
    """

    def __init__(self, windows: np.ndarray, batch_size: int, seed: int = 0):
        if windows.ndim != 2 or windows.shape[0] == 0:
            raise DataError(f"windows must be a non-empty 2-D array, got shape {windows.shape}")
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}; set train.batch_size")
        if seed < 0:
            raise DataError(
                f"seed must be >= 0, got {seed}; set train.seed to a non-negative integer"
            )
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        # Permutations of recent epochs. A cache only, so results never depend on call order.
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def num_windows(self) -> int:
        """Windows in one epoch."""
        return self.windows.shape[0]

    def epoch_of(self, step: int) -> int:
        """Return the epoch of the first window of batch `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step * self.batch_size // self.num_windows

    def _permutation(self, epoch: int) -> np.ndarray:
        permutation = self._permutations.get(epoch)
        if permutation is None:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = permutation
        return permutation

    def batch(self, step: int) -> np.ndarray:
        """Return batch `step` as an array of shape [batch_size, seq_len + 1]."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        first = step * self.batch_size
        last = first + self.batch_size  # exclusive
        indices = []
        position = first
        while position < last:
            epoch, offset = divmod(position, self.num_windows)
            count = min(last - position, self.num_windows - offset)
            indices.append(self._permutation(epoch)[offset:offset + count])
            position += count
        return self.windows[np.concatenate(indices)]


def unigram_entropy(tokens: np.ndarray | Sequence[Sequence[int]]) -> float:
    """Return the entropy in nats per token of the empirical unigram distribution of `tokens`.

    `tokens` is an array of any shape (such as windows) or a list of token lists, counted as
    given, so BOS and EOS count only if they are present. A model that ignores context can
    reach this cross-entropy at best, so a trained model must get below it.
    """
    if isinstance(tokens, np.ndarray):
        flat = tokens.reshape(-1)
    else:
        flat = np.concatenate([np.asarray(doc, dtype=np.int64).reshape(-1) for doc in tokens]
                              or [np.zeros(0, dtype=np.int64)])
    if flat.size == 0:
        raise DataError("cannot compute the unigram entropy of an empty token stream")
    counts = np.bincount(flat.astype(np.int64))
    probabilities = counts[counts > 0] / flat.size
    return float(-(probabilities * np.log(probabilities)).sum())


def validation_batches(windows: np.ndarray, batch_size: int, max_batches: int) -> list[np.ndarray]:
    """Return up to `max_batches` full batches of evenly spaced windows, the same on every call.

    The windows are taken at evenly spaced indices across `windows`, so the batches cover
    the whole validation set rather than its first documents only. If there are fewer
    windows than `batch_size`, the result is one smaller batch of all windows.
    """
    if batch_size < 1 or max_batches < 1:
        raise DataError(
            f"batch_size and max_batches must be positive, got {batch_size} and {max_batches}"
        )
    num_windows = windows.shape[0]
    if num_windows == 0:
        raise DataError("there are no validation windows; raise data.val_fraction")
    if num_windows < batch_size:
        return [windows]

    num_batches = min(max_batches, num_windows // batch_size)
    count = num_batches * batch_size
    # Integer spacing: index i * num_windows // count is strictly increasing because
    # count <= num_windows, so no window repeats.
    indices = np.arange(count, dtype=np.int64) * num_windows // count
    selected = windows[indices]
    return [selected[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]
