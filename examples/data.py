"""Offline text data for the GaLore examples: corpus, tokens, ``grain`` batches.

The default corpus is the Python standard library's own ``.py`` sources
(about 10 MB without tests): no download. Also local files, directories or
globs (a document per file), or ``"hf:NAME[:CONFIG]"``, a streamed Hugging
Face dataset (needs ``datasets``). Documents go to train or eval by a stable
hash of their names. Tokens are ``ByT5Tokenizer``'s (UTF-8 bytes + 3, with
numpy) unless a local tokenizer directory is given; documents are joined with
an EOS after each and cut into windows of ``seq_len + 1`` tokens at stride
``seq_len`` (inputs ``[:-1]``, labels ``[1:]``). Token arrays are cached as
``.npy`` files under :func:`default_cache_dir`.

Batches are ``grain``'s: the windows are a random-access source, each epoch a
new seeded shuffle, and step ``k``'s batch is element ``k`` of the batched
dataset, a pure function of ``(seed, k)``, so a resumed run is exact. Of ``P``
processes, process ``p`` takes rows ``[p B/P, (p+1) B/P)`` of each global
batch of ``B``: together they feed the batch a single process would.
"""

from __future__ import annotations

import dataclasses
import functools
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

import grain
import numpy as np

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

# Bump when the cached array format or the tokenisation rules change.
_CACHE_VERSION = 1

# Skipped in the stdlib corpus: test suites, third-party packages, IDLE, and
# mostly generated tables (codecs, pydoc's topics, the sysconfig dump).
STDLIB_EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages",
    "__pycache__", "encodings", "pydoc_data", "lib-dynload",
})
_STDLIB_EXCLUDED_PREFIXES = ("_sysconfigdata",)


@dataclasses.dataclass(frozen=True)
class Document:
  """A file of a corpus; ``name``, relative to its root, decides its split."""

  name: str
  path: Path
  size: int  # from stat, for caps and cache keys
  mtime_ns: int  # so that an edited file invalidates the cache

  @classmethod
  def from_path(cls, path: Path, root: Path) -> Document:
    """The document of file ``path``, named relative to directory ``root``."""
    st = path.stat()
    return cls(path.relative_to(root).as_posix(), path, st.st_size,
               st.st_mtime_ns)

  def read_text(self) -> str:
    """The file as UTF-8, undecodable bytes replaced."""
    return self.path.read_bytes().decode("utf-8", errors="replace")


def stdlib_documents(root: str | os.PathLike | None = None) -> list[Document]:
  """The ``.py`` files of the stdlib at ``root`` (default: this Python's)."""
  root = Path(root or sysconfig.get_paths()["stdlib"])
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Pruned in place so os.walk skips excluded trees; `config-3.x-<platform>`
    # holds build files.
    dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS
                   and not d.startswith("config-")]
    docs += [Document.from_path(Path(dirpath) / f, root) for f in filenames
             if f.endswith(".py")
             and not f.startswith(_STDLIB_EXCLUDED_PREFIXES)]
  return sorted(docs, key=lambda d: d.name)


def local_documents(
    patterns: str | os.PathLike | Sequence[str | os.PathLike],
) -> list[Document]:
  """Text files of ``patterns`` (paths, globs, directories: what's under them).

  Hidden and binary files under a directory are skipped; documents are named
  relative to the deepest common directory and sorted by name.
  """
  if isinstance(patterns, str | os.PathLike):
    patterns = [patterns]
  paths: set[Path] = set()
  for pattern in patterns:
    pattern = os.path.expanduser(os.fspath(pattern))
    matches = [Path(p) for p in glob.glob(pattern, recursive=True)]
    if not matches:
      raise FileNotFoundError(f"No local file matches {pattern!r}.")
    for m in matches:
      paths.update(p.resolve() for p in (m.rglob("*") if m.is_dir() else [m])
                   if p.is_file() and not any(
                       part.startswith(".") for part in p.relative_to(m).parts))
  files = []
  for p in sorted(paths):
    with open(p, "rb") as fh:
      is_binary = b"\0" in fh.read(8192)
    if is_binary:
      logger.info("Skipping binary file %s", p)
    else:
      files.append(p)
  if not files:
    raise FileNotFoundError(
        f"No text files found in {list(map(os.fspath, patterns))}.")
  root = Path(os.path.commonpath([p.parent for p in files]))
  return sorted((Document.from_path(p, root) for p in files),
                key=lambda d: d.name)


