"""Preference tuning (DPO): the formula against numpy, ln 2 at step 0, the
pairs' layout, and train.py runs from an sft run's params that keep their
reference, resume exactly and shard."""

import json
import math
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (last_logged_step, metrics_records, random_params,
                      run_train_py, tiny_model_config)
from data import examples, loader, tokenizers
from model import GPT
from test_sft import TINY, write_jsonl
from trainer import audit, objectives

L = 16


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_dpo(logp_c, logp_r, ref_c, ref_r, beta):
  """Rafailov et al. (2023), eq. 7, in float64: the loss per pair, and
  the implicit rewards beta * log(pi / pi_ref) of each side."""
  chosen, rejected = beta * (logp_c - ref_c), beta * (logp_r - ref_r)
  margin = chosen - rejected
  return np.log1p(np.exp(-margin)), chosen, rejected


# Summed log-probabilities of four pairs: policy chosen, policy rejected,
# reference chosen, reference rejected.
FIXTURE = np.array([[-12.25, -14.5, -13.0, -13.75],
                    [-3.125, -2.0, -3.5, -2.25],
                    [-40.0, -55.5, -41.25, -50.0],
                    [-7.75, -7.75, -7.75, -7.75]])


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_formula_matches_numpy_on_a_fixture(beta):
  c, r, cr, rr = FIXTURE.T
  loss, rewards, margin = objectives.dpo_from_logps(
      np.stack([c, r], 1).astype(np.float32),
      np.stack([cr, rr], 1).astype(np.float32), beta)
  want, chosen, rejected = numpy_dpo(c, r, cr, rr, beta)
  np.testing.assert_allclose(loss, want, atol=1e-6)
  np.testing.assert_allclose(rewards, np.stack([chosen, rejected], 1),
                             atol=1e-6)
  np.testing.assert_allclose(margin, chosen - rejected, atol=1e-6)
  assert loss[-1] == pytest.approx(math.log(2), abs=1e-7)


def _pairs(seed=0, n=6):
  """A PairSource of random prompt/chosen/rejected ids in the tiny
  model's vocabulary of 37 (EOT: 36)."""
  rng = np.random.default_rng(seed)
  tokens, targets, starts = [], [], [0]
  for _ in range(n):
    prompt = rng.integers(0, 36, rng.integers(1, 6))
    for side in range(2):
      answer = rng.integers(0, 36, rng.integers(0, 7))
      ids = np.concatenate([prompt, answer, [36]]).astype(np.int32)
      mask = np.r_[np.zeros(len(prompt), bool), np.ones(len(answer) + 1, bool)]
      tokens.append(ids)
      targets.append(mask)
      starts.append(starts[-1] + len(ids))
  seqs = examples.Sequences(np.concatenate(tokens), np.concatenate(targets),
                            np.array(starts))
  return seqs, loader.PairSource(seqs, L, "train", pad_id=36)


def test_pairs_layout():
  seqs, source = _pairs()
  assert len(source) == 6 and source.truncated == source.dropped == 0
  item = source[2]
  assert item["tokens"].shape == item["weights"].shape == (2, L + 1)
  for row in range(2):
    ids, mask = seqs.get(4 + row)
    n = len(ids)
    np.testing.assert_array_equal(item["tokens"][row, :n], ids)
    assert (item["tokens"][row, n:] == 36).all()
    np.testing.assert_array_equal(item["weights"][row, :n], mask)
    assert not item["weights"][row, n:].any()


