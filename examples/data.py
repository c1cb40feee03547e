"""Offline text data for the GaLore examples: corpus, tokens, ``grain`` batches.

The Python standard library's own sources by default (no download), or local
files, or ``"hf:NAME[:CONFIG]"``; split by a hash of document names, tokenised
(ByT5's bytes + 3 by default; cached as ``.npy``) with an EOS after each
document, cut into ``seq_len + 1``-token windows at stride ``seq_len``. Step
``k``'s batch is element ``k`` of a seeded ``grain`` dataset reshuffled each
epoch (so a resumed run is exact); process ``p`` of ``P`` takes rows
``[p B/P, (p+1) B/P)`` of each global batch of ``B``: one process's batch.
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
    "__pycache__", "encodings", "pydoc_data", "lib-dynload"})
_GENERATED_PREFIXES = ("_sysconfigdata",)


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

  def read_text(self, max_bytes: int | None = None) -> str:
    """The file as UTF-8 (bad bytes replaced); if over ``max_bytes``, cut."""
    text = self.path.read_bytes().decode("utf-8", errors="replace")
    if max_bytes is None or self.size <= max_bytes:
      return text
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def stdlib_documents(root: str | os.PathLike | None = None) -> list[Document]:
  """The ``.py`` files of the stdlib at ``root`` (default: this Python's)."""
  root = Path(root or sysconfig.get_paths()["stdlib"])
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Pruned in place; `config-3.x-<platform>` holds build files.
    dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS
                   and not d.startswith("config-")]
    docs += [Document.from_path(Path(dirpath) / f, root) for f in filenames
             if f.endswith(".py") and not f.startswith(_GENERATED_PREFIXES)]
  return sorted(docs, key=lambda d: d.name)


def local_documents(patterns: str | os.PathLike | Sequence[str | os.PathLike]
                    ) -> list[Document]:
  """Non-hidden text files of paths or globs (and under directories), by name.

  Documents are named relative to the deepest directory common to all.
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
      if b"\0" not in fh.read(8192):  # else binary
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
  """``(train, eval)`` indices: eval if a name's hash is below the fraction."""
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
  hashes = [_unit_hash(n) for n in names]
  is_eval = [h < eval_fraction for h in hashes]
  if eval_fraction > 0 and len(names) >= 2:  # the closest to an empty side
    if not any(is_eval):
      is_eval[min(range(len(names)), key=hashes.__getitem__)] = True
    elif all(is_eval):
      is_eval[max(range(len(names)), key=hashes.__getitem__)] = False
  return ([i for i, e in enumerate(is_eval) if not e],
          [i for i, e in enumerate(is_eval) if e])


def cap_documents(docs: Sequence[Document], *, max_bytes: int | None = None,
                  max_files: int | None = None) -> list[Document]:
  """The documents that fit the caps, taken in hash order, sorted by name."""
  if max_bytes is None and max_files is None:
    return list(docs)
  kept, total = [], 0
  # Hash order samples the whole corpus, not just its first directory.
  for d in sorted(docs, key=lambda d: (_unit_hash(d.name), d.name)):
    if max_files is not None and len(kept) >= max_files:
      break
    # A first document over max_bytes is kept alone (and cut when read).
    if max_bytes is None or total + d.size <= max_bytes or not kept:
      kept.append(d)
      total += d.size
  return sorted(kept, key=lambda d: d.name)


def load_tokenizer(tokenizer: Any = None) -> Any:
  """ByT5's for None or "byt5", a local directory's (offline), or itself."""
  import transformers  # heavy import, only when tokenising
  if tokenizer is None or (
      isinstance(tokenizer, str) and tokenizer.lower() == "byt5"):
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
  """ByT5's uint16 ids of ``text`` (``split_special_tokens=True``), by numpy."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(
      np.uint16) + 3


def encode_documents(texts: Iterable[str], tokenizer: Any, *,
                     batch_size: int = 64) -> np.ndarray:
  """One stream of ``texts``' ids, an EOS after each (uint16 if it fits)."""
  dtype = np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.int32)
  eos = np.array([_eos_id(tokenizer)], dtype=dtype)
  if is_byt5(tokenizer):
    ids: Iterable[Any] = map(byt5_encode, texts)
  else:  # verbose=False: documents may exceed model_max_length
    texts = list(texts)
    ids = (seq for i in range(0, len(texts), batch_size) for seq in tokenizer(
        texts[i:i + batch_size], add_special_tokens=False, verbose=False)[
            "input_ids"])
  pieces = [p for seq in ids for p in (np.asarray(seq, dtype=dtype), eos)]
  return np.concatenate(pieces) if pieces else np.zeros((0,), dtype=dtype)


def default_cache_dir() -> Path:
  """``$GALORE_OPTAX_CACHE/data``, else ``~/.cache/galore_optax/data``."""
  base = os.environ.get("GALORE_OPTAX_CACHE") or "~/.cache/galore_optax"
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


