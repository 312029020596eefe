"""Supervised fine-tuning: JSONL examples and the chat template, the loss
mask and its edge cases, packing with segment ids (packed loss == unpacked
loss), bad input in one line, and train.py runs that resume exactly."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import (metrics_records, random_params, run_train_py,
                      tiny_model_config)
from data import examples, loader, prepare, tokenizers
from data.corpus import DataError
from model import GPT
from trainer import audit, config as config_lib, objectives
from trainer.errors import ConfigError

F, T = False, True


def write_jsonl(path, records) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def sums(rng, n):
  return [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in
          rng.integers(0, 100, (n, 2)).tolist()]


def _encode(record, tokenizer, fmt="sft"):
  return [examples.encode(seq, tokenizer)
          for seq in examples.pieces(record, fmt)]


# ---------------------------------------------------------------- masks

def test_prompt_response_mask():
  """The first response token and the closing EOT are targets, the prompt's
  tokens are not."""
  tok = tokenizers.CharTokenizer.fit(["0123456789+="])
  [(ids, mask)] = _encode({"prompt": "12+34=", "response": "46"}, tok)
  assert tok.decode(ids) == "12+34=46" + tokenizers.CHAR_EOT
  assert mask.tolist() == [F] * 6 + [T, T, T]
  assert ids[-1] == tok.eot_id


def test_chat_template_masks_only_assistant_turns():
  tok = tokenizers.ByteTokenizer()
  record = {"messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "yo"},
      {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"}]}
  [(ids, mask)] = _encode(record, tok)
  text = tok.decode(ids)
  assert text == ("System: Be brief.\nUser: hi\nAssistant: yo<|endoftext|>"
                  "User: 2+2?\nAssistant: 4<|endoftext|>")
  targets = ids[mask]
  assert tok.decode(targets) == "yo<|endoftext|>4<|endoftext|>"
  # Each assistant turn's first token follows "Assistant: " and is a target.
  first = [i for i in range(1, len(ids)) if mask[i] and not mask[i - 1]]
  assert [tok.decode(ids[i - 11:i]) for i in first] == ["Assistant: "] * 2


def test_prompt_ending_in_a_space_keeps_the_boundary(tmp_path):
  """BPE would merge a prompt's final space into the response's first word
  (" answer") if the two were tokenized together: each piece is tokenized
  on its own, so the space is the prompt's last token and the response's
  first token is a target, as a model sampling after that prompt sees it."""
  tok = tokenizers.BPETokenizer.train(
      ["Q: what is it? answer the answer, answer it"] * 50, 300)
  prompt, response = "Q: what is it? ", "answer"
  joint = tok.encode(prompt + response)
  assert tok.decode(joint[-1:]) == " answer"  # the merge we avoid
  [(ids, mask)] = _encode({"prompt": prompt, "response": response}, tok)
  assert tok.decode(ids) == prompt + response + tokenizers.EOT
  n = len(tok.encode(prompt))
  assert tok.decode(ids[:n]) == prompt and tok.decode(ids[n - 1:n]) == " "
  assert not mask[:n].any() and mask[n:].all()
  assert tok.decode(ids[mask][:-1]) == response
  # With a character tokenizer the space is one prompt token too.
  char = tokenizers.CharTokenizer.fit([prompt + response])
  [(ids, mask)] = _encode({"prompt": "a ", "response": "w"}, char)
  assert mask.tolist() == [F, F, T, T]


def test_an_empty_response_still_learns_to_stop():
  tok = tokenizers.CharTokenizer.fit(["ab"])
  [(ids, mask)] = _encode({"prompt": "ab", "response": ""}, tok)
  assert ids.tolist() == [0, 1, tok.eot_id] and mask.tolist() == [F, F, T]


def _sequences(records, tok, fmt="sft"):
  encoded = [pair for r in records for pair in _encode(r, tok, fmt)]
  starts = np.cumsum([0] + [len(ids) for ids, _ in encoded])
  return examples.Sequences(np.concatenate([ids for ids, _ in encoded]),
                            np.concatenate([m for _, m in encoded]), starts)


def test_an_example_longer_than_the_window_is_truncated_and_counted():
  """Cut to its first seq_len + 1 tokens (its end, the EOT included, is
  lost) and counted; one whose prompt alone fills the window has no target
  left and is dropped, and counted."""
  tok = tokenizers.CharTokenizer.fit(["abcdefghij0123456789+="])
  records = [{"prompt": "1+2=", "response": "3"},            # 6 tokens
             {"prompt": "ab", "response": "cdefghij"},        # 11 tokens
             {"prompt": "abcdefghij", "response": "1"}]       # 12, prompt 10
  source = loader.PackedSource(_sequences(records, tok), 8, "train",
                               pad_id=tok.eot_id, pack=False)
  assert (source.truncated, source.dropped, len(source)) == (2, 1, 2)
  long = source[1]
  assert tok.decode(long["tokens"]) == "abcdefghi"  # 9 = seq_len + 1
  assert long["weights"].tolist() == [0, 0] + [1] * 7
  assert "2 truncated to the window, 1 dropped" in source.describe()


def test_a_fitted_bpe_learns_from_the_training_examples_alone(tmp_path):
  """A word frequent only in the held-out file gets no merge."""
  write_jsonl(tmp_path / "train.jsonl",
              [{"prompt": "the king", "response": " the king"}] * 200)
  write_jsonl(tmp_path / "held.jsonl",
              [{"prompt": "zebraquux", "response": " zebraquux"}] * 200)
  made = examples.build([str(tmp_path / "*.jsonl")], str(tmp_path / "out"),
                        "sft", "bpe", holdout=("held",), vocab_size=300)
  assert len(made.tokenizer.encode(" king")) == 1
  assert len(made.tokenizer.encode(" zebraquux")) >= 8


def test_a_byte_order_mark_opens_an_examples_file(tmp_path):
  path = tmp_path / "bom.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps(
      {"prompt": "1+1=", "response": "2"}).encode() + b"\n")
  [(number, canonical, seqs)] = list(examples.read(str(path), "sft"))
  assert number == 1 and examples.texts(seqs[0]) == "1+1=2"


def test_a_copy_of_a_held_out_file_is_held_out(tmp_path):
  """Its records are the held-out file's, under another name; a record of
  the held-out file inside a training file stays a training record."""
  held = [{"prompt": "zebraquux", "response": " zebraquux"}] * 2
  write_jsonl(tmp_path / "train.jsonl",
              [{"prompt": "the king", "response": " the king"}] * 200 +
              held[:1])
  write_jsonl(tmp_path / "held.jsonl", held)
  write_jsonl(tmp_path / "copy_of_held.jsonl", held)
  made = examples.build([str(tmp_path / "*.jsonl")], str(tmp_path / "out"),
                        "sft", "bpe", holdout=("held",), vocab_size=300)
  assert made.meta["val_examples"] == 4 and made.meta["train_examples"] == 201


# ---------------------------------------------------------------- bad input

def test_bad_lines_name_file_and_line(tmp_path):
  good = {"prompt": "a", "response": "b"}
  cases = [("{not json", "not a JSON object"),
           ({"prompt": "a"}, "no string field 'response'"),
           ({"prompt": "a", "response": 3}, "field 'response' is a int"),
           ({"messages": [{"role": "robot", "content": "x"}]}, "message 0"),
           ({"messages": [{"role": "user", "content": "x"}]},
            "no assistant message"),
           ({"text": "plain"}, "no \"prompt\" and \"response\""),
           ([1, 2], "not a JSON object")]
  for i, (bad, words) in enumerate(cases):
    path = write_jsonl(tmp_path / f"bad{i}.jsonl", [good, "", good, bad])
    with pytest.raises(DataError) as e:
      examples.build([path], str(tmp_path / f"out{i}"), "sft", "char")
    assert str(e.value).startswith(f"{path}:4: ") and words in str(e.value)
    assert "\n" not in str(e.value)


def test_prepare_command_refuses_a_bad_line_in_one_line(tmp_path, capsys):
  path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "response": "b"},
                                            {"prompt": "a", "answer": "b"}])
  code = prepare.main(["--format", "sft", "--input", path, "--output",
                       str(tmp_path / "out"), "--tokenizer", "char"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1
  assert err[0].startswith(f"error: {path}:2: no string field 'response'")


def test_a_character_outside_the_vocabulary_is_one_line(tmp_path):
  path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "1+1=", "response": "2"},
                                            {"prompt": "1+1=", "response": "é"}])
  tok = tokenizers.CharTokenizer.fit(["0123456789+="])
  with pytest.raises(DataError) as e:
    examples.build([path], str(tmp_path / "out"), "sft", tok)
  assert str(e.value).startswith(
      f"{path}:2: character 'é' is not in the vocabulary of this character "
      "tokenizer (char tokenizer of 13 ids, the model's); remove or replace "
      "it")


def test_prepare_command_with_a_models_tokenizer(tmp_path, capsys):
  """--tokenizer-from a prepared corpus or a run's workdir: the examples get
  that tokenizer's ids, and training reads the directory."""
  model_dir = tmp_path / "run" / "tokenizer"
  tok = tokenizers.CharTokenizer.fit(["0123456789+= xyz"])
  tokenizers.save_dir(tok, str(model_dir))
  rng = np.random.default_rng(0)
  write_jsonl(tmp_path / "train.jsonl", sums(rng, 20))
  write_jsonl(tmp_path / "val.jsonl", sums(rng, 5))
  code = prepare.main(["--format", "sft", "--input", str(tmp_path / "train.jsonl"),
                       str(tmp_path / "val.jsonl"), "--holdout", "val",
                       "--output", str(tmp_path / "out"),
                       "--tokenizer-from", str(tmp_path / "run")])
  out = capsys.readouterr().out
  assert code == 0 and "20 + 5 examples" in out, out
  data = examples.load(str(tmp_path / "out"))
  assert tokenizers.same(data.tokenizer, tok)
  ids, mask = data.sequences("train").get(0)
  record = sums(np.random.default_rng(0), 1)[0]
  assert tok.decode(ids) == record["prompt"] + record["response"] + (
      tokenizers.CHAR_EOT)


