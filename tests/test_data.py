"""Tokenizers, corpus preparation and the Grain window pipelines."""

import json
import os

import numpy as np
import pytest

from data import corpus, loader, prepare, tokenizers
from data.corpus import DataError

# ---------------------------------------------------------------- tokenizers

UNICODE = "Hello, world! héllo — naïve café 日本語 ∑ 🙂👍🏽 \n\ttabs\0nul"


def test_byte_tokenizer_round_trip():
  tok = tokenizers.fit("byte", "ignored")
  ids = tok.encode(UNICODE)
  assert ids.dtype == np.int32
  assert ids.tolist() == list(UNICODE.encode("utf-8"))
  assert len(ids) > len(UNICODE)  # multi-byte characters
  assert tok.decode(ids) == UNICODE
  assert tok.decode(tok.encode("")) == ""
  assert tok.vocab_size == 256
  np.testing.assert_array_equal(tok.token_bytes(), np.ones(256))
  assert tokenizers.from_json(tok.to_json()).encode("🙂").tolist() == [
      0xF0, 0x9F, 0x99, 0x82]


def test_char_tokenizer_round_trip(corpus_dir):
  text = "".join(t for _, t in corpus.load(corpus_dir, ""))
  tok = tokenizers.fit("char", text)
  assert tok.vocab_size == len(set(text))
  assert list(tok.chars) == sorted(set(text))
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and len(ids) == len(text)
  assert ids.min() == 0 and ids.max() == tok.vocab_size - 1
  assert tok.decode(ids) == text
  restored = tokenizers.from_json(json.loads(json.dumps(tok.to_json())))
  assert restored.encode(text).tolist() == ids.tolist()


def test_char_tokenizer_token_bytes_and_unknown_char():
  tok = tokenizers.fit("char", "ab€é🙂a")
  assert tok.chars == "abé€🙂"
  assert tok.encode("ba🙂").tolist() == [1, 0, 4]
  assert tok.token_bytes().tolist() == [1, 1, 2, 3, 4]
  with pytest.raises(ValueError, match="character 'z' is not in the vocab"):
    tok.encode("abz")


def test_unknown_tokenizer_kind():
  with pytest.raises(ValueError, match="data.tokenizer='bpe'; choose"):
    tokenizers.fit("bpe", "text")
  with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'"):
    tokenizers.from_json({"kind": "bpe"})


# ---------------------------------------------------------------- prepare

DOCS = {"a": "First document.\nTwo lines — ok.", "b": "Second: héllo 🙂",
        "c": "third one\n", "d": ""}


@pytest.fixture
def doc_dir(tmp_path):
  path = tmp_path / "docs"
  path.mkdir()
  for name, text in DOCS.items():
    (path / f"{name}.txt").write_text(text, encoding="utf-8")
  (path / "ignored.md").write_text("not a .txt file")
  return path


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_prepare_holds_out_whole_documents(doc_dir, tmp_path, kind):
  cache = tmp_path / "cache"
  prep = prepare.prepare(str(doc_dir), kind, ("b",), str(cache))
  assert prep.path.startswith(str(cache / "prepared"))
  train_text = "\n\n".join([DOCS["a"], DOCS["c"], DOCS["d"]])
  val_text = DOCS["b"]
  meta = prep.meta
  assert meta["documents"] == {"train": ["a", "c", "d"], "val": ["b"]}
  assert meta["train_bytes"] == len(train_text.encode("utf-8"))
  assert meta["val_bytes"] == len(val_text.encode("utf-8"))
  tok = prep.tokenizer
  if kind == "char":
    assert meta["vocab_size"] == len(set(train_text + val_text))
    assert meta["train_tokens"] == len(train_text)
    assert meta["val_tokens"] == len(val_text)
  else:
    assert meta["vocab_size"] == 256
    assert meta["train_tokens"] == meta["train_bytes"]
    assert meta["val_tokens"] == meta["val_bytes"]
  assert meta["dtype"] == "uint16"
  for split, text in (("train", train_text), ("val", val_text)):
    ids = prep.tokens(split)
    assert ids.dtype == np.uint16
    assert ids.size == meta[f"{split}_tokens"]
    assert tok.decode(ids) == text
    assert int(tok.token_bytes()[np.asarray(ids)].sum()) == meta[
        f"{split}_bytes"]


def test_prepare_once_then_reuse(doc_dir, tmp_path):
  cache = str(tmp_path / "cache")
  first = prepare.prepare(str(doc_dir), "char", ("b",), cache)
  files = ("meta.json", "train.bin", "val.bin")
  mtimes = {f: os.stat(os.path.join(first.path, f)).st_mtime_ns for f in files}
  os.utime(os.path.join(first.path, "meta.json"), ns=(1, 1))
  mtimes["meta.json"] = 1
  second = prepare.prepare(str(doc_dir), "char", ("b",), cache)
  assert second.path == first.path and second.meta == first.meta
  assert {f: os.stat(os.path.join(first.path, f)).st_mtime_ns
          for f in files} == mtimes
  assert os.listdir(os.path.dirname(first.path)) == [
      os.path.basename(first.path)]  # no leftover temporary directories
  # A different holdout, tokenizer or text is prepared anew.
  other = prepare.prepare(str(doc_dir), "char", ("a",), cache)
  assert other.path != first.path
  assert prepare.prepare(str(doc_dir), "byte", ("b",), cache).path not in (
      first.path, other.path)
  (doc_dir / "c.txt").write_text("changed", encoding="utf-8")
  changed = prepare.prepare(str(doc_dir), "char", ("b",), cache)
  assert changed.path != first.path
  assert changed.tokenizer.decode(changed.tokens("train")) == "\n\n".join(
      [DOCS["a"], "changed", DOCS["d"]])


