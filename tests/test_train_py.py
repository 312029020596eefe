"""train.py end to end, as a user runs it: train, resume, eval, sample, and
one-line errors for bad input. Each run is a subprocess (~10 s or more)."""

import glob
import json
import math
import os
import re

import pytest

from conftest import (TINY_FLAGS, file_snapshot, metrics_records,
                      run_train_py)


def _check_ok(result):
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def trained(corpus_dir, tmp_path_factory):
  """A 6-step run (evals and checkpoints at 3 and 6) on the tiny corpus."""
  root = tmp_path_factory.mktemp("train_py")
  workdir = str(root / "run")
  flags = (*TINY_FLAGS, f"--config.data.source={corpus_dir}",
           f"--config.data.cache_dir={root / 'cache'}")
  result = run_train_py(*flags, "--config.train.steps=6",
                        f"--workdir={workdir}")
  _check_ok(result)
  return workdir, flags, result


def test_train_writes_metrics_checkpoints_and_samples(trained):
  workdir, _, result = trained
  # The overrides reached the model; the vocabulary is padded to 128.
  assert re.search(r"model: 1 layers x 32 x 2 heads, context 16, vocab \d+ "
                   r"\(padded to 128\)", result.stdout), result.stdout
  with open(os.path.join(workdir, "run.json")) as f:
    sizes = json.load(f)
  assert sizes["vocab_size"] < sizes["vocab_size_padded"] == 128
  assert sizes["params_padded"] - sizes["params"] == 32 * (
      128 - sizes["vocab_size"])
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["model"]["num_layers"] == 1 and saved["model"]["d_model"] == 32
  assert saved["data"]["holdout"] == ["hamlet"]
  meta = glob.glob(os.path.join(saved["data"]["cache_dir"], "prepared", "*",
                                "meta.json"))
  assert len(meta) == 1
  with open(meta[0]) as f:
    assert json.load(f)["documents"]["val"] == ["hamlet"]

  records = metrics_records(workdir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
  for r in train:
    assert r["loss"] > 0 and r["learning_rate"] >= 0
    assert r["tokens_seen"] == r["step"] * 4 * 16
  # Step 1 carries the compile-inclusive time, later steps the throughput.
  assert train[0]["first_step_time_s"] > 0 and "tokens_per_sec" not in train[0]
  assert train[1]["tokens_per_sec"] > 0 and train[1]["step_time_ms"] > 0
  lrs = [r["learning_rate"] for r in train]
  assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(2e-3)  # 2 warmup steps
  assert lrs[2] > lrs[3] > lrs[4] > lrs[5] >= 2e-4  # cosine to 0.1 * peak
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [3, 6]
  for r in evals:
    assert 0 < r["eval_loss"] < 10 and 0 < r["eval_bits_per_byte"] < 15
    assert r["eval_perplexity"] == pytest.approx(2.718281828 ** r["eval_loss"],
                                                 rel=1e-6)
  assert f"step 6: eval loss {evals[-1]['eval_loss']:.4f}" in result.stdout

  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  with open(os.path.join(workdir, "samples", "step_6.txt")) as f:
    sample = f.read()
  # The prompt and 20 characters, or fewer that end at end of text.
  assert sample.startswith("\n") and (
      len(sample) == 21 or len(sample) < 21 and sample.endswith("\u2403"))
  assert sample in result.stdout


def test_the_default_config_trains_its_recipe_through_a_bpe(corpus_dir,
                                                            tmp_path):
  """configs/default.py as `python train.py` runs it, at the tiny size: the
  recipe's model and optimizer on a BPE fitted to the training split."""
  workdir = str(tmp_path / "run")
  result = run_train_py("--config=configs/default.py", *TINY_FLAGS[1:],
                        f"--config.data.source={corpus_dir}",
                        f"--config.data.cache_dir={tmp_path / 'cache'}",
                        "--config.data.bpe_vocab_size=300",
                        "--config.train.steps=6", f"--workdir={workdir}")
  _check_ok(result)
  assert TINY_FLAGS[0] == "--config=configs/base.py"
  assert "vocab 300 (padded to 384)" in result.stdout, result.stdout
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert {k: saved["model"][k] for k in ("activation", "norm", "qk_norm",
                                         "tie_embeddings")} == {
      "activation": "relu2", "norm": "rmsnorm", "qk_norm": True,
      "tie_embeddings": False}
  assert saved["train"]["optimizer"] == "muon"
  assert saved["data"]["tokenizer"] == "bpe"
  losses = [r["loss"] for r in metrics_records(workdir) if "loss" in r]
  assert len(losses) == 6 and losses[-1] < losses[0]


def test_eval_mode(trained):
  workdir, _, _ = trained
  result = run_train_py(f"--workdir={workdir}", "--mode=eval")
  _check_ok(result)
  last = [r for r in metrics_records(workdir) if "eval_loss" in r][-1]
  match = re.search(r"step=(\d+) eval_loss=([\d.]+) .*eval_bits_per_byte=",
                    result.stdout)
  assert match, result.stdout
  assert int(match.group(1)) == last["step"]
  assert float(match.group(2)) == pytest.approx(last["eval_loss"], abs=1e-4)


def test_eval_json_on_another_corpus(trained, tmp_path):
  """Any corpus prepared with the model's tokenizer is scored; one with
  another tokenizer is refused."""
  workdir, flags, _ = trained
  with open(os.path.join(workdir, "config.json")) as f:
    source = json.load(f)["data"]["source"]
  result = run_train_py(f"--workdir={workdir}", "--mode=eval", "--json")
  _check_ok(result)
  own = json.loads(result.stdout.strip().splitlines()[-1])
  assert own["step"] == 6 and own["eval_tokens"] > 0
  assert own["eval_perplexity"] == pytest.approx(math.exp(own["eval_loss"]))
  other = run_train_py(f"--workdir={workdir}", "--mode=eval", "--json",
                       "--config.data.holdout=('lear',)")  # other val text
  _check_ok(other)
  scored = json.loads(other.stdout.strip().splitlines()[-1])
  assert scored["data"] != own["data"] and scored["eval_loss"] != own[
      "eval_loss"]
  byte = run_train_py(f"--workdir={workdir}", "--mode=eval",
                      "--config.data.tokenizer=byte", f"--config.data.source="
                      f"{source}", f"--config.data.cache_dir={tmp_path}")
  assert byte.returncode == 2, byte.stderr[-2000:]
  assert byte.stderr.strip().splitlines()[-1].startswith(
      f"error: the model of {workdir} uses a char tokenizer of ")


def test_modes_take_only_their_sections(trained):
  workdir, _, _ = trained
  result = run_train_py(f"--workdir={workdir}", "--mode=sample",
                        "--config.model.d_model=64")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --config.model.d_model=64 does not apply to --mode=sample: it "
      f"uses the run's model.d_model=32 ({workdir}/config.json); this mode "
      "takes sample.*, mesh.*, perf.* from the command line")
  same = run_train_py(f"--workdir={workdir}", "--mode=next",
                      "--config.model.d_model=32")  # the run's own value
  _check_ok(same)


