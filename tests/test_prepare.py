"""python -m data.prepare: inputs, packing, the split, re-runs, bad input, and
bits per byte through training."""

import gzip
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, tiny_run_config
from data import loader, prepare, store, work
from data.corpus import DataError
from test_data import gpt2_files  # noqa: F401 (a fixture)

SEQ = 8


def _write_corpus(root) -> list[str]:
  """Every kind of input, nested; returns its non-empty documents."""
  (root / "sub" / "deeper").mkdir(parents=True)
  a = "Alpha — the first document.\n\n  spaced  \t out \r\n"
  (root / "a.txt").write_text(a, encoding="utf-8")
  b = "Beta 🙂👍🏽 the second, gzipped"
  with gzip.open(root / "sub" / "b.txt.gz", "wt", encoding="utf-8") as f:
    f.write(b)
  c = [f"json document {i}: naïve café {'∑' * i}" for i in range(12)]
  lines = [json.dumps({"id": i, "text": t}, ensure_ascii=i % 2 == 0)
           for i, t in enumerate(c)] + [json.dumps({"text": ""})]
  (root / "sub" / "deeper" / "c.jsonl").write_text(
      "\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:]) + "\n",
      encoding="utf-8")  # a blank line, and an empty document
  d = [f"gz line {i} <|endoftext|> is text here" for i in range(5)]
  with gzip.open(root / "d.jsonl.gz", "wt", encoding="utf-8") as f:
    f.write("".join(json.dumps({"text": t}) + "\n" for t in d))
  (root / "notes.md").write_text("not a corpus file")
  return [a, b, *c, *d]


def _split_documents(prep, split) -> list[str]:
  """The documents of a split: its tokens cut after each EOT id, decoded."""
  ids = np.asarray(prep.tokens(split))
  eot = prep.tokenizer.eot_id
  assert ids.size == 0 or ids[-1] == eot
  ends = np.flatnonzero(ids == eot)
  return [prep.tokenizer.decode(doc[:-1] if doc[-1] == eot else doc)
          for doc in np.split(ids, ends + 1)[:-1]]


