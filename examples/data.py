"""Offline text data for the GaLore examples: corpus, tokenisation, packing.

The default corpus is the Python standard library's own ``.py`` sources, which
every machine with Python has (about 10 MB without tests), so the examples run
with no download. Other sources:

* local text files, directories or glob patterns (one document per file);
* a Hugging Face ``datasets`` dataset, ``"hf:NAME"`` or ``"hf:NAME:CONFIG"``
  (streamed; needs the optional ``datasets`` package and a network).

Documents are split into train and held-out eval by a stable hash of their
name (a file's relative path), so the split never depends on the order files
are listed in or on how many are read. Tokens are ``ByT5Tokenizer``'s (UTF-8
bytes + 3, computed with numpy) unless a local tokenizer directory is given.
Documents are concatenated with an EOS after each one, and the stream is cut
into windows of ``seq_len + 1`` tokens (inputs ``[:-1]``, labels ``[1:]``)
with stride ``seq_len``, so that every token is predicted exactly once.

Training batches are a pure function of ``(seed, step)``: step ``k`` lies in
epoch ``k // steps_per_epoch`` whose order is a permutation drawn from
``numpy.random.default_rng([seed, epoch])``. Resuming at step ``k`` therefore
reproduces exactly the batches an uninterrupted run would have seen.

Tokenised arrays are cached as ``.npy`` files under
``~/.cache/galore_optax/data`` (or ``$GALORE_OPTAX_CACHE/data``, or a given
directory), keyed by a hash of the document list (names, sizes, mtimes) and
the tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import logging
import os
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "Document",
    "Corpus",
    "TrainBatches",
    "stdlib_dir",
    "stdlib_documents",
    "local_documents",
    "split_documents",
    "cap_documents",
    "load_tokenizer",
    "tokenizer_id",
    "is_byt5",
    "byt5_encode",
    "encode_documents",
    "num_sequences",
    "sequences",
    "eval_batches",
    "load_corpus",
    "default_cache_dir",
]

# Bump when the cached array format or the tokenisation rules change.
_CACHE_VERSION = 1

# Directory names skipped in the stdlib corpus: test suites (huge, repetitive,
# full of deliberately odd code), third-party packages, IDLE, and packages
# that are mostly generated tables (codec charmaps, pydoc's topic dump).
STDLIB_EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages",
    "__pycache__", "encodings", "pydoc_data", "lib-dynload",
})
# Generated files: the build's sysconfig dump.
_STDLIB_EXCLUDED_PREFIXES = ("_sysconfigdata",)


@dataclasses.dataclass(frozen=True)
class Document:
  """One document of a file-based corpus.

  Attributes:
    name: stable identifier (the path relative to the corpus root); the
      train/eval split hashes it.
    path: where to read it.
    size: size in bytes (from ``stat``; used for caps and cache keys).
    mtime_ns: modification time, so an edited file invalidates the cache.
  """

  name: str
  path: Path
  size: int
  mtime_ns: int

  @classmethod
  def from_path(cls, path: Path, root: Path) -> Document:
    """Makes a document named by its path relative to ``root``.

    Args:
      path: the file.
      root: the corpus root.

    Returns:
      The document.
    """
    st = path.stat()
    name = path.relative_to(root).as_posix()
    return cls(name, path, st.st_size, st.st_mtime_ns)

  def read_text(self) -> str:
    """Reads the file as UTF-8, replacing undecodable bytes."""
    return self.path.read_bytes().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------


def stdlib_dir() -> Path:
  """The directory of the running Python's standard library."""
  return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(root: str | os.PathLike | None = None) -> list[Document]:
  """Lists the standard library's ``.py`` files, without tests and noise.

  Args:
    root: the stdlib directory; defaults to :func:`stdlib_dir`.

  Returns:
    Documents sorted by relative path.
  """
  root = Path(root) if root is not None else stdlib_dir()
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Prune in place so os.walk never descends into excluded trees;
    # `config-3.x-<platform>` holds build files, not library code.
    dirnames[:] = [
        d for d in dirnames
        if d not in STDLIB_EXCLUDED_DIRS and not d.startswith("config-")
    ]
    for f in filenames:
      if f.endswith(".py") and not f.startswith(_STDLIB_EXCLUDED_PREFIXES):
        docs.append(Document.from_path(Path(dirpath) / f, root))
  return sorted(docs, key=lambda d: d.name)