def test_next_mode_lists_the_likeliest_tokens(trained, tmp_path):
  workdir, _, _ = trained
  prompt = tmp_path / "prompt.txt"
  prompt.write_text("the ki", encoding="utf-8")
  args = (f"--workdir={workdir}", "--mode=next",
          f"--config.sample.prompt_file={prompt}")
  table = run_train_py(*args)
  _check_ok(table)
  assert "after 'the ki':" in table.stdout
  assert re.search(r"^\s+1\s+0\.\d{4}\s+'.+'$", table.stdout, re.M)
  whole = run_train_py(*args, "--json", "--config.sample.top=34")
  _check_ok(whole)
  rows = json.loads(whole.stdout.strip().splitlines()[-1])
  probabilities = [r["probability"] for r in rows]
  assert [r["rank"] for r in rows] == list(range(1, 35))
  assert probabilities == sorted(probabilities, reverse=True)
  assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)  # all of them
  assert len({r["id"] for r in rows}) == 34


def test_sample_mode_streams_several_samples(trained):
  workdir, _, _ = trained
  result = run_train_py(f"--workdir={workdir}", "--mode=sample",
                        "--config.sample.num_samples=3",
                        "--config.sample.prompt=the king",
                        "--config.sample.max_new_tokens=10")
  _check_ok(result)
  parts = re.split(r"--- sample \d of 3 ---\n", result.stdout)
  assert len(parts) == 4 and all(p.startswith("the king") for p in parts[1:])
  assert len(set(parts[1:])) == 3  # each its own seed


def test_sample_mode_greedy(trained):
  workdir, _, _ = trained
  result = run_train_py(f"--workdir={workdir}", "--mode=sample",
                        "--config.sample.temperature=0",
                        "--config.sample.prompt=the king",
                        "--config.sample.max_new_tokens=12")
  _check_ok(result)
  lines = result.stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("the king"))
  # The prompt and 12 characters (which may include newlines).
  assert len("\n".join(lines[start:])) >= len("the king") + 12