def _stream_hf_texts(spec: str, split: str, column: str, eval_fraction: float,
                     max_train_bytes: int | None, max_eval_bytes: int | None,
                     max_files: int | None) -> tuple[list[str], list[str]]:
  """``(train texts, eval texts)`` streamed from a ``datasets`` dataset."""
  try:
    import datasets  # noqa: PLC0415  (optional dependency, imported lazily)
  except ImportError as e:
    raise ImportError("Loading a Hugging Face dataset ('hf:...') needs the "
                      "optional `datasets` package: pip install datasets (and "
                      "network access); local files and stdlib don't.") from e
  name, _, config = spec.partition(":")
  # Streaming reads only as many rows as the caps need (C4 is ~300 GB).
  rows = datasets.load_dataset(name, config or None, split=split,
                               streaming=True)
  if max_eval_bytes is None and max_train_bytes is not None and eval_fraction:
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
    data: None or "stdlib", "hf:NAME[:CONFIG]", or local paths or globs.
    tokenizer: see :func:`load_tokenizer` (default ByT5).
    eval_fraction: documents held out (of a lone file: its last tokens).
    max_train_bytes, max_eval_bytes, max_files: caps (:func:`cap_documents`).
    cache_dir: the token cache (default :func:`default_cache_dir`).
    use_cache: False to neither read nor write the cache.
    hf_split, text_column: the split and text column of an ``hf:`` dataset.

  Returns:
    The :class:`Corpus`.
  """
  start = time.perf_counter()
  tok = load_tokenizer(tokenizer)
  cache = Path(cache_dir or default_cache_dir()) if use_cache else None
  if isinstance(data, str) and data.startswith("hf:"):
    spec, source = data[3:], data
    name, _, config = spec.partition(":")
    key = {"hf": name, "config": config or None, "split": hf_split,
           "column": text_column, "eval_fraction": eval_fraction,
           "max_train_bytes": max_train_bytes, "max_eval_bytes": max_eval_bytes,
           "max_files": max_files, "tokenizer": tokenizer_id(tok)}
    texts = functools.cache(lambda: _stream_hf_texts(  # on a cache miss only
        spec, hf_split, text_column, eval_fraction, max_train_bytes,
        max_eval_bytes, max_files))
    parts = [(dict(key, part="train"), lambda: texts()[0]),
             (dict(key, part="eval"), lambda: texts()[1])]
    names = [spec], [spec]
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
    parts = []
    for part, cap in ((train_docs, max_train_bytes),
                      (eval_docs, max_eval_bytes)):
      key = {"tokenizer": tokenizer_id(tok), "max_bytes": cap,
             "docs": [(d.name, os.fspath(d.path), d.size, d.mtime_ns)
                      for d in part]}
      # Only a lone over-sized document (see cap_documents) is cut to the cap.
      parts.append((key, lambda part=part, cap=cap: (
          d.read_text(cap) for d in part)))
    names = [d.name for d in train_docs], [d.name for d in eval_docs]
  (train, hit_t), (evals, hit_e) = (_cached_array(
      key, lambda read=read: encode_documents(read(), tok), cache)
      for key, read in parts)
  train_names, eval_names = names
  if eval_fraction > 0 and not eval_names and len(train) > 1:
    # One document cannot be split by file: its tail is held out.
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
  """int32 ``[n, seq_len + 1]``: windows ``indices`` (``[n]``) of ``tokens``."""
  # Window i starts at i * seq_len: each token is a target once.
  starts = np.asarray(indices, dtype=np.int64)[:, None] * seq_len
  return np.asarray(tokens[starts + np.arange(seq_len + 1)], dtype=np.int32)


def window_dataset(tokens: np.ndarray, seq_len: int) -> grain.MapDataset:
  """The :func:`sequences` of ``tokens``, in order, as a ``grain`` dataset."""
  return grain.MapDataset.range(num_sequences(len(tokens), seq_len)).map(
      lambda i: sequences(tokens, seq_len, np.array([i]))[0])


def process_batches(windows: grain.MapDataset, batch_size: int,
                    process_index: int, process_count: int) -> grain.MapDataset:
  """Element ``k``: process p's rows ``[pb, (p+1)b)`` of global batch ``k``."""
  if batch_size % process_count:
    raise ValueError(f"The batch size {batch_size} must be a multiple of the "
                     f"number of processes, {process_count}.")
  # b = batch_size / P. Global batch k is per-process batches kP ... kP + P - 1
  # in order: grain's strided slice is the per-process shard.
  local = windows.batch(batch_size // process_count, drop_remainder=True)
  return local[process_index::process_count].map(
      lambda w: {"input_ids": w[:, :-1], "labels": w[:, 1:]})


class TrainBatches:
  """Shuffled training batches, a pure function of ``(seed, step)``.

  Each epoch is a new seeded ``grain`` shuffle of the windows, less those not
  filling a last global batch. ``dataset[k]`` is step ``k``'s batch.
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
    windows = window_dataset(tokens, int(seq_len))
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
    return iter(self.dataset[start_step:stop].to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int,
                 num_batches: int | None = None, process_index: int = 0,
                 process_count: int = 1) -> list[Batch]:
  """This process's rows of the first ``num_batches`` (or all) batches."""
  windows = window_dataset(tokens, seq_len)
  n = len(windows) // batch_size
  if n == 0:
    raise ValueError(f"The eval stream ({len(tokens)} tokens) does not fill "
                     f"one batch of {batch_size} x {seq_len + 1} tokens; lower "
                     "the batch size or seq_len, or raise eval_fraction.")
  n = n if num_batches is None else min(num_batches, n)
  batches = process_batches(windows[:n * batch_size], batch_size,
                            process_index, process_count)
  return [batches[k] for k in range(n)]


@dataclasses.dataclass
class Corpus:
  """Tokenised train and eval streams, their documents, the tokenizer."""

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