def test_prepare_errors(doc_dir, tmp_path):
  cache = str(tmp_path / "cache")
  with pytest.raises(DataError) as e:
    prepare.prepare(str(doc_dir), "char", ("b", "hamlet"), cache)
  assert "unknown: ['hamlet']" in str(e.value)
  assert "choose from: a, b, c, d" in str(e.value)
  with pytest.raises(DataError, match="choose from: a, b, c, d"):
    prepare.prepare(str(doc_dir), "char", (), cache)
  with pytest.raises(DataError, match="holds out every document"):
    prepare.prepare(str(doc_dir), "char", ("a", "b", "c", "d"), cache)
  missing = str(tmp_path / "nope")
  with pytest.raises(DataError, match="neither 'shakespeare' nor a directory"):
    prepare.prepare(missing, "char", ("a",), cache)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "blank.txt").write_text("")
  with pytest.raises(DataError, match="no text in"):
    prepare.prepare(str(empty), "char", ("blank",), cache)
  assert not os.path.exists(os.path.join(cache, "prepared")) or not any(
      os.scandir(os.path.join(cache, "prepared")))


# ---------------------------------------------------------------- loader

L = 16


def _source(num_windows, extra=1):
  """Token i has value i, so a window's first token / L is its index."""
  return loader.WindowSource(np.arange(num_windows * L + extra), L, "test")


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_windows_are_exact_slices():
  tokens = np.arange(1000, 1000 + 6 * L + 1).astype(np.uint16)
  source = loader.WindowSource(tokens, L, "x")
  assert len(source) == 6
  for i in range(6):
    w = source[i]
    assert w.dtype == np.int32 and w.shape == (L + 1,)
    np.testing.assert_array_equal(w, tokens[i * L:(i + 1) * L + 1])
    inputs, targets = w[:-1], w[1:]
    np.testing.assert_array_equal(targets[:-1], inputs[1:])
  # One token short of a full last window drops it; empty gives none.
  assert len(loader.WindowSource(tokens[:-1], L, "x")) == 5
  assert len(loader.WindowSource(tokens[:L], L, "x")) == 0
  assert len(loader.WindowSource(tokens[:0], L, "x")) == 0


def _window_ids(batch):
  ids = batch[:, 0] // L
  np.testing.assert_array_equal(
      batch, ids[:, None] * L + np.arange(L + 1)[None])  # whole windows
  return ids.tolist()


def test_train_iterator_epochs_and_seeds():
  source = _source(12)
  batches = _take(loader.train_iterator(source, 4, seed=7), 9)
  assert all(b.shape == (4, L + 1) and b.dtype == np.int32 for b in batches)
  ids = [_window_ids(b) for b in batches]
  epochs = [sum(ids[3 * e:3 * e + 3], []) for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(12))  # each window once per epoch
  assert epochs[0] != list(range(12))  # shuffled
  assert epochs[0] != epochs[1]  # reshuffled each epoch
  again = _take(loader.train_iterator(source, 4, seed=7), 9)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a, b)
  other = _take(loader.train_iterator(source, 4, seed=8), 3)
  assert [_window_ids(b) for b in other] != ids[:3]


def test_train_iterator_resumes_from_state():
  source = _source(10)
  it = loader.train_iterator(source, 4, seed=1)
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 4)  # crosses an epoch boundary
  resumed = loader.train_iterator(source, 4, seed=1)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 4)):
    np.testing.assert_array_equal(a, b)


def test_train_iterator_process_shards_make_the_global_batch():
  source = _source(24)
  whole = _take(loader.train_iterator(source, 8, seed=3), 4)
  parts = [_take(loader.train_iterator(source, 8, seed=3, process_index=p,
                                       process_count=2), 4) for p in (0, 1)]
  for step, batch in enumerate(whole):
    assert parts[0][step].shape == (4, L + 1)
    np.testing.assert_array_equal(
        np.concatenate([parts[0][step], parts[1][step]]), batch)


def test_check_size_needs_one_batch():
  from data.corpus import DataError
  with pytest.raises(DataError, match="split has 3 windows of "
                     "17 tokens, fewer than one batch of 4"):
    loader.check_size(_source(3), 4)
  loader.check_size(_source(4), 4)


def test_eval_batches_cover_every_window_once():
  source = _source(10)
  batches = list(loader.eval_batches(source, 4))
  assert len(batches) == 3
  for tokens, mask in batches:
    assert tokens.shape == (4, L + 1) and tokens.dtype == np.int32
    assert mask.shape == (4,) and mask.dtype == bool
  assert [m.tolist() for _, m in batches] == [[True] * 4, [True] * 4,
                                              [True, True, False, False]]
  np.testing.assert_array_equal(batches[-1][0][2:], 0)
  kept = np.concatenate([t[m] for t, m in batches])
  np.testing.assert_array_equal(kept, np.stack([source[i] for i in range(10)]))
  assert len(list(loader.eval_batches(source, 4, max_batches=2))) == 2
  assert len(list(loader.eval_batches(source, 5))) == 2  # exact multiple
  assert list(loader.eval_batches(_source(0, extra=0), 4)) == []