def _unit_hash(name: str) -> float:
  """A stable, platform-independent number in [0, 1) for a name."""
  digest = hashlib.sha256(name.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(names: Sequence[str], eval_fraction: float = 0.02
                    ) -> tuple[list[int], list[int]]:
  """``(train, eval)`` indices: eval if a name's hash is below the fraction.

  With two or more names and a positive fraction neither side stays empty:
  the closest name moves across.
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
  return ([i for i, e in enumerate(is_eval) if not e],
          [i for i, e in enumerate(is_eval) if e])


def cap_documents(docs: Sequence[Document], *, max_bytes: int | None = None,
                  max_files: int | None = None) -> list[Document]:
  """The documents that fit the caps, taken in hash order, sorted by name.

  Hash order samples the whole corpus, not its first directory. A first
  document over ``max_bytes`` is kept alone (and truncated when read).
  """
  if max_bytes is None and max_files is None:
    return list(docs)
  kept, total = [], 0
  for d in sorted(docs, key=lambda d: (_unit_hash(d.name), d.name)):
    if max_files is not None and len(kept) >= max_files:
      break
    if max_bytes is None or total + d.size <= max_bytes or not kept:
      kept.append(d)
      total += d.size
  return sorted(kept, key=lambda d: d.name)


def load_tokenizer(tokenizer: Any = None) -> Any:
  """``ByT5Tokenizer()`` for None or "byt5", else a local directory's, offline.

  A tokenizer object is returned unchanged.
  """
  import transformers  # heavy import, only when tokenising

  if tokenizer is None or str(tokenizer).lower() == "byt5":
    return transformers.ByT5Tokenizer()
  if not isinstance(tokenizer, str | os.PathLike):
    return tokenizer
  path = os.path.expanduser(os.fspath(tokenizer))
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"Tokenizer {path!r} is not a local directory. This loader never "
        "downloads: save the tokenizer with save_pretrained() somewhere "
        "local and pass that directory, or use 'byt5'.")
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def is_byt5(tokenizer: Any) -> bool:
  """Whether ``tokenizer`` is ByT5's byte tokenizer (id = byte + 3)."""
  import transformers

  return (isinstance(tokenizer, transformers.ByT5Tokenizer)
          and getattr(tokenizer, "offset", None) == 3)


def tokenizer_id(tokenizer: Any) -> str:
  """Names a tokenizer's behaviour (and its files' hash), for cache keys."""
  if is_byt5(tokenizer):
    return "byt5"
  path = getattr(tokenizer, "name_or_path", "")
  if path and os.path.isdir(path):
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file()):
      h.update(f.name.encode())
      h.update(f.read_bytes())
    path = h.hexdigest()[:16]
  return ":".join([type(tokenizer).__name__, str(len(tokenizer)), str(path)])


def _eos_id(tokenizer: Any) -> int:
  for attr in ("eos_token_id", "sep_token_id"):
    if getattr(tokenizer, attr, None) is not None:
      return int(getattr(tokenizer, attr))
  raise ValueError("The tokenizer has no eos_token_id (nor sep_token_id) to "
                   "separate documents.")


def byt5_encode(text: str) -> np.ndarray:
  """ByT5's uint16 ids of ``text``, one per UTF-8 byte, with numpy.

  As ``ByT5Tokenizer()(text, add_special_tokens=False, split_special_tokens=
  True).input_ids``: a literal ``"</s>"`` in training text stays bytes.
  """
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(
      np.uint16) + 3


def encode_documents(texts: Iterable[str], tokenizer: Any, *,
                     batch_size: int = 64) -> np.ndarray:
  """One stream of ``texts``' ids, an EOS after each, ``batch_size`` per call.

  uint16 when the vocabulary fits (half the cache and memory), else int32.
  """
  dtype = np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.int32)
  eos = np.array([_eos_id(tokenizer)], dtype=dtype)
  if is_byt5(tokenizer):
    ids: Iterable[Any] = map(byt5_encode, texts)
  else:  # verbose=False: documents may exceed model_max_length
    texts = list(texts)
    ids = (seq for start in range(0, len(texts), batch_size)
           for seq in tokenizer(texts[start:start + batch_size],
                                add_special_tokens=False,
                                verbose=False)["input_ids"])
  pieces = [p for seq in ids for p in (np.asarray(seq, dtype=dtype), eos)]
  return np.concatenate(pieces) if pieces else np.zeros((0,), dtype=dtype)