def test_pairs_longer_than_the_window_are_truncated_and_counted():
  tok = tokenizers.CharTokenizer.fit(["abcdefghijklmnopqrstuvwxyz"])
  pieces = [examples.pieces(r, "dpo") for r in (
      {"prompt": "ab", "chosen": "c", "rejected": "d"},
      {"prompt": "ab", "chosen": "cdefghijklmnop", "rejected": "d"},
      {"prompt": "abcdefghijklmnopqrstuvwxyz", "chosen": "c",
       "rejected": "d"})]
  encoded = [examples.encode(seq, tok) for pair in pieces for seq in pair]
  seqs = examples.Sequences(
      np.concatenate([i for i, _ in encoded]),
      np.concatenate([m for _, m in encoded]),
      np.cumsum([0] + [len(i) for i, _ in encoded]))
  source = loader.PairSource(seqs, 8, "train", pad_id=tok.eot_id)
  assert (source.truncated, source.dropped, len(source)) == (2, 1, 2)
  assert tok.decode(source[1]["tokens"][0]) == "abcdefghi"


def _batch(source):
  return loader.stack([source[i] for i in range(len(source))])


def test_loss_is_ln2_at_step_0():
  """With the policy equal to its reference every reward is 0: the loss is
  ln 2, the KL 0, and no pair counts as won."""
  _, source = _pairs()
  cfg = tiny_model_config(seq_len=L)
  model, params = GPT(cfg), random_params(cfg, seed=1, std=0.2)
  # The reference a copy, another argument: its forward pass is not merged
  # with the policy's by the compiler, and the values are exactly 0 all the
  # same (the policy's log-probabilities stand for the equal reference's).
  reference = jax.tree.map(np.array, params)
  loss, metrics = jax.jit(lambda p, r, b: objectives.dpo_loss(
      model, p, b, r, 0.1))(params, reference, _batch(source))
  assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
  for name in ("reward_chosen", "reward_rejected", "reward_margin",
               "reward_accuracy", "kl_ref", "kl_ref_chosen",
               "kl_ref_rejected"):
    assert float(metrics[name]) == 0, name
  # The gradient is DPO's at a zero margin: -beta / 2 times that of the
  # chosen minus the rejected log-probability, mean over the pairs.
  batch = _batch(source)
  grads = jax.jit(jax.grad(lambda p, r: objectives.dpo_loss(
      model, p, batch, r, 0.1)[0]))(params, reference)

  def margin(p):
    flat = {k: v.reshape(-1, L + 1) for k, v in batch.items()}
    logp_2B, _ = objectives.sequence_logps(
        objectives.apply(model, p, flat), flat["tokens"], flat["weights"])
    return -0.05 * jnp.mean(logp_2B[0::2] - logp_2B[1::2])

  want = jax.jit(jax.grad(margin))(params)
  assert sum(float(np.abs(g).sum()) for g in jax.tree.leaves(want)) > 0
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4,
                                                       atol=1e-7),
               grads, want)


def test_loss_and_metrics_match_numpy_from_the_logits():
  """The whole objective, from the model's logits on, against a float64
  numpy implementation: summed log-probabilities of the weighted targets,
  eq. 7, rewards and the per-token KL to the reference."""
  _, source = _pairs(seed=3, n=8)
  batch = _batch(source)
  cfg = tiny_model_config(seq_len=L)
  model = GPT(cfg)
  params, ref = (random_params(cfg, seed=s, std=0.3) for s in (4, 5))
  beta = 0.25
  loss, metrics = jax.jit(lambda p, r, b: objectives.dpo_loss(
      model, p, b, r, beta))(params, ref, batch)

  flat = {k: v.reshape(-1, L + 1) for k, v in batch.items()}
  logits = lambda p: np.asarray(model.apply({"params": p},
                                            flat["tokens"][:, :-1]),
                                np.float64)[..., :cfg.vocab_size]
  logp, ref_logp = _log_softmax(logits(params)), _log_softmax(logits(ref))
  targets, weights = flat["tokens"][:, 1:], flat["weights"][:, 1:]
  pick = lambda lp: np.take_along_axis(lp, targets[..., None], -1)[..., 0]
  seq, ref_seq = ((pick(lp) * weights).sum(1).reshape(-1, 2)
                  for lp in (logp, ref_logp))
  want, chosen, rejected = numpy_dpo(seq[:, 0], seq[:, 1], ref_seq[:, 0],
                                     ref_seq[:, 1], beta)
  kl = (np.exp(logp) * (logp - ref_logp)).sum(-1)
  assert float(loss) == pytest.approx(want.mean(), abs=1e-6)
  assert float(loss) != pytest.approx(math.log(2), abs=1e-3)
  expected = {"reward_chosen": chosen.mean(), "reward_rejected": rejected.mean(),
              "reward_margin": (chosen - rejected).mean(),
              "reward_accuracy": (chosen > rejected).mean(),
              "kl_ref": (kl * weights).sum() / weights.sum(),
              "kl_ref_chosen": (kl * weights)[0::2].sum() / weights[0::2].sum(),
              "kl_ref_rejected": (kl * weights)[1::2].sum()
                                 / weights[1::2].sum()}
  for name, value in expected.items():
    assert float(metrics[name]) == pytest.approx(value, rel=1e-5, abs=1e-6), name
  # The gradient reaches the policy only.
  grads = jax.grad(lambda p, r: objectives.dpo_loss(
      model, p, batch, r, beta)[0], argnums=(0, 1))(params, ref)
  assert sum(float(np.abs(g).sum()) for g in jax.tree.leaves(grads[0])) > 0
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads[1]))