def _looks_binary(path: Path) -> bool:
  with open(path, "rb") as fh:
    return b"\0" in fh.read(8192)


def local_documents(
    patterns: str | os.PathLike | Sequence[str | os.PathLike],
) -> list[Document]:
  """Resolves local files, directories and glob patterns into documents.

  Args:
    patterns: one or more paths; a file is one document, a directory
      contributes every non-hidden, non-binary file under it (recursively),
      a pattern is expanded with ``glob`` (``**`` allowed).

  Returns:
    Documents sorted by name, named relative to the deepest directory
    common to all files (the file name alone for a single file).

  Raises:
    FileNotFoundError: if a pattern matches nothing, or nothing remains.
  """
  if isinstance(patterns, str | os.PathLike):
    patterns = [patterns]
  paths: set[Path] = set()
  for pattern in patterns:
    pattern = os.path.expanduser(os.fspath(pattern))
    if glob.has_magic(pattern):
      matches = [Path(p) for p in glob.glob(pattern, recursive=True)]
    else:
      matches = [Path(pattern)] if os.path.exists(pattern) else []
    if not matches:
      raise FileNotFoundError(f"No local file matches {pattern!r}.")
    for m in matches:
      if m.is_dir():
        for p in m.rglob("*"):
          rel_parts = p.relative_to(m).parts
          hidden = any(part.startswith(".") for part in rel_parts)
          if p.is_file() and not hidden:
            paths.add(p.resolve())
      elif m.is_file():
        paths.add(m.resolve())
  files = []
  for p in sorted(paths):
    if _looks_binary(p):
      logger.info("Skipping binary file %s", p)
    else:
      files.append(p)
  if not files:
    raise FileNotFoundError(
        f"No text files found in {list(map(os.fspath, patterns))}.")
  root = Path(os.path.commonpath([p.parent for p in files]))
  docs = [Document.from_path(p, root) for p in files]
  return sorted(docs, key=lambda d: d.name)