def _options(kind, tmp_path, **kw):
  files = str(tmp_path / "gpt2") if kind == "gpt2" else ""
  return prepare.Options(tokenizer=kind, vocab_size=300, tokenizer_files=files,
                         seq_len=SEQ, val_fraction=0.3, **kw)


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "gpt2"])
def test_packing_keeps_every_document_once(kind, tmp_path, gpt2_files):
  shutil.copytree(gpt2_files[0], tmp_path / "gpt2")
  docs = _write_corpus(tmp_path / "corpus")
  prep = prepare.build([str(tmp_path / "corpus")], str(tmp_path / "out"),
                       _options(kind, tmp_path, task_bytes=200,
                                shard_tokens=50))
  meta, tok = prep.meta, prep.tokenizer
  assert meta["files"] == 4 and meta["empty_documents"] == 1
  found = {s: _split_documents(prep, s) for s in store.SPLITS}
  assert sorted(found["train"] + found["val"]) == sorted(docs)  # none lost
  assert found["train"] and found["val"]
  for split, texts in found.items():
    tokens = prep.tokens(split)
    assert meta[f"{split}_documents"] == len(texts)
    assert len(tokens) == meta[f"{split}_tokens"] == sum(
        len(tok.encode(t)) + 1 for t in texts)  # each document, then EOT
    assert meta[f"{split}_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert tok.token_bytes()[tokens[:]].sum() == meta[f"{split}_bytes"]
    shards = meta["splits"][split]["shards"]
    assert all(0 < s["tokens"] <= 50 for s in shards)
    for s in shards:
      data = open(os.path.join(prep.path, s["file"]), "rb").read()
      assert hashlib.sha256(data).hexdigest() == s["sha256"]
    # Packed: full windows, less than one window's tokens left over.
    source = loader.WindowSource(tokens, SEQ, split)
    assert len(source) * SEQ + 1 <= len(tokens) < (len(source) + 1) * SEQ + 1
    assert all(source[i].shape == (SEQ + 1,) for i in range(len(source)))
  assert len(meta["splits"]["train"]["shards"]) > 3
  assert tokens.dtype == np.uint16 and meta["dtype"] == "uint16"
  assert meta["vocab_size"] == tok.vocab_size


def test_split_depends_on_the_documents_only(tmp_path):
  """Another order, other file names and worker processes: the same split,
  which is the hash rule (and about val_fraction of the documents)."""
  docs = [f"document {i} " * (1 + i % 5) for i in range(400)]
  first, second = tmp_path / "one", tmp_path / "two"
  first.mkdir()
  second.mkdir()
  (first / "all.jsonl").write_text(
      "".join(json.dumps({"text": d}) + "\n" for d in docs))
  for i, d in enumerate(reversed(docs)):
    (second / f"{i:03d}.txt").write_text(d)
  options = prepare.Options(tokenizer="byte", val_fraction=0.2, seq_len=SEQ)
  a = prepare.build([str(first)], str(tmp_path / "a"), options)
  b = prepare.build([str(second)], str(tmp_path / "b"),
                    prepare.Options(tokenizer="byte", val_fraction=0.2,
                                    seq_len=SEQ, workers=2, task_bytes=500))
  val = _split_documents(a, "val")
  assert sorted(val) == sorted(_split_documents(b, "val"))
  assert sorted(_split_documents(a, "train")) == sorted(
      _split_documents(b, "train"))
  by_hash = [d for d in docs if int.from_bytes(hashlib.blake2b(
      d.encode(), digest_size=8).digest(), "big") < 0.2 * 2**64]
  assert val == by_hash
  assert 50 <= len(val) <= 110  # ~80


@pytest.mark.parametrize("holdout, val_fraction", [(("held",), 0.01),
                                                   ((), 0.5)])
def test_a_bpe_learns_its_merges_from_the_training_split_alone(
    tmp_path, holdout, val_fraction):
  """A word frequent only in held-out text gets no merge: it stays about a
  token a byte, while the training text's words become single tokens."""
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "train.txt").write_text("the king " * 400)
  (tmp_path / "corpus" / "held.txt").write_text("zebraquux " * 400)
  made = prepare.build([str(tmp_path / "corpus")], str(tmp_path / "out"),
                       prepare.Options(tokenizer="bpe", vocab_size=300,
                                       holdout=holdout, seq_len=SEQ,
                                       val_fraction=val_fraction))
  assert made.meta["val_documents"] == 1
  assert len(made.tokenizer.encode(" king")) == 1
  assert len(made.tokenizer.encode(" zebraquux")) >= 8


@pytest.mark.parametrize("workers", [0, 2])
def test_copies_of_held_out_files_are_held_out(tmp_path, workers):
  """--holdout ham holds out every file named ham (in any folder) and every
  file with the bytes of one of them, whatever it is called; the BPE learns
  from neither. A held-out text as one line of a JSONL file trains."""
  held = "zebraquux ham text " * 50
  (tmp_path / "corpus" / "sub").mkdir(parents=True)
  (tmp_path / "corpus" / "ham.txt").write_text(held)
  (tmp_path / "corpus" / "sub" / "ham.txt").write_text("second ham " * 50)
  (tmp_path / "corpus" / "copy_of_ham.txt").write_text(held)
  (tmp_path / "corpus" / "same_size.txt").write_text(held.upper())
  (tmp_path / "corpus" / "lines.jsonl").write_text(
      json.dumps({"text": "the king " * 300}) + "\n" +
      json.dumps({"text": held}) + "\n")
  made = prepare.build([str(tmp_path / "corpus")], str(tmp_path / "out"),
                       prepare.Options(tokenizer="bpe", vocab_size=300,
                                       holdout=("ham",), seq_len=SEQ,
                                       workers=workers))
  assert sorted(_split_documents(made, "val")) == sorted(
      [held, held, "second ham " * 50])
  assert sorted(_split_documents(made, "train")) == sorted(
      ["the king " * 300, held, held.upper()])
  assert sorted(made.meta["documents"]["val"]) == ["copy_of_ham", "ham"]