def test_eval_sums_agree_with_the_loss():
  _, source = _pairs(seed=3, n=8)
  batch = _batch(source)
  cfg = tiny_model_config(seq_len=L)
  model = GPT(cfg)
  params, ref = (random_params(cfg, seed=s, std=0.3) for s in (4, 5))
  mask = np.arange(8) < 6  # two padded pairs
  sums = objectives.dpo_eval(model, params, batch, mask, ref, 0.25)
  kept = {k: v[:6] for k, v in batch.items()}
  loss, metrics = objectives.dpo_loss(model, params, kept, ref, 0.25)
  record = objectives.summarize("dpo", jax.device_get(sums))
  assert record["eval_pairs"] == 6
  assert record["eval_loss"] == pytest.approx(float(loss), rel=1e-5)
  assert record["eval_reward_accuracy"] == pytest.approx(
      float(metrics["reward_accuracy"]))
  for name in ("kl_ref", "kl_ref_chosen", "kl_ref_rejected"):
    assert record[f"eval_{name}"] == pytest.approx(float(metrics[name]),
                                                   rel=1e-5)


def test_grad_accumulation_leaves_the_metrics_unchanged():
  """A step's metrics are the global batch's however it is split into
  microbatches: the per-token KL too, although the microbatches' responses
  differ in length (each microbatch divides its KL sums by the whole batch's
  target counts)."""
  import flax.linen as nn
  from conftest import tiny_config
  from trainer import run as run_lib, sharding
  from trainer import state as state_lib
  _, source = _pairs(seed=3, n=8)
  batch = _batch(source)
  config = tiny_config(objective="dpo", batch_size=8)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model, tx, rules, shardings = run_lib.model_and_optimizer(config, 37, mesh)
  ref = random_params(model.cfg, seed=5, std=0.3)
  logged = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for accum in (1, 2, 4):
      state = state_lib.init_state(model, tx, shardings, seed=0)
      step = state_lib.make_train_step(model, tx, shardings,
                                       grad_accum_steps=accum, seed=0,
                                       objective="dpo", dpo_beta=0.1)
      logged.append(jax.device_get(step(state, batch, ref)[1]))
  assert logged[0]["kl_ref"] > 0.01
  for metrics in logged[1:]:
    for name, value in logged[0].items():
      assert float(metrics[name]) == pytest.approx(float(value), rel=1e-5,
                                                   abs=1e-7), name