def test_objective_fields_need_their_objective():
  from configs import base
  c = base.get_config()
  c.train.sft_loss_on = "all"
  with pytest.raises(ConfigError, match="train.sft_loss_on='all' applies to "
                     "train.objective='sft', not 'next-token'"):
    config_lib.validate(c)
  c.train.objective = "sft"
  config_lib.validate(c)
  c.train.objective = "dpo"
  with pytest.raises(ConfigError, match="train.sft_loss_on"):
    config_lib.validate(c)


# ---------------------------------------------------------------- packing

L = 32


@pytest.fixture(scope="module")
def packed():
  """Random sequences of 3-20 tokens, packed and one per window."""
  rng = np.random.default_rng(0)
  tok = tokenizers.ByteTokenizer()
  records = [{"prompt": "p" * int(rng.integers(1, 10)),
              "response": "r" * int(rng.integers(0, 10))} for _ in range(24)]
  seqs = _sequences(records, tok)
  seqs = examples.Sequences(
      rng.integers(0, 37, len(seqs.tokens)).astype(np.int32), seqs.targets,
      seqs.starts)  # ids of the tiny model's vocabulary
  make = lambda pack: loader.PackedSource(seqs, L, "train", pad_id=36,
                                          pack=pack)
  return seqs, make(True), make(False)