def default_cache_dir() -> Path:
  """``$GALORE_OPTAX_CACHE/data``, else ``~/.cache/galore_optax/data``."""
  base = os.environ.get("GALORE_OPTAX_CACHE") or os.path.join(
      "~", ".cache", "galore_optax")
  return Path(os.path.expanduser(base)) / "data"


def _cached_array(key_payload: Any, compute: Any,
                  cache_dir: Path | None) -> tuple[np.ndarray, bool]:
  """``(array, hit)``: the array cached under a JSON key, or ``compute()``."""
  if cache_dir is None:
    return compute(), False
  blob = json.dumps([_CACHE_VERSION, key_payload], sort_keys=True, default=str)
  key = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]
  path = Path(cache_dir) / f"tokens-{key}.npy"
  if path.exists():
    try:
      return np.load(path), True
    except (OSError, ValueError):
      logger.warning("Ignoring unreadable cache file %s", path)
  arr = compute()
  path.parent.mkdir(parents=True, exist_ok=True)
  # Write then rename: a crash or a concurrent run never leaves a truncated
  # file that a later run would trust.
  tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
  np.save(tmp, arr)
  os.replace(tmp, path)
  return arr, False


def _tokenize_documents_cached(
    docs: Sequence[Document], tokenizer: Any, cache_dir: Path | None,
    max_bytes: int | None) -> tuple[np.ndarray, bool]:
  def text(d: Document) -> str:
    # Only a lone over-sized document (see cap_documents) is truncated.
    if max_bytes is None or d.size <= max_bytes:
      return d.read_text()
    head = d.read_text().encode("utf-8")[:max_bytes]
    return head.decode("utf-8", errors="ignore")

  payload = {
      "tokenizer": tokenizer_id(tokenizer),
      "docs": [(d.name, os.fspath(d.path), d.size, d.mtime_ns) for d in docs],
      "max_bytes": max_bytes,
  }
  return _cached_array(
      payload, lambda: encode_documents(map(text, docs), tokenizer), cache_dir)


def _stream_hf_texts(spec: str, split: str, column: str, eval_fraction: float,
                     max_train_bytes: int | None, max_eval_bytes: int | None,
                     max_files: int | None) -> tuple[list[str], list[str]]:
  """``(train texts, eval texts)`` streamed from a ``datasets`` dataset."""
  try:
    import datasets  # noqa: PLC0415  (optional dependency, imported lazily)
  except ImportError as e:
    raise ImportError(
        "Loading a Hugging Face dataset ('hf:...') needs the optional "
        "`datasets` package: pip install datasets (and network access). "
        "Local files and the default stdlib corpus need neither.") from e
  name, _, config = spec.partition(":")
  # Streaming reads only as many rows as the caps need (C4 is ~300 GB).
  rows = datasets.load_dataset(name, config or None, split=split,
                               streaming=True)
  if max_eval_bytes is None and max_train_bytes is not None and eval_fraction:
    # The eval/train ratio of an uncapped split.
    max_eval_bytes = max(
        1, int(max_train_bytes * (eval_fraction / (1 - eval_fraction))))
  texts, sizes = ([], []), [0, 0]  # train, eval
  for i, row in enumerate(rows):
    full = ((max_train_bytes is not None and sizes[0] >= max_train_bytes)
            or (max_files is not None and len(texts[0]) >= max_files),
            eval_fraction == 0 or (max_eval_bytes is not None
                                   and sizes[1] >= max_eval_bytes))
    if all(full):
      break
    # A row's side depends on its index only, never on the caps.
    side = int(_unit_hash(f"{spec}:{split}:{i}") < eval_fraction)
    if not full[side]:
      texts[side].append(row[column])
      sizes[side] += len(row[column].encode("utf-8"))
  return texts