def test_prepare_command_fits_a_bpe_to_pairs(tmp_path, capsys):
  from data import prepare
  pairs = [{"prompt": f"Q{i}: which? ", "chosen": "the right one",
            "rejected": "the wrong one"} for i in range(40)]
  path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
  assert prepare.main(["--format", "dpo", "--input", path, "--output",
                       str(tmp_path / "out"), "--tokenizer", "bpe",
                       "--vocab-size", "300", "--val-fraction", "0.25"]) == 0
  out = capsys.readouterr().out
  data = examples.load(str(tmp_path / "out"))
  assert data.tokenizer.kind == "bpe" and data.tokenizer.vocab_size <= 300
  meta = data.meta
  assert meta["train_examples"] + meta["val_examples"] == 40, out
  seqs = data.sequences("train")
  assert len(seqs) == 2 * meta["train_examples"]
  chosen, mask = seqs.get(0)
  assert data.tokenizer.decode(chosen[mask]) == (
      "the right one" + tokenizers.EOT)


# ---------------------------------------------------------------- train.py

def _ok(result):
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An sft run on sums (the base), and dpo pairs: the right sum chosen,
  one off rejected."""
  root = tmp_path_factory.mktemp("dpo")
  for d in ("sft", "dpo"):
    (root / d).mkdir()
  rng = np.random.default_rng(2)
  ab = rng.integers(0, 100, (70, 2)).tolist()
  write_jsonl(root / "sft" / "train.jsonl", [
      {"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in ab[:50]])
  write_jsonl(root / "sft" / "val.jsonl", [
      {"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in ab[50:]])
  pairs = [{"prompt": f"{a}+{b}=", "chosen": str(a + b),
            "rejected": str(a + b + 1)} for a, b in ab]
  write_jsonl(root / "dpo" / "train.jsonl", pairs[:56])
  write_jsonl(root / "dpo" / "val.jsonl", pairs[56:])
  base = str(root / "base")
  _ok(run_train_py(*TINY, "--config.train.objective=sft",
                   f"--config.data.source={root / 'sft'}",
                   f"--config.data.cache_dir={root / 'cache'}",
                   "--config.train.steps=3", f"--workdir={base}"))
  return root, base


def dpo_flags(root, base, *more):
  return (*TINY, "--config.train.objective=dpo",
          f"--config.data.source={root / 'dpo'}",
          f"--config.data.cache_dir={root / 'cache'}",
          f"--config.checkpoint.init_from={base}", *more)


def _params(workdir):
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints")
  step = max(int(s) for s in os.listdir(path) if s.isdigit())
  with ocp.CheckpointManager(path) as m:
    state = m.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore())).state
  return state["params"]


def test_train_py_dpo_from_an_sft_run_resumes_exactly(runs):
  """Starts at ln 2 from the sft run's params, which it keeps as its
  reference (<workdir>/reference); logs rewards, their margin, accuracy and
  the KL; its checkpoint 6 removed, the same command replays steps 4-6
  bitwise; --mode=eval scores the held-out pairs against the reference;
  without its reference a resume stops in one line."""
  root, base = runs
  workdir = str(root / "run")
  flags = (*dpo_flags(root, base), "--config.train.steps=6",
           f"--workdir={workdir}")
  result = run_train_py(*flags)
  _ok(result)
  assert f"starting from the parameters of {base}/checkpoints/3" in (
      result.stdout)
  assert "batch 4 x 2 x 32 tokens (a chosen and a rejected sequence)" in (
      result.stdout)
  first = metrics_records(workdir)
  train = [r for r in first if "loss" in r]
  assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert train[0]["kl_ref"] == 0 and train[0]["reward_margin"] == 0
  assert train[-1]["kl_ref"] > 0 and train[-1]["tokens_seen"] == 6 * 4 * 2 * 32
  for name in ("reward_chosen", "reward_rejected", "reward_margin",
               "reward_accuracy", "kl_ref", "kl_ref_chosen",
               "kl_ref_rejected"):
    assert all(name in r for r in train), name
  # FLOPs: 6 N per token for the policy, 2 N for the reference's forward.
  with open(os.path.join(workdir, "run.json")) as f:
    info = json.load(f)
  assert info["flops_per_token"] == 8 * info["params_non_embedding"]
  timed = [r for r in train if "mfu" in r]
  assert timed and all(r["mfu"] == pytest.approx(
      info["flops_per_token"] * info["tokens_per_step"] * 1e3 /
      r["step_time_ms"] / 1e12, rel=1e-9) for r in timed)
  evals = [r for r in first if "eval_loss" in r]
  assert [r["step"] for r in evals] == [3, 6]
  assert all(r["eval_pairs"] == 14 and 0 <= r["eval_reward_accuracy"] <= 1
             for r in evals)
  assert "reward accuracy" in result.stdout
  reference = _params(os.path.join(workdir, "reference"))
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(_params(base))):
    np.testing.assert_array_equal(a, b)

  shutil.move(os.path.join(workdir, "checkpoints", "6"), str(root / "six"))
  result = run_train_py(*flags)
  _ok(result)
  second = metrics_records(workdir)
  key = lambda r: (r["step"], "eval_loss" in r)
  before = {key(r): r for r in first}
  assert [key(r) for r in second] == [key(r) for r in first]
  for r in second:
    for name, value in r.items():
      if "time" not in name and "per_sec" not in name and name not in (
          "mfu", "data_wait_ms"):
        assert value == before[key(r)][name], (r["step"], name)

  assert audit.main([workdir, "--recompute"]) == 0  # replays included
  result = run_train_py(f"--workdir={workdir}", "--mode=eval", "--json")
  _ok(result)
  scored = json.loads(result.stdout.strip().splitlines()[-1])
  assert scored["eval_reward_accuracy"] == pytest.approx(
      evals[-1]["eval_reward_accuracy"])
  assert scored["eval_kl_ref"] == pytest.approx(evals[-1]["eval_kl_ref"],
                                                rel=1e-4)

  shutil.move(os.path.join(workdir, "checkpoints", "6"), str(root / "six2"))
  shutil.move(os.path.join(workdir, "reference"), str(root / "ref"))
  result = run_train_py(*flags)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"error: the dpo reference params of {workdir} are missing")


def test_train_py_dpo_sharded_equals_one_device(runs):
  """fsdp 2 x tensor 2: the reference is sharded like the params."""
  root, base = runs
  losses = []
  for devices, mesh in ((1, ()), (4, ("--config.mesh.fsdp=2",
                                      "--config.mesh.tensor=2"))):
    workdir = str(root / f"mesh{devices}")
    _ok(run_train_py(*dpo_flags(root, base), "--config.train.steps=3",
                     *mesh, f"--workdir={workdir}", devices=devices))
    losses.append([(r["loss"], r["kl_ref"]) for r in
                   metrics_records(workdir) if "loss" in r])
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5, atol=1e-7)


def test_train_py_dpo_sigterm_saves_and_resumes_as_if_never_stopped(runs):
  """SIGTERM mid-run: the current step is saved, exit 75; the same command
  resumes (its reference read back) and logs the losses and KL of a run
  that never stopped, bitwise."""
  root, base = runs
  flags = (*dpo_flags(root, base), "--config.train.steps=12",
           "--config.checkpoint.every_steps=100", "--config.eval.every_steps=100")
  whole = str(root / "whole")
  _ok(run_train_py(*flags, f"--workdir={whole}"))
  workdir, log = str(root / "stopped"), str(root / "stopped.log")
  proc = run_train_py(*flags, f"--workdir={workdir}", wait=False, log=log)
  deadline = time.time() + 300
  while proc.poll() is None and last_logged_step(workdir) < 3 and (
      time.time() < deadline):
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 75, open(log).read()[-3000:]
  stopped = sorted(int(s) for s in os.listdir(os.path.join(workdir,
                                                           "checkpoints")))
  assert len(stopped) == 1 and 3 <= stopped[0] < 12
  _ok(run_train_py(*flags, f"--workdir={workdir}"))
  series = lambda w: [(r["step"], r["loss"], r["kl_ref"], r["reward_margin"])
                      for r in metrics_records(w) if "loss" in r]
  assert series(workdir) == series(whole)
