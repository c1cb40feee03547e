"""Tests for the example data pipeline (examples/data.py). No network needed."""

import os
import sys
import types
from pathlib import Path

import grain
import numpy as np
import pytest
import transformers

from examples import data


@pytest.fixture(scope="module")
def byt5():
  return transformers.ByT5Tokenizer()


@pytest.fixture(scope="module")
def stdlib_docs():
  return data.stdlib_documents()


def test_byt5_fast_path_matches_tokenizer(byt5, stdlib_docs):
  # A few real source files (prefixes: the HF tokenizer runs at ~0.5 MB/s)
  # plus non-ASCII text and the empty string.
  wanted = ("os.py", "json/decoder.py", "difflib.py")
  sample = [d for d in stdlib_docs if d.name in wanted]
  assert len(sample) == 3
  texts = [d.read_text()[:4000] for d in sample]
  texts += ["héllo wörld — ✓ 😀 ñ\n\ttabs\r\n", "", "\x00\x7f"]
  for text in texts:
    want = byt5(text, add_special_tokens=False)["input_ids"]
    assert data.byt5_encode(text).tolist() == want
  # Literal special-token strings stay bytes (split_special_tokens=True).
  literal = "a</s>b<pad>c<unk>"
  want = byt5(literal, add_special_tokens=False, split_special_tokens=True)
  assert data.byt5_encode(literal).tolist() == want["input_ids"]
  # Documents are joined with an EOS after each one.
  stream = data.encode_documents(["ab", "", "c"], byt5)
  assert stream.dtype == np.uint16
  assert stream.tolist() == [100, 101, 1, 1, 102, 1]


def test_stdlib_corpus_and_split_by_file(stdlib_docs):
  names = [d.name for d in stdlib_docs]
  assert names == sorted(names) and len(names) > 300
  assert {"os.py", "json/decoder.py", "asyncio/tasks.py"} <= set(names)
  excluded = {"test", "tests", "idlelib", "site-packages", "encodings"}
  for name in names:
    assert not excluded & set(name.split("/")), name
    assert name.endswith(".py")

  train, evals = data.split_documents(names, 0.02)
  assert not set(train) & set(evals)
  assert sorted(train + evals) == list(range(len(names)))
  assert 0.005 < len(evals) / len(names) < 0.05
  # Deterministic, and a document's side depends on its name only.
  assert data.split_documents(names, 0.02) == (train, evals)
  eval_names = {names[i] for i in evals}
  reordered = names[::-1][: len(names) // 2] + [names[i] for i in evals]
  _, evals2 = data.split_documents(reordered, 0.02)
  assert {reordered[i] for i in evals2} == eval_names


def test_split_keeps_both_sides_nonempty():
  train, evals = data.split_documents(["a", "b"], 0.02)
  assert len(train) == 1 and len(evals) == 1
  assert data.split_documents(["a", "b", "c"], 0.0) == ([0, 1, 2], [])


def test_cap_documents(stdlib_docs):
  capped = data.cap_documents(stdlib_docs, max_bytes=200_000)
  assert sum(d.size for d in capped) <= 200_000 and len(capped) > 3
  assert data.cap_documents(stdlib_docs, max_bytes=200_000) == capped
  # Hash order samples across the library, not just its first directory.
  assert len({d.name.split("/")[0] for d in capped}) > 3
  assert len(data.cap_documents(stdlib_docs, max_files=7)) == 7
  big = max(stdlib_docs, key=lambda d: d.size)
  assert data.cap_documents([big], max_bytes=10) == [big]  # truncated on read


def test_load_corpus_stdlib_capped_and_cached(tmp_path):
  corpus = data.load_corpus(max_train_bytes=150_000, cache_dir=tmp_path)
  assert not corpus.from_cache
  assert corpus.vocab_size == 384 and corpus.eos_id == 1
  assert not set(corpus.train_documents) & set(corpus.eval_documents)
  assert corpus.eval_documents  # ~2% of the library's files
  num_docs = len(corpus.train_documents)
  assert len(corpus.train_tokens) <= 150_000 + num_docs
  assert int((corpus.train_tokens == 1).sum()) == num_docs
  assert corpus.train_tokens[-1] == 1
  assert list(tmp_path.glob("tokens-*.npy"))

  again = data.load_corpus(max_train_bytes=150_000, cache_dir=tmp_path)
  assert again.from_cache
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)
  np.testing.assert_array_equal(again.eval_tokens, corpus.eval_tokens)
  assert again.train_documents == corpus.train_documents

  batches = corpus.eval_batches(seq_len=64, batch_size=4, num_batches=3)
  assert len(batches) == 3 and batches[0]["input_ids"].shape == (4, 64)