def test_packed_windows_hold_whole_sequences(packed):
  seqs, source, alone = packed
  assert len(alone) == len(seqs) and len(source) < len(seqs) / 2
  seen = []
  for i in range(len(source)):
    w = source[i]
    segments = w["segments"]
    assert (np.diff(segments[segments > 0]) >= 0).all()
    for s in range(1, segments.max() + 1):
      where = np.flatnonzero(segments == s)
      assert (np.diff(where) == 1).all()  # contiguous
      k = source.order[source.bounds[i] + s - 1]
      ids, targets = seqs.get(k)
      np.testing.assert_array_equal(w["tokens"][where], ids)
      np.testing.assert_array_equal(w["positions"][where], np.arange(len(ids)))
      want = targets.astype(np.int32)
      want[0] = 0
      np.testing.assert_array_equal(w["weights"][where], want)
      seen.append(k)
    pad = segments == 0
    assert (w["tokens"][pad] == 36).all() and not w["weights"][pad].any()
  assert sorted(seen) == list(range(len(seqs)))


def _batch(source):
  return loader.stack([source[i] for i in range(len(source))])


ATTENTIONS = {
    "learned": {},
    # Banded layers narrower than the window (their packed path scores
    # every key), rotary positions.
    "rope-banded": dict(position="rope", attention_pattern="dense,local",
                        local_window=8),
    "xla": dict(attention="xla", attention_pattern="dense,local",
                local_window=8),
}