def load_corpus(
    data: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
    tokenizer: Any = None, eval_fraction: float = 0.02,
    max_train_bytes: int | None = None, max_eval_bytes: int | None = None,
    max_files: int | None = None, cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True, hf_split: str = "train",
    text_column: str = "text") -> Corpus:
  """Loads, splits and tokenises a corpus (or loads its cached tokens).

  Args:
    data: ``None`` or ``"stdlib"``, ``"hf:NAME[:CONFIG]"``, or local files,
      directories or glob patterns (a string or a list).
    tokenizer: see :func:`load_tokenizer` (default ByT5).
    eval_fraction: fraction of documents held out (of a single file's tokens).
    max_train_bytes: cap on the training text (see :func:`cap_documents`).
    max_eval_bytes: cap on the eval text.
    max_files: cap on the number of training documents.
    cache_dir: the token cache (default :func:`default_cache_dir`).
    use_cache: False to neither read nor write the cache.
    hf_split: the split of an ``hf:`` dataset.
    text_column: the text column of an ``hf:`` dataset.

  Returns:
    The :class:`Corpus`.
  """
  start = time.perf_counter()
  tok = load_tokenizer(tokenizer)
  cache = None
  if use_cache:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  if isinstance(data, str) and data.startswith("hf:"):
    spec = data[3:]
    name, _, config = spec.partition(":")
    key = {"hf": name, "config": config or None, "split": hf_split,
           "column": text_column, "eval_fraction": eval_fraction,
           "max_train_bytes": max_train_bytes, "max_eval_bytes": max_eval_bytes,
           "max_files": max_files, "tokenizer": tokenizer_id(tok)}
    texts = functools.cache(lambda: _stream_hf_texts(  # on a cache miss only
        spec, hf_split, text_column, eval_fraction, max_train_bytes,
        max_eval_bytes, max_files))
    train, hit_t = _cached_array(dict(key, part="train"), lambda: (
        encode_documents(texts()[0], tok)), cache)
    evals, hit_e = _cached_array(dict(key, part="eval"), lambda: (
        encode_documents(texts()[1], tok)), cache)
    source, train_names, eval_names = data, [spec], [spec]
  else:
    if data is None or data == "stdlib":
      docs = stdlib_documents()
      source = "stdlib:" + sysconfig.get_paths()["stdlib"]
    else:
      docs, source = local_documents(data), f"files:{data}"
    # A single document is split by tokens below.
    train_idx, eval_idx = ([0], []) if len(docs) == 1 else split_documents(
        [d.name for d in docs], eval_fraction)
    train_docs = cap_documents([docs[i] for i in train_idx],
                               max_bytes=max_train_bytes, max_files=max_files)
    eval_docs = cap_documents([docs[i] for i in eval_idx],
                              max_bytes=max_eval_bytes)
    train, hit_t = _tokenize_documents_cached(
        train_docs, tok, cache, max_train_bytes)
    evals, hit_e = _tokenize_documents_cached(
        eval_docs, tok, cache, max_eval_bytes)
    train_names = [d.name for d in train_docs]
    eval_names = [d.name for d in eval_docs]
    if eval_fraction > 0 and not eval_docs and len(train) > 1:
      cut = len(train) - max(1, int(round(len(train) * eval_fraction)))
      train, evals = train[:cut], train[cut:]
      eval_names = [f"{n} (last {eval_fraction:.0%} of tokens)"
                    for n in train_names]
      logger.warning("Single document: holding out the tail of %s for eval.",
                     train_names)
  return Corpus(train, evals, train_names, eval_names, tok, len(tok),
                _eos_id(tok), source, time.perf_counter() - start,
                hit_t and hit_e)