def test_second_run_resumes(trained):
  workdir, flags, _ = trained
  before = metrics_records(workdir)
  result = run_train_py(*flags, "--config.train.steps=9",
                        f"--workdir={workdir}")
  _check_ok(result)
  out = result.stdout + result.stderr
  assert re.search(r"resuming from .*checkpoints at step 6", out), out[-2000:]
  records = metrics_records(workdir)
  assert records[:len(before)] == before  # nothing before step 6 rewritten
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 10))
  assert [r["step"] for r in records if "eval_loss" in r] == [3, 6, 9]
  assert records[-1]["step"] == 9
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")),
                key=int) == ["3", "6", "9"]
  assert os.path.exists(os.path.join(workdir, "samples", "step_9.txt"))


def test_bad_input_is_one_line_error(corpus_dir, tmp_path, trained):
  source = f"--config.data.source={corpus_dir}"
  cache = f"--config.data.cache_dir={tmp_path / 'cache'}"
  cases = {
      "heads": ([source, cache, "--config.model.d_model=30",
                 "--config.model.num_heads=4"],
                "model.d_model=30 is not divisible by model.num_heads=4"),
      "steps": ([source, cache, "--config.train.steps=0",
                 "--config.train.warmup_steps=0"],
                "train.steps=0 must be an integer >= 1"),
      "source": ([f"--config.data.source={tmp_path / 'missing'}", cache],
                 "is neither 'shakespeare' nor a directory"),
      "mesh": ([source, cache, "--config.mesh.data=2"],
               "mesh data*fsdp*tensor = 2*1*1 = 2 but there are 1 devices"),
      "processes": ([source, cache, "--num_processes=2", "--process_id=0"],
                    "num_processes=2 needs a coordinator address"),
      "unknown": ([source, cache, "--config.train.stepz=3"],
                  "unknown config field 'stepz'; Did you mean \"steps\""),
      "type": ([source, cache, "--config.train.steps=many"],
               "flag --config.train.steps=many: invalid literal for int()"),
      "lr": ([source, cache, "--config.train.learning_rate=0"],
             "train.learning_rate=0.0 must be a finite number > 0"),
      "config": (["--config=configs/nope.py"],
                 "--config=configs/nope.py: no such file"),
  }
  empty = tmp_path / "empty"
  empty.mkdir()
  procs = {name: run_train_py(*args, f"--workdir={tmp_path / name}",
                              wait=False)
           for name, (args, _) in cases.items()}
  # On 4 devices: layouts the mesh cannot split.
  for name, flags, message in (
      ("batch", ["--config.mesh.data=4", "--config.train.batch_size=6"],
       "train.batch_size=6 is not divisible by the data-parallel size 4"),
      ("tensor", ["--config.mesh.data=1", "--config.mesh.tensor=4",
                  "--config.model.num_heads=2"],
       "model.num_heads = 2 is not divisible by mesh.tensor=4"),
      ("mlp", ["--config.mesh.data=1", "--config.mesh.tensor=4",
               "--config.model.num_heads=4", "--config.model.d_ff=66"],
       "model.d_ff (the MLP width) = 66 is not divisible by mesh.tensor=4")):
    procs[name] = run_train_py(source, cache, *flags,
                               f"--workdir={tmp_path / name}", wait=False,
                               devices=4)
    cases[name] = (None, message)
  procs["eval"] = run_train_py(f"--workdir={empty}", "--mode=eval", wait=False)
  a_file = tmp_path / "a_file"
  a_file.write_text("keep me")
  procs["workdir"] = run_train_py(source, cache, f"--workdir={a_file}",
                                  wait=False)
  cases["workdir"] = (None, f"--workdir={a_file} is a file, not a directory")
  # Not writable even by root: sysfs takes no new files.
  procs["unwritable"] = run_train_py(source, cache,
                                     "--workdir=/sys/gpt_jax_test_run",
                                     wait=False)
  cases["unwritable"] = (None, "--workdir=/sys/gpt_jax_test_run is not "
                         "writable (/sys: ")
  cases["eval"] = (None, "holds no trained run (no config.json)")
  procs["prompt"] = run_train_py(f"--workdir={trained[0]}", "--mode=sample",
                                 "--config.sample.prompt=a§", wait=False)
  cases["prompt"] = (None, "sample.prompt='a§': character '§' is not in the "
                     "vocabulary")
  run_dir = trained[0]
  saved = {f: open(os.path.join(run_dir, f), "rb").read()
           for f in ("config.json", "metrics.jsonl")}
  checkpoints = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
  procs["mismatch"] = run_train_py(*trained[1], "--config.model.d_model=64",
                                   "--config.train.steps=20",
                                   f"--workdir={run_dir}", wait=False)
  cases["mismatch"] = (None, "does not match the model and optimizer of this "
                       "config")
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0, (name, stdout, stderr)
    assert "Traceback" not in stderr, (name, stderr)
    lines = stderr.strip().splitlines()
    assert [l for l in lines if "error" in l.lower()] == lines[-1:], (name,
                                                                    stderr)
    assert lines[-1].startswith("error: "), (name, stderr)
    assert cases[name][1] in lines[-1], (name, lines[-1])
    if name not in ("eval", "prompt", "mismatch", "workdir", "unwritable"):
      assert not os.path.exists(tmp_path / name)  # nothing written
  assert list(empty.iterdir()) == []
  assert a_file.read_text() == "keep me"
  for f, content in saved.items():  # the mismatched run damaged nothing
    assert open(os.path.join(run_dir, f), "rb").read() == content, f
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == checkpoints
  assert not os.path.exists(tmp_path / "cache" / "prepared") or not os.listdir(
      tmp_path / "cache" / "prepared")