@pytest.mark.parametrize("variant", sorted(ATTENTIONS))
def test_packed_loss_equals_unpacked_loss(packed, variant):
  """Segment ids keep each packed sequence's attention inside it and its
  positions restart, so the loss (and gradient) of packed windows is that
  of one sequence per window, to float round-off: 1e-5 relative, as the
  two batches' shapes differ and so do their programs (and, with local
  layers, their kernels: unpacked rows longer than a local window take the
  blocked banded kernel, packed ones a masked full one). Measured: up to
  4.8e-7 apart (one float32 step of a loss of 4); segments crossed move
  it by more than 1e-3."""
  _, source, alone = packed
  cfg = tiny_model_config(seq_len=L, **ATTENTIONS[variant])
  model, params = GPT(cfg), random_params(cfg, seed=1, std=0.2)

  def loss(batch):
    return objectives.sft_loss(model, params, batch, None,
                               objectives.sft_denominator(batch))[0]

  grad = jax.jit(jax.grad(lambda p, b: objectives.sft_loss(
      model, p, b, None, objectives.sft_denominator(b))[0]))
  one, two = _batch(source), _batch(alone)
  assert one["weights"].sum() == two["weights"].sum() > 50
  packed_loss, unpacked_loss = float(jax.jit(loss)(one)), float(
      jax.jit(loss)(two))
  assert packed_loss == pytest.approx(unpacked_loss, rel=1e-5)
  assert 2 < packed_loss < 6
  g1, g2 = grad(params, one), grad(params, two)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # Without segment ids the packed loss differs: the mask is what matters.
  crossed = dict(one, segments=np.ones_like(one["segments"]))
  assert abs(float(jax.jit(loss)(crossed)) - unpacked_loss) > 1e-3


def test_packed_logits_equal_the_sequence_alone(packed):
  _, source, alone = packed
  cfg = tiny_model_config(seq_len=L)
  model, params = GPT(cfg), random_params(cfg, seed=2, std=0.2)
  w = source[0]
  logits = objectives.apply(model, params, {k: v[None] for k, v in w.items()})
  for s in range(1, w["segments"].max() + 1):
    where = np.flatnonzero(w["segments"][:-1] == s)
    k = source.order[source.bounds[0] + s - 1]
    single = alone[int(np.flatnonzero(alone.order == k)[0])]
    own = objectives.apply(model, params,
                           {key: v[None] for key, v in single.items()})
    np.testing.assert_allclose(logits[0, where], own[0, :len(where)],
                               atol=1e-5)


def test_loss_on_every_token(packed):
  seqs, _, _ = packed
  source = loader.PackedSource(seqs, L, "train", loss_on="all")
  w = source[0]
  starts = np.flatnonzero(np.diff(w["segments"], prepend=0) > 0)
  assert not w["weights"][starts].any()
  real = w["segments"] > 0
  assert w["weights"].sum() == real.sum() - len(starts)


# ---------------------------------------------------------------- train.py

TINY = ("--config.model.num_layers=1", "--config.model.d_model=32",
        "--config.model.num_heads=2", "--config.model.seq_len=32",
        "--config.train.batch_size=4", "--config.train.warmup_steps=2",
        "--config.train.learning_rate=3e-3", "--config.train.log_every_steps=1",
        "--config.eval.every_steps=3", "--config.eval.batch_size=8",
        "--config.checkpoint.every_steps=3", "--config.sample.prompt=12+34=",
        "--config.sample.max_new_tokens=4", "--config.perf.peak_flops=1e12",
        "--config.data.holdout=('val',)")


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("sft")
  (root / "data").mkdir()
  rng = np.random.default_rng(1)
  chat = [{"messages": [{"role": "user", "content": f"{a}+{b}"},
                        {"role": "assistant", "content": str(a + b)}]}
          for a, b in rng.integers(0, 100, (20, 2)).tolist()]
  write_jsonl(root / "data" / "train.jsonl", sums(rng, 80) + chat)
  write_jsonl(root / "data" / "val.jsonl", sums(rng, 12))
  return root


def _ok(result):
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr


def sft_flags(root, *more):
  return (*TINY, "--config.train.objective=sft",
          f"--config.data.source={root / 'data'}", f"--config.data.cache_dir="
          f"{root / 'cache'}", *more)