def test_rerun_processes_only_new_or_changed_inputs(tmp_path):
  corpus_dir = tmp_path / "corpus"
  corpus_dir.mkdir()
  for i in range(4):
    (corpus_dir / f"{i}.txt").write_text(f"text number {i}, " * 20)
  out = tmp_path / "out"
  options = prepare.Options(tokenizer="bpe", vocab_size=300, seq_len=SEQ,
                            holdout=("0",), task_bytes=1)  # a task per file

  def state():
    return {f: os.stat(out / "shards" / f).st_mtime_ns
            for f in os.listdir(out / "shards")}

  first = prepare.build([str(corpus_dir)], str(out), options)
  before, meta_time = state(), os.stat(out / "meta.json").st_mtime_ns
  assert len([f for f in before if f.endswith(".json")]) == 4
  again = prepare.build([str(corpus_dir)], str(out), options)
  assert again.meta == first.meta and state() == before
  assert os.stat(out / "meta.json").st_mtime_ns == meta_time  # not rewritten

  # An interrupted run: a half-written shard, and a task without its record.
  (out / "shards" / "x-train-0000.bin.tmp").write_bytes(b"\0" * 7)
  record = next(f for f in before if f.endswith(".json"))
  os.remove(out / "shards" / record)
  repaired = prepare.build([str(corpus_dir)], str(out), options)
  assert repaired.meta == first.meta
  now = state()
  assert set(now) == set(before)  # the temporary file is gone
  assert sorted(f for f in before if now[f] != before[f]) == sorted(
      f for f in before if f.startswith(record[:-5]))  # that task only

  # A new file and a changed one: two tasks run, the old one's files go.
  (corpus_dir / "4.txt").write_text("a new document")
  (corpus_dir / "1.txt").write_text("a changed document")
  changed = prepare.build([str(corpus_dir)], str(out), options)
  now = state()
  assert len([f for f in now if f not in before]) == 2 * 2  # record + shard
  assert len([f for f in before if f not in now]) == 2
  assert changed.meta["train_documents"] == 4
  assert "a changed document" in _split_documents(changed, "train")
  assert changed.tokenizer.to_json() == first.tokenizer.to_json()  # kept

  with pytest.raises(DataError, match="holds data prepared with the "
                     "tokenizer .*'vocab_size': 300.*, not .*'vocab_size': "
                     "400.*; prepare into a new --output"):
    prepare.build([str(corpus_dir)], str(out),
                  prepare.Options(tokenizer="bpe", vocab_size=400))
  assert prepare.load(str(out)).meta == changed.meta


@pytest.mark.parametrize("workers", [0, 2])
def test_a_new_character_on_a_rerun_is_one_line_and_nothing_changes(
    tmp_path, workers):
  """A character vocabulary is fitted once, on the first preparation: an
  input added later with a character outside it names its file."""
  corpus_dir, out = tmp_path / "corpus", tmp_path / "out"
  corpus_dir.mkdir()
  for name in ("a", "b"):
    (corpus_dir / f"{name}.txt").write_text(f"text of {name}, " * 20)
  options = prepare.Options(tokenizer="char", seq_len=SEQ, holdout=("a",),
                            workers=workers)
  first = prepare.build([str(corpus_dir)], str(out), options)
  (corpus_dir / "c.txt").write_text("text of a, " * 10 + "Z")
  with pytest.raises(DataError, match=(
      f"^{corpus_dir}/c.txt: character 'Z' is not in the vocabulary of this "
      f"character tokenizer, which was fitted to the inputs of the first "
      f"preparation of {out}; prepare into a new --output")):
    prepare.build([str(corpus_dir)], str(out), options)
  assert prepare.load(str(out)).meta == first.meta


@pytest.mark.parametrize("damage, reason", [
    (lambda text: text[:text.index(":") + 1], "Expecting value"),  # cut short
    (lambda text: "", "Expecting value"),
    (lambda text: json.dumps({**json.loads(text), "splits": None}),
     "'NoneType' object is not subscriptable"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items()
                              if k != "vocab_size"}), "no 'vocab_size'"),
])
def test_damaged_meta_is_refused_then_prepared_again(damage, reason,
                                                     tmp_path):
  """A meta.json that is not JSON or lacks keys: loading it says which file
  and to prepare the directory again; preparing it again repairs it."""
  (tmp_path / "corpus").mkdir()
  for name in ("a", "b"):
    (tmp_path / "corpus" / f"{name}.txt").write_text(f"text of {name} " * 9)
  out, options = tmp_path / "out", prepare.Options(
      tokenizer="char", seq_len=SEQ, holdout=("b",))
  first = prepare.build([str(tmp_path / "corpus")], str(out), options)
  meta = out / store.META
  meta.write_text(damage(meta.read_text()))
  with pytest.raises(DataError) as e:
    prepare.prepare(str(out), "char", ())
  message = str(e.value)
  assert message.startswith(f"{meta} is damaged ("), message
  assert reason in message and "\n" not in message
  assert message.endswith(f"prepare {out} again (python -m data.prepare, the "
                          "same command)")
  again = prepare.build([str(tmp_path / "corpus")], str(out), options)
  assert again.meta == first.meta == prepare.load(str(out)).meta