def test_a_finished_run_is_left_alone(trained):
  """The command again, with new overrides but no more steps: it says the
  run is complete and changes no file of it."""
  workdir, flags, _ = trained
  step = max(map(int, os.listdir(os.path.join(workdir, "checkpoints"))))
  files = file_snapshot(workdir)
  result = run_train_py(*flags, f"--config.train.steps={step}",
                        "--config.train.learning_rate=0.01",
                        "--config.sample.temperature=0.5",
                        f"--workdir={workdir}")
  _check_ok(result)
  assert f"{workdir} is complete at step {step} (train.steps={step}); " \
      "nothing written" in result.stdout, result.stdout
  assert file_snapshot(workdir) == files


def test_bad_late_settings_stop_every_mode_before_anything_is_written(
    corpus_dir, tmp_path, trained):
  """Settings used only late (eval, sample, checkpoint, logging) and a
  damaged prepared directory: one line and status 2 at the start, before
  the workdir (config.json, checkpoints) exists; in eval and sample modes
  the run's files stay as they were."""
  from data import prepare, store
  damaged = tmp_path / "prepared"
  prepare.build([corpus_dir], str(damaged), prepare.Options(
      tokenizer="char", holdout=("hamlet",)))
  meta = damaged / store.META
  meta.write_text(meta.read_text()[:100])
  base = trained[1]
  cases = {
      "eval_batch": (["--config.eval.batch_size=0"],
                     "eval.batch_size=0 must be an integer >= 1"),
      "max_batches": (["--config.eval.max_batches=-1"],
                      "eval.max_batches=-1 must be an integer >= 0"),
      "new_tokens": (["--config.sample.max_new_tokens=0"],
                     "sample.max_new_tokens=0 must be an integer >= 1"),
      "top_k": (["--config.sample.top_k=500"],
                "sample.top_k=500 exceeds the vocabulary of "),
      "prompt": (["--config.sample.prompt=a§"],
                 "sample.prompt='a§': character '§' is not in the vocabulary"),
      "keep": (["--config.checkpoint.keep=0"],
               "checkpoint.keep=0 must be an integer >= 1"),
      "log_every": (["--config.train.log_every_steps=0"],
                    "train.log_every_steps=0 must be an integer >= 1"),
      "meta": ([f"--config.data.source={damaged}"],
               f"{meta} is damaged ("),
  }
  procs = {name: run_train_py(*base, *args, "--config.train.steps=6",
                              f"--workdir={tmp_path / name}", wait=False)
           for name, (args, _) in cases.items()}
  run_dir = trained[0]
  files = file_snapshot(run_dir)
  for mode, flag, message in (
      ("eval", "--config.eval.batch_size=0", cases["eval_batch"][1]),
      ("sample", "--config.sample.top_k=-1",
       "sample.top_k=-1 must be an integer >= 0")):
    procs[mode] = run_train_py(f"--mode={mode}", flag, f"--workdir={run_dir}",
                               wait=False)
    cases[mode] = (None, message)
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, (name, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: " + cases[name][1]), (name, stderr)
    assert [l for l in lines if "error" in l.lower()] == lines[-1:], name
    assert not (tmp_path / name).exists(), name
  assert file_snapshot(run_dir) == files