def _unit_hash(name: str) -> float:
  """A stable, platform-independent number in [0, 1) for a name."""
  digest = hashlib.sha256(name.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(
    names: Sequence[str], eval_fraction: float = 0.02
) -> tuple[list[int], list[int]]:
  """Assigns documents to train or eval by a stable hash of their names.

  A name goes to eval when its hash falls below ``eval_fraction``; the
  assignment of one document never depends on the others. With two or more
  documents, both sides are kept non-empty (when ``eval_fraction > 0``) by
  moving the single closest document across.

  Args:
    names: document names (e.g. relative paths).
    eval_fraction: expected fraction of documents held out.

  Returns:
    ``(train_indices, eval_indices)``, each in increasing order.
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
  hashes = [_unit_hash(n) for n in names]
  is_eval = [h < eval_fraction for h in hashes]
  if eval_fraction > 0 and len(names) >= 2:
    if not any(is_eval):
      is_eval[min(range(len(names)), key=hashes.__getitem__)] = True
    elif all(is_eval):
      is_eval[max(range(len(names)), key=hashes.__getitem__)] = False
  train = [i for i, e in enumerate(is_eval) if not e]
  evals = [i for i, e in enumerate(is_eval) if e]
  return train, evals


def cap_documents(
    docs: Sequence[Document],
    *,
    max_bytes: int | None = None,
    max_files: int | None = None,
) -> list[Document]:
  """Selects a deterministic, diverse subset of documents under caps.

  Documents are considered in hash order (not alphabetical, so a small cap
  samples the whole corpus rather than its first directory) and kept while
  they fit. Nothing is read: sizes come from ``stat``.

  Args:
    docs: candidate documents.
    max_bytes: keep at most this many bytes in total. If even the first
      document is larger, it alone is kept (and truncated when read).
    max_files: keep at most this many documents.

  Returns:
    The kept documents, sorted by name.
  """
  if max_bytes is None and max_files is None:
    return list(docs)
  kept, total = [], 0
  for d in sorted(docs, key=lambda d: (_unit_hash(d.name), d.name)):
    if max_files is not None and len(kept) >= max_files:
      break
    if max_bytes is not None and total + d.size > max_bytes:
      if not kept:
        kept.append(d)
        total += d.size
      continue
    kept.append(d)
    total += d.size
  return sorted(kept, key=lambda d: d.name)


# ---------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------


def load_tokenizer(tokenizer: Any = None) -> Any:
  """Returns a tokenizer without ever touching the network.

  Args:
    tokenizer: ``None`` or ``"byt5"`` for ``ByT5Tokenizer()`` (needs no
      files), a local directory holding tokenizer files (loaded with
      ``AutoTokenizer.from_pretrained(path, local_files_only=True)``), or an
      already constructed tokenizer, returned unchanged.

  Returns:
    A ``transformers`` tokenizer.

  Raises:
    FileNotFoundError: if a string is neither ``"byt5"`` nor a local directory.
  """
  import transformers  # heavy import, only when tokenising

  if tokenizer is None or (
      isinstance(tokenizer, str) and tokenizer.lower() == "byt5"):
    return transformers.ByT5Tokenizer()
  if isinstance(tokenizer, str | os.PathLike):
    path = os.path.expanduser(os.fspath(tokenizer))
    if not os.path.isdir(path):
      raise FileNotFoundError(
          f"Tokenizer {path!r} is not a local directory. This loader never "
          "downloads: save the tokenizer with save_pretrained() somewhere "
          "local and pass that directory, or use 'byt5'."
      )
    return transformers.AutoTokenizer.from_pretrained(
        path, local_files_only=True)
  return tokenizer


def is_byt5(tokenizer: Any) -> bool:
  """Whether ``tokenizer`` is ByT5's byte tokenizer (id = byte + 3)."""
  import transformers

  return (
      isinstance(tokenizer, transformers.ByT5Tokenizer)
      and getattr(tokenizer, "offset", None) == 3
  )


def tokenizer_id(tokenizer: Any) -> str:
  """A string identifying a tokenizer's behaviour, for cache keys.

  For a tokenizer loaded from a directory the hash of its files is included,
  so replacing the files invalidates the cache.

  Args:
    tokenizer: a ``transformers`` tokenizer.

  Returns:
    The identifier.
  """
  if is_byt5(tokenizer):
    return "byt5"
  parts = [type(tokenizer).__name__, str(len(tokenizer))]
  path = getattr(tokenizer, "name_or_path", "")
  if path and os.path.isdir(path):
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
      if f.is_file():
        h.update(f.name.encode())
        h.update(f.read_bytes())
    parts.append(h.hexdigest()[:16])
  else:
    parts.append(str(path))
  return ":".join(parts)


def _eos_id(tokenizer: Any) -> int:
  eos = getattr(tokenizer, "eos_token_id", None)
  if eos is None:
    eos = getattr(tokenizer, "sep_token_id", None)
  if eos is None:
    raise ValueError(
        "The tokenizer has no eos_token_id (nor sep_token_id) to separate "
        "documents.")
  return int(eos)


def _token_dtype(vocab_size: int) -> np.dtype:
  # Halves the cache and memory for vocabularies that fit in 16 bits.
  return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def byt5_encode(text: str) -> np.ndarray:
  """ByT5 token ids of ``text`` without special tokens, via numpy.

  Equal to ``ByT5Tokenizer()(text, add_special_tokens=False).input_ids``,
  except that literal ``"</s>"``, ``"<pad>"``, ``"<unk>"`` in the text stay
  bytes here (as with ``split_special_tokens=True``), instead of becoming
  control tokens -- the right thing for training data.

  Args:
    text: the text.

  Returns:
    uint16 ids, one per UTF-8 byte.
  """
  raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
  return raw.astype(np.uint16) + 3


def encode_documents(
    texts: Iterable[str], tokenizer: Any, *, batch_size: int = 64
) -> np.ndarray:
  """Tokenises documents into one stream, with an EOS after each document.

  Args:
    texts: the documents.
    tokenizer: a ``transformers`` tokenizer; ByT5 takes a numpy fast path.
    batch_size: documents per call of a generic tokenizer.

  Returns:
    A 1-D array of ids (uint16 when the vocabulary fits, else int32).
  """
  eos = _eos_id(tokenizer)
  dtype = _token_dtype(len(tokenizer))
  eos_arr = np.array([eos], dtype=dtype)
  pieces: list[np.ndarray] = []
  if is_byt5(tokenizer):
    for text in texts:
      pieces.append(byt5_encode(text))
      pieces.append(eos_arr)
  else:
    texts = list(texts)
    for start in range(0, len(texts), batch_size):
      chunk = texts[start : start + batch_size]
      # verbose=False: long documents legitimately exceed model_max_length.
      ids = tokenizer(
          chunk, add_special_tokens=False, verbose=False)["input_ids"]
      for seq in ids:
        pieces.append(np.asarray(seq, dtype=dtype))
        pieces.append(eos_arr)
  if not pieces:
    return np.zeros((0,), dtype=dtype)
  return np.concatenate(pieces)


# ---------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------


def default_cache_dir() -> Path:
  """``$GALORE_OPTAX_CACHE/data``, else ``~/.cache/galore_optax/data``."""
  base = os.environ.get("GALORE_OPTAX_CACHE") or os.path.join(
      "~", ".cache", "galore_optax")
  return Path(os.path.expanduser(base)) / "data"


def _cache_key(payload: Any) -> str:
  blob = json.dumps([_CACHE_VERSION, payload], sort_keys=True, default=str)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def _cached_array(
    key_payload: Any, compute: Any, cache_dir: Path | None
) -> tuple[np.ndarray, bool]:
  """Loads an array from the cache or computes and stores it.

  Args:
    key_payload: JSON-serialisable description of what is cached.
    compute: zero-argument function producing the array on a miss.
    cache_dir: the cache directory; ``None`` disables caching.

  Returns:
    ``(array, hit)``.
  """
  if cache_dir is None:
    return compute(), False
  path = Path(cache_dir) / f"tokens-{_cache_key(key_payload)}.npy"
  if path.exists():
    try:
      return np.load(path), True
    except (OSError, ValueError):
      logger.warning("Ignoring unreadable cache file %s", path)
  arr = compute()
  path.parent.mkdir(parents=True, exist_ok=True)
  # Write then rename, so a crash or a concurrent run never leaves a
  # truncated file that a later run would trust.
  tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
  np.save(tmp, arr)
  os.replace(tmp, path)
  return arr, False


def _tokenize_documents_cached(
    docs: Sequence[Document],
    tokenizer: Any,
    cache_dir: Path | None,
    max_bytes: int | None,
) -> tuple[np.ndarray, bool]:
  def compute() -> np.ndarray:
    def texts() -> Iterator[str]:
      for d in docs:
        text = d.read_text()
        # Only a single over-sized document can exceed the cap (see
        # cap_documents); truncating it keeps the cap a real bound.
        if max_bytes is not None and d.size > max_bytes:
          head = text.encode("utf-8")[:max_bytes]
          text = head.decode("utf-8", errors="ignore")
        yield text

    return encode_documents(texts(), tokenizer)

  payload = {
      "tokenizer": tokenizer_id(tokenizer),
      "docs": [(d.name, os.fspath(d.path), d.size, d.mtime_ns) for d in docs],
      "max_bytes": max_bytes,
  }
  return _cached_array(payload, compute, cache_dir)


# ---------------------------------------------------------------------------
# Corpus loading
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Corpus:
  """Tokenised train and eval streams.

  Attributes:
    train_tokens: 1-D token stream of the training documents.
    eval_tokens: 1-D token stream of the held-out documents.
    train_documents: names of the training documents.
    eval_documents: names of the held-out documents.
    tokenizer: the tokenizer used.
    vocab_size: ``len(tokenizer)``, the smallest valid model vocabulary.
    eos_id: the separator appended after each document.
    source: a description of where the text came from.
    seconds: time spent reading and tokenising (or loading the cache).
    from_cache: whether both streams came from the cache.
  """

  train_tokens: np.ndarray
  eval_tokens: np.ndarray
  train_documents: list[str]
  eval_documents: list[str]
  tokenizer: Any
  vocab_size: int
  eos_id: int
  source: str
  seconds: float = 0.0
  from_cache: bool = False

  def train_batches(
      self, *, seq_len: int, batch_size: int, seed: int = 0
  ) -> TrainBatches:
    """Shuffled, resumable training batches; see :class:`TrainBatches`."""
    return TrainBatches(self.train_tokens, seq_len=seq_len,
                        batch_size=batch_size, seed=seed)

  def eval_batches(
      self, *, seq_len: int, batch_size: int, num_batches: int | None = None
  ) -> list[dict[str, np.ndarray]]:
    """Fixed held-out batches; see :func:`eval_batches`."""
    return eval_batches(self.eval_tokens, seq_len=seq_len,
                        batch_size=batch_size, num_batches=num_batches)


def _import_datasets() -> Any:
  try:
    import datasets  # noqa: PLC0415  (optional dependency, imported lazily)
  except ImportError as e:
    raise ImportError(
        "Loading a Hugging Face dataset ('hf:...') needs the optional "
        "`datasets` package: pip install datasets (and network access). "
        "Local files and the default stdlib corpus need neither.") from e
  return datasets


def _load_hf_corpus(
    spec: str,
    tokenizer: Any,
    *,
    eval_fraction: float,
    max_train_bytes: int | None,
    max_eval_bytes: int | None,
    max_files: int | None,
    split: str,
    text_column: str,
    cache_dir: Path | None,
) -> tuple[np.ndarray, np.ndarray, list[str], list[str], bool]:
  """Streams a ``datasets`` dataset and splits its rows by hashed index."""
  name, _, config = spec.partition(":")
  config = config or None
  key = {
      "hf": name, "config": config, "split": split, "column": text_column,
      "eval_fraction": eval_fraction, "max_train_bytes": max_train_bytes,
      "max_eval_bytes": max_eval_bytes, "max_files": max_files,
      "tokenizer": tokenizer_id(tokenizer),
  }
  train_key, eval_key = dict(key, part="train"), dict(key, part="eval")
  if cache_dir is not None:
    paths = [Path(cache_dir) / f"tokens-{_cache_key(k)}.npy"
             for k in (train_key, eval_key)]
    if all(p.exists() for p in paths):
      return np.load(paths[0]), np.load(paths[1]), [spec], [spec], True

  datasets = _import_datasets()
  # Streaming reads only as many rows as the caps need (C4 is ~300 GB).
  stream = datasets.load_dataset(name, config, split=split, streaming=True)
  if (max_eval_bytes is None and max_train_bytes is not None
      and eval_fraction > 0):
    # Keep the eval/train ratio of an uncapped split.
    ratio = eval_fraction / (1 - eval_fraction)
    max_eval_bytes = max(1, int(max_train_bytes * ratio))
  train_texts: list[str] = []
  eval_texts: list[str] = []
  train_bytes = eval_bytes = 0

  def train_full() -> bool:
    return ((max_train_bytes is not None and train_bytes >= max_train_bytes)
            or (max_files is not None and len(train_texts) >= max_files))

  def eval_full() -> bool:
    return eval_fraction == 0 or (
        max_eval_bytes is not None and eval_bytes >= max_eval_bytes)

  for i, row in enumerate(stream):
    text = row[text_column]
    # Rows are identified by their index in the stream: the split of a row
    # never depends on the caps.
    if _unit_hash(f"{spec}:{split}:{i}") < eval_fraction:
      if not eval_full():
        eval_texts.append(text)
        eval_bytes += len(text.encode("utf-8"))
    elif not train_full():
      train_texts.append(text)
      train_bytes += len(text.encode("utf-8"))
    if train_full() and eval_full():
      break
  train, hit_t = _cached_array(
      train_key, lambda: encode_documents(train_texts, tokenizer), cache_dir)
  evals, hit_e = _cached_array(
      eval_key, lambda: encode_documents(eval_texts, tokenizer), cache_dir)
  return train, evals, [spec], [spec], hit_t and hit_e


def load_corpus(
    data: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    tokenizer: Any = None,
    eval_fraction: float = 0.02,
    max_train_bytes: int | None = None,
    max_eval_bytes: int | None = None,
    max_files: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    hf_split: str = "train",
    text_column: str = "text",
) -> Corpus:
  """Loads, splits and tokenises a corpus.

  Args:
    data: ``None`` or ``"stdlib"`` for the standard library's sources;
      ``"hf:NAME"`` / ``"hf:NAME:CONFIG"`` for a Hugging Face dataset
      (needs ``datasets``); otherwise local files, directories or glob
      patterns (a string or a list).
    tokenizer: see :func:`load_tokenizer` (default ByT5).
    eval_fraction: expected fraction of documents held out for eval. With a
      single local file, the last ``eval_fraction`` of its tokens is held out.
    max_train_bytes: cap on the training text read (hash-ordered selection
      of whole documents, see :func:`cap_documents`).
    max_eval_bytes: cap on the eval text read.
    max_files: cap on the number of training documents.
    cache_dir: where tokenised arrays are cached (default
      :func:`default_cache_dir`).
    use_cache: set False to neither read nor write the cache.
    hf_split: dataset split to stream for ``hf:`` sources.
    text_column: column holding the text for ``hf:`` sources.

  Returns:
    The :class:`Corpus`.
  """
  start = time.perf_counter()
  tok = load_tokenizer(tokenizer)
  cache = None
  if use_cache:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()

  if isinstance(data, str) and data.startswith("hf:"):
    train, evals, train_names, eval_names, hit = _load_hf_corpus(
        data[3:], tok, eval_fraction=eval_fraction,
        max_train_bytes=max_train_bytes, max_eval_bytes=max_eval_bytes,
        max_files=max_files, split=hf_split, text_column=text_column,
        cache_dir=cache)
    source = data
  else:
    if data is None or (isinstance(data, str) and data == "stdlib"):
      docs = stdlib_documents()
      source = f"stdlib:{stdlib_dir()}"
    else:
      docs = local_documents(data)
      source = f"files:{data}"
    if not docs:
      raise FileNotFoundError(f"No documents found for {source}.")
    if len(docs) == 1:
      train_idx, eval_idx = [0], []  # split by tokens below instead
    else:
      train_idx, eval_idx = split_documents(
          [d.name for d in docs], eval_fraction)
    train_docs = cap_documents([docs[i] for i in train_idx],
                               max_bytes=max_train_bytes, max_files=max_files)
    eval_docs = cap_documents([docs[i] for i in eval_idx],
                              max_bytes=max_eval_bytes)
    train, hit_t = _tokenize_documents_cached(
        train_docs, tok, cache, max_train_bytes)
    evals, hit_e = _tokenize_documents_cached(
        eval_docs, tok, cache, max_eval_bytes)
    hit = hit_t and hit_e
    train_names = [d.name for d in train_docs]
    eval_names = [d.name for d in eval_docs]
    if eval_fraction > 0 and not eval_docs and len(train) > 1:
      # One document cannot be split by file: hold out its tail instead.
      cut = len(train) - max(1, int(round(len(train) * eval_fraction)))
      train, evals = train[:cut], train[cut:]
      eval_names = [f"{n} (last {eval_fraction:.0%} of tokens)"
                    for n in train_names]
      logger.warning("Single document: holding out the tail of %s for eval.",
                     train_names)

  return Corpus(
      train_tokens=train,
      eval_tokens=evals,
      train_documents=train_names,
      eval_documents=eval_names,
      tokenizer=tok,
      vocab_size=len(tok),
      eos_id=_eos_id(tok),
      source=source,
      seconds=time.perf_counter() - start,
      from_cache=hit,
  )


# ---------------------------------------------------------------------------
# Packing and batching
# ---------------------------------------------------------------------------


def num_sequences(num_tokens: int, seq_len: int) -> int:
  """Number of ``seq_len + 1``-token windows at stride ``seq_len``.

  Args:
    num_tokens: length of the token stream.
    seq_len: model sequence length.

  Returns:
    The number of full windows (the remainder is dropped).
  """
  return max(0, (num_tokens - 1) // seq_len)


def sequences(
    tokens: np.ndarray, seq_len: int, indices: np.ndarray
) -> np.ndarray:
  """Gathers packed windows from a token stream.

  Window ``i`` is ``tokens[i * seq_len : i * seq_len + seq_len + 1]``:
  consecutive windows share one token, the last target of one being the
  first input of the next.

  Args:
    tokens: 1-D token stream.
    seq_len: model sequence length.
    indices: int window indices, shape ``[n]``.

  Returns:
    int32 ``[n, seq_len + 1]``.
  """
  starts = np.asarray(indices, dtype=np.int64)[:, None] * seq_len
  return np.asarray(tokens[starts + np.arange(seq_len + 1)], dtype=np.int32)


def _to_batch(windows: np.ndarray) -> dict[str, np.ndarray]:
  return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}


class TrainBatches:
  """Shuffled training batches that are a pure function of ``(seed, step)``.

  Each epoch visits every full window once in the order of
  ``numpy.random.default_rng([seed, epoch]).permutation``; the windows that
  do not fill a last batch are skipped for that epoch (a different set
  each epoch, since the order changes).
  """

  def __init__(
      self,
      tokens: np.ndarray,
      *,
      seq_len: int,
      batch_size: int,
      seed: int = 0,
  ):
    """Creates the batcher.

    Args:
      tokens: 1-D training token stream.
      seq_len: model sequence length.
      batch_size: sequences per batch.
      seed: shuffling seed.

    Raises:
      ValueError: if the stream holds fewer than ``batch_size`` windows.
    """
    self.tokens = tokens
    self.seq_len = int(seq_len)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.num_sequences = num_sequences(len(tokens), self.seq_len)
    self.steps_per_epoch = self.num_sequences // self.batch_size
    self._permutations: dict[int, np.ndarray] = {}
    if self.steps_per_epoch == 0:
      raise ValueError(
          f"{len(tokens)} tokens make {self.num_sequences} sequences of "
          f"{self.seq_len + 1} tokens, fewer than one batch of "
          f"{self.batch_size}.")

  def permutation(self, epoch: int) -> np.ndarray:
    """The window order of an epoch.

    Args:
      epoch: epoch number.

    Returns:
      A permutation of ``range(num_sequences)``.
    """
    epoch = int(epoch)
    if epoch not in self._permutations:
      # Keep only the current epoch's order (plus the new one): resuming
      # or evaluating never needs more, and a large corpus has long ones.
      if len(self._permutations) >= 2:
        self._permutations.pop(next(iter(self._permutations)))
      rng = np.random.default_rng([self.seed, epoch])
      self._permutations[epoch] = rng.permutation(self.num_sequences)
    return self._permutations[epoch]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch of a global step.

    Args:
      step: 0-based global step; epochs follow one another.

    Returns:
      ``{"input_ids", "labels"}``, int32 ``[batch_size, seq_len]``.
    """
    epoch, k = divmod(int(step), self.steps_per_epoch)
    start = k * self.batch_size
    idx = self.permutation(epoch)[start:start + self.batch_size]
    return _to_batch(sequences(self.tokens, self.seq_len, idx))

  def iterate(
      self, start_step: int = 0, num_steps: int | None = None
  ) -> Iterator[dict[str, np.ndarray]]:
    """Yields batches from ``start_step`` on (to resume a run exactly).

    Args:
      start_step: first global step.
      num_steps: how many batches; ``None`` for an endless stream.

    Yields:
      The batches of steps ``start_step, start_step + 1, ...``.
    """
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      yield self.batch(step)
      step += 1

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.iterate()


def eval_batches(
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int | None = None,
) -> list[dict[str, np.ndarray]]:
  """Fixed eval batches: the stream's first windows, in order.

  Args:
    tokens: 1-D eval token stream.
    seq_len: model sequence length.
    batch_size: sequences per batch.
    num_batches: how many batches (``None``: every full batch). Fewer are
      returned when the stream is too short.

  Returns:
    A list of ``{"input_ids", "labels"}`` int32 ``[batch_size, seq_len]``.

  Raises:
    ValueError: if the stream does not fill a single batch.
  """
  available = num_sequences(len(tokens), seq_len) // batch_size
  if available == 0:
    raise ValueError(
        f"The eval stream ({len(tokens)} tokens) does not fill one batch of "
        f"{batch_size} x {seq_len + 1} tokens; lower the batch size or "
        "seq_len, or raise eval_fraction.")
  n = available if num_batches is None else min(num_batches, available)
  windows = sequences(tokens, seq_len, np.arange(n * batch_size))
  return [_to_batch(w) for w in np.split(windows, n)]


# ---------------------------------------------------------------------------
# Command line: corpus statistics and timing
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
  """Prints corpus statistics and timings (``python -m examples.data``)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--data", nargs="*", default=None,
      help="stdlib (default), hf:NAME[:CONFIG], files or globs")
  parser.add_argument(
      "--tokenizer", default=None,
      help="byt5 (default) or a local tokenizer directory")
  parser.add_argument("--eval-fraction", type=float, default=0.02)
  parser.add_argument("--max-train-bytes", type=int, default=None)
  parser.add_argument("--max-files", type=int, default=None)
  parser.add_argument("--cache-dir", default=None)
  parser.add_argument("--no-cache", action="store_true")
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=16)
  args = parser.parse_args(argv)
  data = args.data[0] if args.data and len(args.data) == 1 else args.data
  corpus = load_corpus(
      data, tokenizer=args.tokenizer, eval_fraction=args.eval_fraction,
      max_train_bytes=args.max_train_bytes, max_files=args.max_files,
      cache_dir=args.cache_dir, use_cache=not args.no_cache,
  )
  batches = corpus.train_batches(
      seq_len=args.seq_len, batch_size=args.batch_size)
  print(f"source: {corpus.source}")
  print(f"documents: {len(corpus.train_documents)} train, "
        f"{len(corpus.eval_documents)} eval")
  print(f"tokens: {len(corpus.train_tokens):,} train, "
        f"{len(corpus.eval_tokens):,} eval "
        f"(vocab {corpus.vocab_size}, eos {corpus.eos_id})")
  how = "loaded from cache" if corpus.from_cache else "tokenised"
  print(f"{how} in {corpus.seconds:.2f} s")
  print(f"seq_len {args.seq_len}: {batches.num_sequences:,} train sequences, "
        f"{batches.steps_per_epoch:,} steps/epoch at batch {args.batch_size}")


if __name__ == "__main__":
  main()