def test_large_jsonl_is_read_in_ranges(tmp_path):
  lines = [json.dumps({"text": f"line {i} " + "é" * (i % 7)})
           for i in range(300)]
  (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
  options = prepare.Options(tokenizer="byte", seq_len=SEQ, task_bytes=1000)
  prep = prepare.build([str(tmp_path / "big.jsonl")], str(tmp_path / "out"),
                       options)
  assert len(work.plan([str(tmp_path / "big.jsonl")], 1000)) > 5
  texts = sorted(_split_documents(prep, "train") +
                 _split_documents(prep, "val"))
  assert texts == sorted(json.loads(line)["text"] for line in lines)
  lines[250] = '{"text": "cut short'
  (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=r"big\.jsonl:251: not a JSON object"):
    prepare.build([str(tmp_path / "big.jsonl")], str(tmp_path / "out2"),
                  options)


def test_vocabulary_over_65536_ids_is_uint32(tmp_path):
  chars = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 70_000)
                  if not 0xD800 <= c < 0xE000)
  (tmp_path / "wide.txt").write_text(chars + chars[::-1], encoding="utf-8")
  (tmp_path / "val.txt").write_text(chars[:100], encoding="utf-8")
  prep = prepare.build([str(tmp_path)], str(tmp_path / "out"),
                       prepare.Options(tokenizer="char", holdout=("val",),
                                       seq_len=SEQ))
  assert prep.meta["vocab_size"] == len(chars) + 1 > 2**16
  assert prep.meta["dtype"] == "uint32"
  assert prep.tokens("train").dtype == np.uint32
  assert _split_documents(prep, "train") == [chars + chars[::-1]]