def num_sequences(num_tokens: int, seq_len: int) -> int:
  """Number of full ``seq_len + 1``-token windows at stride ``seq_len``."""
  return max(0, (num_tokens - 1) // seq_len)


def sequences(tokens: np.ndarray, seq_len: int,
              indices: np.ndarray) -> np.ndarray:
  """int32 ``[n, seq_len + 1]``: the windows ``indices`` (``[n]``) of tokens.

  Window ``i`` is ``tokens[i * seq_len : (i + 1) * seq_len + 1]``: its last
  target is the next window's first input, so each token is a target once.
  """
  starts = np.asarray(indices, dtype=np.int64)[:, None] * seq_len
  return np.asarray(tokens[starts + np.arange(seq_len + 1)], dtype=np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class PackedWindows:
  """A ``grain`` random-access source: the :func:`sequences` of ``tokens``."""

  tokens: np.ndarray
  seq_len: int

  def __len__(self) -> int:
    return num_sequences(len(self.tokens), self.seq_len)

  def __getitem__(self, index: int) -> np.ndarray:
    return sequences(self.tokens, self.seq_len, np.array([index]))[0]


def process_batches(windows: grain.MapDataset, batch_size: int,
                    process_index: int, process_count: int) -> grain.MapDataset:
  """Element ``k``: this process's rows of the ``k``-th global batch.

  Process ``p`` of ``P`` gets rows ``[p b, (p + 1) b)``, ``b = batch_size /
  P``, of each batch of ``windows`` (as many as whole batches), as int32
  ``{"input_ids", "labels"}``.
  """
  if batch_size % process_count:
    raise ValueError(f"The batch size {batch_size} must be a multiple of the "
                     f"number of processes, {process_count}.")
  # Global batch k is per-process batches kP ... kP + P - 1 in order: grain's
  # strided slice is the per-process shard.
  local = windows.batch(batch_size // process_count, drop_remainder=True)
  return local[process_index::process_count].map(
      lambda w: {"input_ids": w[:, :-1], "labels": w[:, 1:]})


class TrainBatches:
  """Shuffled training batches, a pure function of ``(seed, step)``.

  An epoch is a new seeded ``grain`` shuffle of the windows; those that do
  not fill a last global batch are skipped (a different set each epoch).
  ``dataset`` is the ``grain.MapDataset`` of :func:`process_batches`: its
  element ``k`` is global step ``k``'s.
  """

  def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int,
               seed: int = 0, process_index: int = 0, process_count: int = 1):
    """Batches of ``batch_size`` windows of ``tokens`` (this process's part).

    Args:
      tokens: 1-D training token stream.
      seq_len: model sequence length.
      batch_size: sequences per global batch.
      seed: shuffling seed.
      process_index: this process, in ``range(process_count)``.
      process_count: the processes sharing each global batch.
    """
    windows = grain.MapDataset.source(PackedWindows(tokens, int(seq_len)))
    self.num_sequences = len(windows)
    self.steps_per_epoch = self.num_sequences // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(
          f"{len(tokens)} tokens make {self.num_sequences} sequences of "
          f"{seq_len + 1} tokens, fewer than one batch of {batch_size}.")
    # A grain MapDataset indexed past its length goes on with the next epoch,
    # for which shuffle draws a new order.
    epoch = windows.seed(int(seed)).shuffle()[
        :self.steps_per_epoch * batch_size]
    self.dataset = process_batches(
        epoch, batch_size, process_index, process_count).repeat()

  def batch(self, step: int) -> Batch:
    """This process's ``[batch_size / processes, seq_len]`` part of a step."""
    return self.dataset[int(step)]

  def iterate(self, start_step: int = 0,
              num_steps: int | None = None) -> Iterator[Batch]:
    """Batches of steps ``start_step, ...`` (all if ``num_steps`` is None)."""
    stop = None if num_steps is None else start_step + num_steps
    options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    return iter(self.dataset[start_step:stop].to_iter_dataset(options))


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int,
                 num_batches: int | None = None, process_index: int = 0,
                 process_count: int = 1) -> list[Batch]:
  """The first ``num_batches`` (default all) batches of windows, in order.

  Only this process's rows of each, as :func:`process_batches`.
  """
  windows = grain.MapDataset.source(PackedWindows(tokens, seq_len))
  n = len(windows) // batch_size
  if n == 0:
    raise ValueError(
        f"The eval stream ({len(tokens)} tokens) does not fill one batch of "
        f"{batch_size} x {seq_len + 1} tokens; lower the batch size or "
        "seq_len, or raise eval_fraction.")
  n = n if num_batches is None else min(num_batches, n)
  batches = process_batches(windows[:n * batch_size], batch_size,
                            process_index, process_count)
  return [batches[k] for k in range(n)]


@dataclasses.dataclass
class Corpus:
  """Tokenised train and eval streams, their documents' names, the tokenizer.

  ``vocab_size`` is ``len(tokenizer)``, ``eos_id`` the separator after each
  document, ``seconds`` the time to read and tokenise (or load the cache).
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
  from_cache: bool = False  # both streams

  def train_batches(self, **kwargs: Any) -> TrainBatches:
    """:class:`TrainBatches` of ``train_tokens``, ``kwargs`` as there."""
    return TrainBatches(self.train_tokens, **kwargs)

  def eval_batches(self, **kwargs: Any) -> list[Batch]:
    """:func:`eval_batches` of ``eval_tokens``, ``kwargs`` as there."""
    return eval_batches(self.eval_tokens, **kwargs)