def test_packing_lengths_and_shift():
  tokens = np.arange(23, dtype=np.uint16)
  assert data.num_sequences(23, 5) == 4
  windows = data.sequences(tokens, 5, np.arange(4))
  assert windows.shape == (4, 6) and windows.dtype == np.int32
  for i in range(4):  # stride seq_len: each token is a target exactly once
    assert windows[i].tolist() == list(range(5 * i, 5 * i + 6))

  batches = data.eval_batches(tokens, seq_len=5, batch_size=2)
  assert len(batches) == 2
  b = batches[0]
  assert b["input_ids"].shape == b["labels"].shape == (2, 5)
  assert b["input_ids"].dtype == b["labels"].dtype == np.int32
  assert b["input_ids"][0].tolist() == [0, 1, 2, 3, 4]
  assert b["labels"][0].tolist() == [1, 2, 3, 4, 5]
  one = data.eval_batches(tokens, seq_len=5, batch_size=2, num_batches=1)
  assert len(one) == 1
  with pytest.raises(ValueError, match="does not fill one batch"):
    data.eval_batches(tokens, seq_len=5, batch_size=8)
  with pytest.raises(ValueError, match="fewer than one batch"):
    data.TrainBatches(tokens, seq_len=5, batch_size=8)


def test_train_batches_reproducible_and_resumable():
  tokens = np.arange(1001, dtype=np.uint16)  # window i starts with token 8 i
  loader = data.TrainBatches(tokens, seq_len=8, batch_size=4, seed=3)
  assert loader.num_sequences == 125 and loader.steps_per_epoch == 31
  run = list(loader.iterate(num_steps=70))  # crosses two epoch boundaries

  resumed = data.TrainBatches(tokens, seq_len=8, batch_size=4, seed=3)
  for k, batch in zip(range(40, 70), resumed.iterate(start_step=40)):
    np.testing.assert_array_equal(batch["input_ids"], run[k]["input_ids"])
    np.testing.assert_array_equal(batch["labels"], run[k]["labels"])
  np.testing.assert_array_equal(
      resumed.batch(5)["input_ids"], run[5]["input_ids"])

  def starts(batches):
    return [int(s) // 8 for b in batches for s in b["input_ids"][:, 0]]

  epoch0, epoch1 = starts(run[:31]), starts(run[31:62])
  assert len(set(epoch0)) == 124  # no window twice within an epoch
  assert epoch0 != epoch1  # a new order each epoch
  for b in run[:3]:
    np.testing.assert_array_equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
  other = data.TrainBatches(tokens, seq_len=8, batch_size=4, seed=4)
  assert starts([other.batch(0)]) != starts(run[:1])


def test_train_batches_go_through_grain_and_resume_by_index():
  tokens = np.arange(1001, dtype=np.uint16)
  loader = data.TrainBatches(tokens, seq_len=8, batch_size=4, seed=3)
  assert isinstance(loader.dataset, grain.MapDataset)
  # Random access by step: any order, any number of times, same batch.
  for k in (65, 3, 31, 65, 0):
    np.testing.assert_array_equal(
        loader.batch(k)["input_ids"], loader.dataset[k]["input_ids"])
  resumed = list(loader.iterate(start_step=60, num_steps=5))
  for k, batch in zip(range(60, 65), resumed):
    np.testing.assert_array_equal(batch["labels"], loader.batch(k)["labels"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_make_up_the_single_process_batch(process_count):
  # The multi-host guarantee: for every step (across epoch boundaries), the
  # processes' rows in process order are the single-process global batch.
  tokens = np.arange(1001, dtype=np.uint16)
  single = data.TrainBatches(tokens, seq_len=8, batch_size=8, seed=5)
  shards = [data.TrainBatches(tokens, seq_len=8, batch_size=8, seed=5,
                              process_index=p, process_count=process_count)
            for p in range(process_count)]
  for step in range(0, 3 * single.steps_per_epoch + 2):
    parts = [s.batch(step) for s in shards]
    assert parts[0]["input_ids"].shape == (8 // process_count, 8)
    for key in ("input_ids", "labels"):
      np.testing.assert_array_equal(
          np.concatenate([b[key] for b in parts]), single.batch(step)[key])
  evals = data.eval_batches(tokens, seq_len=8, batch_size=8, num_batches=3)
  eval_shards = [data.eval_batches(
      tokens, seq_len=8, batch_size=8, num_batches=3, process_index=p,
      process_count=process_count) for p in range(process_count)]
  for k, want in enumerate(evals):
    np.testing.assert_array_equal(np.concatenate(
        [shard[k]["input_ids"] for shard in eval_shards]), want["input_ids"])
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    data.TrainBatches(tokens, seq_len=8, batch_size=6, process_count=4)


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")


def _names(docs):
  return [d.name for d in docs]


def test_local_files_globs_and_directories(tmp_path, byt5):
  root = tmp_path / "corpus"
  texts = {"a.txt": "alpha " * 50, "b.txt": "beta " * 60,
           "sub/c.md": "gamma ✓ " * 40}
  for name, text in texts.items():
    _write(root / name, text)
  _write(root / ".hidden" / "x.txt", "hidden")
  (root / "blob.bin").write_bytes(b"\x00\x01binary")

  assert _names(data.local_documents(root)) == ["a.txt", "b.txt", "sub/c.md"]
  assert _names(data.local_documents(str(root / "*.txt"))) == [
      "a.txt", "b.txt"]
  assert _names(data.local_documents(str(root / "**" / "*.md"))) == ["c.md"]
  listed = data.local_documents([root / "sub" / "c.md", str(root / "a.txt")])
  assert _names(listed) == ["a.txt", "sub/c.md"]
  with pytest.raises(FileNotFoundError):
    data.local_documents(str(root / "*.nope"))

  corpus = data.load_corpus(
      str(root), eval_fraction=0.3, cache_dir=tmp_path / "cache")
  assert len(corpus.train_documents) + len(corpus.eval_documents) == 3
  assert corpus.train_documents and corpus.eval_documents
  assert not set(corpus.train_documents) & set(corpus.eval_documents)
  want = data.encode_documents(
      [texts[n] for n in corpus.train_documents], byt5)
  np.testing.assert_array_equal(corpus.train_tokens, want)

  # A single file cannot be split by file: its tail is held out instead.
  single = data.load_corpus(root / "a.txt", eval_fraction=0.1, use_cache=False)
  full = data.encode_documents([texts["a.txt"]], byt5)
  assert len(single.eval_tokens) == round(len(full) * 0.1)
  np.testing.assert_array_equal(
      np.concatenate([single.train_tokens, single.eval_tokens]), full)


def test_local_tokenizer_directory(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[UNK]": 0, "</s>": 1, "alpha": 2, "beta": 3, "gamma": 4}
  backend = tokenizers.Tokenizer(
      tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
  fast.save_pretrained(tmp_path / "tok")

  tok = data.load_tokenizer(str(tmp_path / "tok"))
  assert not data.is_byt5(tok)
  stream = data.encode_documents(["alpha beta", "gamma delta alpha"], tok)
  assert stream.tolist() == [2, 3, 1, 4, 0, 2, 1]
  byt5_id = data.tokenizer_id(transformers.ByT5Tokenizer())
  assert data.tokenizer_id(tok) != byt5_id
  with pytest.raises(FileNotFoundError, match="never downloads"):
    data.load_tokenizer("some-org/some-tokenizer")


def test_missing_datasets_package_gives_clear_error(monkeypatch, tmp_path):
  # A None entry in sys.modules makes `import datasets` raise ImportError.
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(ImportError, match="pip install datasets"):
    data.load_corpus(
        "hf:allenai/c4:en", max_train_bytes=1000, cache_dir=tmp_path)


def test_hf_dataset_through_a_stub_module(monkeypatch, tmp_path):
  calls = []

  def load_dataset(name, config, split, streaming):
    calls.append((name, config, split, streaming))
    return ({"text": f"document number {i} " * 3} for i in range(10_000))

  stub = types.SimpleNamespace(load_dataset=load_dataset)
  monkeypatch.setitem(sys.modules, "datasets", stub)
  kwargs = dict(eval_fraction=0.1, max_train_bytes=3000, cache_dir=tmp_path)
  corpus = data.load_corpus("hf:org/name:cfg", **kwargs)
  assert calls == [("org/name", "cfg", "train", True)]
  num_docs = int((corpus.train_tokens == 1).sum())
  # Streaming stops at the byte cap (the last document may overshoot it).
  assert 3000 <= len(corpus.train_tokens) - num_docs < 3100
  assert len(corpus.eval_tokens) > 0
  again = data.load_corpus("hf:org/name:cfg", **kwargs)
  assert again.from_cache and len(calls) == 1
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)


def test_default_cache_dir_respects_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("GALORE_OPTAX_CACHE", str(tmp_path))
  assert data.default_cache_dir() == tmp_path / "data"
  monkeypatch.delenv("GALORE_OPTAX_CACHE")
  default = Path(os.path.expanduser("~/.cache/galore_optax/data"))
  assert data.default_cache_dir() == default