def test_utf8_replace_policy(tmp_path):
  (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe then fine")
  (tmp_path / "good.txt").write_text("all good here")
  prep = prepare.build([str(tmp_path)], str(tmp_path / "out"),
                       prepare.Options(tokenizer="byte", utf8="replace",
                                       holdout=("good",), seq_len=SEQ))
  assert _split_documents(prep, "train") == ["ok \ufffd\ufffd then fine"]
  assert prep.meta["train_bytes"] == len("ok \ufffd\ufffd then fine".encode())


@pytest.mark.parametrize("utf8", ["strict", "replace"])
def test_a_jsonl_byte_order_mark_and_lone_surrogates(tmp_path, utf8):
  """A byte order mark opening a .jsonl file is no text; a lone surrogate
  escape becomes U+FFFD under --utf8 replace, as bad bytes do."""
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "bom.jsonl").write_bytes(
      b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n')
  (tmp_path / "in" / "held.txt").write_text("held out text")
  options = prepare.Options(tokenizer="byte", utf8=utf8, holdout=("held",),
                            seq_len=SEQ)
  prep = prepare.build([str(tmp_path / "in")], str(tmp_path / "out"), options)
  assert _split_documents(prep, "train") == ["first", "second"]
  (tmp_path / "in" / "lone.jsonl").write_text('{"text": "a\\ud800b"}\n')
  if utf8 == "strict":
    with pytest.raises(DataError, match="lone.jsonl:1: the text is not valid "
                       "Unicode \\(a lone surrogate\\)"):
      prepare.build([str(tmp_path / "in")], str(tmp_path / "out"), options)
    return
  prep = prepare.build([str(tmp_path / "in")], str(tmp_path / "out"), options)
  assert sorted(_split_documents(prep, "train")) == ["a\ufffdb", "first",
                                                      "second"]


# ---------------------------------------------------------------- training

def test_a_configs_bpe_vocabulary_size_is_the_tokenizers(tmp_path, corpus_dir):
  """data.bpe_vocab_size of a config reaches the BPE fitted to its raw
  source; each size is prepared apart, and a character run ignores it."""
  config = tiny_run_config(corpus_dir, str(tmp_path / "cache"), steps=1)
  config.data.tokenizer = "bpe"
  made = {}
  for size in (270, 300):
    config.data.bpe_vocab_size = size
    made[size] = prepare.of_config(config)
    assert made[size].tokenizer.vocab_size == size
  assert made[270].path != made[300].path
  assert len(made[300].tokens("train")) < len(made[270].tokens("train"))
  config.data.tokenizer = "char"
  assert prepare.of_config(config).tokenizer.kind == "char"


def test_bits_per_byte_equals_hand_computation(tmp_path, data_cache):
  """A BPE corpus whose validation split is one window: bits per byte are
  the nats of its targets over the UTF-8 bytes of the text they spell (EOT
  spells none)."""
  import jax
  from trainer import run as run_lib
  from trainer import state as state_lib
  val_docs = {"v1": "Val one: naïve 🙂 text.", "v2": "V2 — ∑ and more"}
  for name, text in val_docs.items():
    (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
  (tmp_path / "train.txt").write_text("the training text, " * 200)
  made = prepare.build([str(tmp_path)], str(tmp_path / "out"),
                       prepare.Options(tokenizer="bpe", vocab_size=300,
                                       holdout=tuple(val_docs), seq_len=SEQ))
  val = np.asarray(made.tokens("val")).astype(np.int32)
  config = tiny_run_config(made.path, data_cache, steps=6)
  config.model.seq_len = len(val) - 1
  run = run_lib.build(config, str(tmp_path / "run"))
  try:
    assert run.data.path == made.path
    with run.context():
      params = state_lib.init_state(run.model, run.tx, run.shardings, 0).params
      result = run_lib.evaluate_params(run, params, max_batches=0)
  finally:
    run.checkpointer.close()
  logits = np.asarray(jax.jit(run.model.apply)({"params": params},
                                               val[None, :-1])[0], np.float64)
  logits -= logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nats = -log_probs[np.arange(len(val) - 1), val[1:]].sum()
  text_bytes = sum(len(t.encode("utf-8")) for t in val_docs.values())
  first = len(made.tokenizer.decode(val[:1]).encode("utf-8"))  # "V", unscored
  assert made.meta["val_bytes"] == text_bytes
  assert result["eval_tokens"] == len(val) - 1
  assert result["eval_loss"] == pytest.approx(nats / (len(val) - 1), rel=1e-5)
  assert result["eval_bits_per_byte"] == pytest.approx(
      nats / (text_bytes - first) / math.log(2), rel=1e-5)


# ---------------------------------------------------------------- command line

def _cli(*args):
  return subprocess.Popen(
      [sys.executable, "-m", "data.prepare", *map(str, args)], cwd=REPO,
      text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_command_line(tmp_path):
  _write_corpus(tmp_path / "corpus")
  out = tmp_path / "out"
  proc = _cli("--input", tmp_path / "corpus" / "*.txt",
              tmp_path / "corpus" / "**" / "*.jsonl*", "--input",
              tmp_path / "corpus" / "sub", "--output", out, "--tokenizer",
              "byte", "--seq-len", SEQ, "--workers", 2, "--val-fraction", 0.3)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr
  meta = prepare.load(str(out)).meta
  assert stdout.strip() == (
      f"{out}: 4 files, {meta['train_documents']} + {meta['val_documents']} "
      f"documents, {meta['train_tokens']:,} train + {meta['val_tokens']:,} val "
      f"tokens ({meta['train_bytes']:,} + {meta['val_bytes']:,} bytes), byte "
      "vocabulary 257")
  assert meta["train_documents"] + meta["val_documents"] == 19


def _children(pid: int) -> list[int]:
  """The live (not zombie) processes whose parent is `pid`."""
  found = []
  for child in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{child}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid and fields[0] != "Z":
      found.append(int(child))
  return found


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return bool(f.read())  # a zombie's is empty
  except OSError:
    return False


def test_workers_die_with_a_killed_preparation(tmp_path):
  corpus_dir = tmp_path / "corpus"
  corpus_dir.mkdir()
  for i in range(8):
    (corpus_dir / f"{i}.txt").write_text(f"document {i} " * 20_000)
  proc = _cli("--input", corpus_dir, "--output", tmp_path / "out",
              "--tokenizer", "byte", "--seq-len", SEQ, "--workers", 2)
  deadline = time.monotonic() + 60
  while len(workers := _children(proc.pid)) < 2:
    assert time.monotonic() < deadline and proc.poll() is None, "no workers"
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  deadline = time.monotonic() + 20
  while any(map(_alive, workers)) and time.monotonic() < deadline:
    time.sleep(0.1)
  left = [w for w in workers if _alive(w)]
  for w in left:
    os.kill(w, signal.SIGKILL)
  assert not left, "workers outlived their preparation"


def test_bad_input_is_one_line_error(tmp_path, gpt2_files):
  good = tmp_path / "good"
  good.mkdir()
  (good / "a.txt").write_text("plenty of text for a sequence or two " * 9)
  (good / "b.txt").write_text("more text, held out for validation " * 9)

  def corpus(name, files):
    path = tmp_path / name
    shutil.copytree(good, path)
    for file, data in files.items():
      (path / file).write_bytes(data)
    return path

  base = ("--tokenizer", "byte", "--seq-len", SEQ, "--holdout", "b",
          "--workers", 0)  # a later option overrides one of these
  cases = {
      "glob": (["--input", tmp_path / "nothing" / "*.txt", *base],
               "matches no files"),
      "empty": (["--input", corpus("c_empty", {"e.txt": b""}), *base],
                "e.txt is empty; remove it or put text in it"),
      "utf8": (["--input", corpus("c_utf8", {"u.txt": b"ab\xffcd"}), *base],
               "u.txt: invalid UTF-8 at byte 2; fix it or prepare with "
               "--utf8 replace"),
      "utf8_jsonl": (["--input", corpus("c_uj", {"u.jsonl": b'{"text": "a"}\n'
                                                  b'{"text": "\xc3"}\n'}),
                      *base], "u.jsonl:2: invalid UTF-8 at byte 10"),
      "not_json": (["--input", corpus("c_nj", {"n.jsonl": b'{"text": "a"}\n'
                                               b'{"text": "b"}\n{oops\n'}),
                    *base, "--workers", 2],  # found by a worker process
                   "n.jsonl:3: not a JSON object (Expecting property name "
                   "enclosed in double quotes); each line of a .jsonl file "
                   "must be one"),
      "field": (["--input", corpus("c_f", {"f.jsonl": b'{"body": "a"}\n'}),
                 *base], "f.jsonl:1: no string field 'text'; name the text "
                "field with --text-field"),
      "vocab": (["--input", good, *base, "--tokenizer", "bpe",
                 "--vocab-size", 100], "vocabulary size 100 is too small"),
      "small": (["--input", good, *base, "--seq-len", 1000],
                "the train split has 334 tokens, fewer than one sequence of "
                "1001"),
      "holdout": (["--input", good, *base, "--holdout", "b", "z"],
                  "holdout ('b', 'z') must name documents of the corpus "
                  "(unknown: ['z']); choose from: a, b"),
      "gpt2": (["--input", good, *base, "--tokenizer", "gpt2"],
               "the gpt2 tokenizer is read from local files: give "
               "--tokenizer-files"),
      "gpt2_files": (["--input", good, *base, "--tokenizer", "gpt2",
                      "--tokenizer-files", good / "a.txt"],
                     "a.txt' do not load as a byte-level BPE"),
  }
  procs = {name: _cli(*args, "--output", tmp_path / f"out_{name}")
           for name, (args, _) in cases.items()}
  # A bad file added to a prepared directory: what was saved stays usable.
  _cli("--input", good, *base, "--output", tmp_path / "ready").wait(60)
  ready = prepare.load(str(tmp_path / "ready")).meta
  procs["rerun"] = _cli("--input", corpus("c_rerun", {"u.txt": b"\xff"}),
                        *base, "--output", tmp_path / "ready")
  cases["rerun"] = (None, "u.txt: invalid UTF-8 at byte 0")
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, (name, stdout, stderr)
    assert stderr.splitlines() == [stderr.strip()], (name, stderr)  # one line
    assert stderr.startswith("error: ") and cases[name][1] in stderr, (
        name, stderr)
    if name != "rerun":
      out = tmp_path / f"out_{name}"
      if name in ("utf8", "utf8_jsonl", "not_json", "field"):
        assert not out.exists()  # failed before a task finished
      else:
        assert not out.exists() or not (out / "meta.json").exists(), name
        with pytest.raises(DataError):
          prepare.prepare(str(out), "char", (), str(tmp_path / "cache"))
  assert prepare.load(str(tmp_path / "ready")).meta == ready