def test_train_py_sft_checkpoints_and_resumes_exactly(sft_files):
  """A 6-step sft run; its checkpoint 6 removed, the same command replays
  steps 4-6 from checkpoint 3 with bitwise the same losses and evals."""
  workdir = str(sft_files / "run")
  flags = (*sft_flags(sft_files), "--config.train.steps=6",
           f"--workdir={workdir}")
  result = run_train_py(*flags)
  _ok(result)
  assert "sft examples; train: 100 sequences in" in result.stdout
  first = metrics_records(workdir)
  train = [r for r in first if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
  assert all(0 < r["target_tokens"] < 4 * 33 for r in train)
  evals = [r for r in first if "eval_loss" in r]
  assert [r["step"] for r in evals] == [3, 6]
  assert all(0 < r["eval_loss"] < 5 and r["eval_tokens"] > 0 for r in evals)
  with open(os.path.join(workdir, "data_order.jsonl")) as f:
    assert len(f.readlines()) == 6
  os.rename(os.path.join(workdir, "checkpoints", "6"),
            str(sft_files / "six"))
  result = run_train_py(*flags)
  _ok(result)
  assert "resuming from" in result.stdout
  second = metrics_records(workdir)
  key = lambda r: (r["step"], "eval_loss" in r)
  before = {key(r): r for r in first}
  assert [key(r) for r in second] == [key(r) for r in first]
  for r in second:
    for name in ("loss", "grad_norm", "learning_rate", "target_tokens",
                 "eval_loss"):
      if name in r:
        assert r[name] == before[key(r)][name], (r["step"], name)
  # The data-order audit recomputes every packed batch from the config.
  assert audit.main([workdir, "--recompute"]) == 0
  # The eval mode scores the response tokens of the held-out examples.
  result = run_train_py(f"--workdir={workdir}", "--mode=eval", "--json")
  _ok(result)
  scored = json.loads(result.stdout.strip().splitlines()[-1])
  assert scored["eval_loss"] == pytest.approx(evals[-1]["eval_loss"],
                                              abs=1e-4)


def test_train_py_sft_sharded_equals_one_device(sft_files):
  """4 devices (data 2 x fsdp 2) in 2 microbatches train the packed
  batches as one device does in one: the loss is summed over the targets
  of the whole global batch, whatever splits it."""
  losses = []
  for devices, more in ((1, ()), (4, ("--config.mesh.data=2",
                                      "--config.mesh.fsdp=2",
                                      "--config.train.grad_accum_steps=2"))):
    workdir = str(sft_files / f"mesh{devices}")
    _ok(run_train_py(*sft_flags(sft_files), "--config.train.steps=3",
                     "--config.train.batch_size=8", *more,
                     f"--workdir={workdir}", devices=devices))
    losses.append([r["loss"] for r in metrics_records(workdir) if "loss" in r])
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_a_character_run_on_examples_samples_after_a_held_out_prompt(
    tmp_path):
  """A character tokenizer fitted to sums has no newline: with the default
  sample.prompt ("\\n") the run samples after the first held-out prompt and
  says so; a prompt the user sets is still checked before training."""
  (tmp_path / "data").mkdir()
  rng = np.random.default_rng(3)
  write_jsonl(tmp_path / "data" / "train.jsonl", sums(rng, 40))
  val = sums(rng, 6)
  write_jsonl(tmp_path / "data" / "val.jsonl", val)
  flags = (*[f for f in TINY if not f.startswith("--config.sample.prompt")],
           "--config.train.objective=sft",
           f"--config.data.source={tmp_path / 'data'}",
           f"--config.data.cache_dir={tmp_path / 'cache'}")
  result = run_train_py(*flags, "--config.train.steps=3",
                        f"--workdir={tmp_path / 'run'}")
  _ok(result)
  first = val[0]["prompt"]
  assert ("sample.prompt: the default '\\n' is not in the vocabulary (char "
          f"tokenizer of 13 ids); sampling after the first held-out prompt "
          f"instead, {first!r}") in result.stdout
  assert result.stdout.split("--- sample (temperature 0.8) ---\n")[1] \
      .startswith(first)
  sample = run_train_py("--mode=sample", f"--workdir={tmp_path / 'run'}",
                        "--config.sample.temperature=0")
  _ok(sample)
  assert sample.stdout.startswith(first)
  chosen = run_train_py(*flags, "--config.sample.prompt=Q",
                        f"--workdir={tmp_path / 'chosen'}")
  assert chosen.returncode == 2
  assert chosen.stderr.strip().splitlines()[-1] == (
      "error: sample.prompt='Q': character 'Q' is not in the vocabulary of "
      "this character tokenizer")
  assert not os.path.exists(tmp_path / "chosen" / "config.json")


def test_train_py_refuses_bad_examples_in_one_line(sft_files, tmp_path):
  (tmp_path / "data").mkdir()
  bad = write_jsonl(tmp_path / "data" / "train.jsonl",
                    [{"prompt": "1+1=", "response": "2"}, "{oops"])
  write_jsonl(tmp_path / "data" / "val.jsonl",
              [{"prompt": "1+1=", "response": "2"}])
  result = run_train_py(*sft_flags(tmp_path), f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith(f"error: {bad}:2: not a JSON object")
  assert "Traceback" not in result.stderr
  # A text corpus's run cannot take sft examples' place, nor the reverse.
  wrong = run_train_py(*sft_flags(sft_files), "--config.train.objective=dpo",
                       f"--workdir={tmp_path / 'dpo'}")
  assert wrong.returncode == 2
  assert wrong.stderr.strip().splitlines()[-1].startswith(
      f"error: {sft_files / 'data' / 'train.jsonl'}:1: no string field "
      "'chosen'")
