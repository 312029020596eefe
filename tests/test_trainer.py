"""Train / eval steps, config checks, run building, exact resume, sampling."""

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (metrics_records, random_params, tiny_config,
                      tiny_model_config, tiny_run_config, train_steps)
from data import loader
from model import (GPT, GPTConfig, generate, generate_uncached,
                   window_start)
from model.sampling import sample_next
from trainer import config as config_lib, loop, run as run_lib, saved_config
from trainer import state as state_lib
from trainer.errors import ConfigError

L = 16


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _nats(logits, targets):
  """Per-token cross entropy in float64."""
  return -np.take_along_axis(_log_softmax(logits), np.asarray(targets)[..., None],
                             -1)[..., 0]


# ---------------------------------------------------------------- config

def test_model_config_vocab():
  config = tiny_config()
  assert config_lib.model_config(config, 65).vocab_size == 65
  config.model.vocab_size = 80
  assert config_lib.model_config(config, 65).vocab_size == 80
  with pytest.raises(ConfigError, match="model.vocab_size=80 is smaller than "
                     "the tokenizer's 256"):
    config_lib.model_config(config, 256)


# ---------------------------------------------------------------- steps

def _seeded_losses(seed, steps=3):
  """Losses of a fresh model (init seed) on batches drawn with that seed."""
  tokens = np.random.default_rng(0).integers(0, 37, 40 * L + 1)
  batches = loader.train_iterator(loader.WindowSource(tokens, L, "t"), 4, seed)
  losses, _, state = train_steps(tiny_config(),
                                 [next(batches)[0] for _ in range(steps)],
                                 seed=seed)
  return losses, jax.device_get(state.params)


def test_same_seed_same_losses_different_seed_differs():
  losses, params = _seeded_losses(seed=0)
  again, params_again = _seeded_losses(seed=0)
  assert losses == again  # bitwise
  jax.tree.map(np.testing.assert_array_equal, params, params_again)
  other, _ = _seeded_losses(seed=1)
  assert all(a != b for a, b in zip(losses, other))
  assert all(abs(x - math.log(37)) < 0.2 for x in losses + other)


def test_nonfinite_updates_are_skipped_up_to_the_limit():
  """With train.skip_nonfinite_updates=2, NaN gradients leave the state as it
  was twice and are counted; the third in a row is applied."""
  import flax.linen as nn
  from trainer import sharding
  config = tiny_config(skip_nonfinite_updates=2)
  mesh = sharding.make_mesh(config.mesh)
  model, tx, rules, shardings = run_lib.model_and_optimizer(config, 37, mesh)
  batch = np.random.default_rng(3).integers(0, 37, (4, L + 1)).astype(np.int32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = state_lib.init_state(model, tx, shardings, seed=0)
    poisoned = jax.tree.map(lambda x: x, state.params)
    poisoned["ln_f"]["scale"] = state.params["ln_f"]["scale"] * jnp.nan
    state = state.replace(params=poisoned)
    before = jax.device_get(state.params)
    step = state_lib.make_train_step(model, tx, shardings, grad_accum_steps=1,
                                     seed=0)
    for expected in (1, 2):
      state, metrics = step(state, batch)
      assert np.isnan(float(metrics["loss"]))
      assert int(metrics["skipped_updates"]) == expected
      assert int(metrics["nonfinite_streak"]) == expected
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
                   before)
    state, metrics = step(state, batch)  # past the limit: applied
    assert np.isnan(jax.device_get(state.params["wpe"])).all()


def test_grad_accumulation_matches_one_big_batch():
  batch = np.random.default_rng(2).integers(0, 37, (4, L + 1)).astype(np.int32)
  config = tiny_config()
  one = train_steps(config, [batch], seed=1)
  two = train_steps(config, [batch], seed=1, grad_accum_steps=2)
  assert one[0][0] == pytest.approx(two[0][0], rel=1e-5)  # loss
  assert one[1][0] == pytest.approx(two[1][0], rel=1e-4)  # gradient norm
  assert one[1][0] > 0


def test_eval_step_sums_with_padding_mask():
  cfg = tiny_model_config()
  model = GPT(cfg)
  params = random_params(cfg, seed=3, std=0.1)
  rng = np.random.default_rng(4)
  tokens = rng.integers(0, 37, (3, L + 1)).astype(np.int32)
  mask = np.array([True, True, False])  # the third row is padding
  token_bytes = rng.integers(1, 5, 37).astype(np.int32)
  sums = state_lib.make_eval_step(model)(params, tokens, mask, token_bytes)
  nats, count, num_bytes = np.asarray(sums, np.float64)
  logits = jax.jit(model.apply)({"params": params}, tokens[:, :-1])
  per_token = _nats(logits, tokens[:, 1:])
  assert count == 2 * L
  assert num_bytes == token_bytes[tokens[:2, 1:]].sum()
  assert nats == pytest.approx(per_token[:2].sum(), rel=1e-5)
  assert per_token.sum() - per_token[:2].sum() > 1  # the mask matters


# ---------------------------------------------------------------- runs

def test_build_applies_config_and_eval_bits_per_byte(corpus_dir, data_cache,
                                                     tmp_path):
  config = tiny_run_config(corpus_dir, data_cache, steps=6)
  run = run_lib.build(config, str(tmp_path / "run"))
  try:
    vocab = run.data.meta["vocab_size"]
    assert run.model.cfg == GPTConfig(vocab_size=vocab, num_layers=1,
                                      d_model=32, num_heads=2, seq_len=16,
                                      vocab_multiple=128)
    assert vocab == len(run.data.tokenizer.chars)
    assert run.data.meta["documents"]["val"] == ["hamlet"]
    with run.context():
      params = state_lib.init_state(run.model, run.tx, run.shardings, 0).params
      result = run_lib.evaluate_params(run, params, max_batches=0)
      partial = run_lib.evaluate_params(run, params, max_batches=2)
  finally:
    run.checkpointer.close()

  val = np.asarray(run.data.tokens("val"))
  n = (len(val) - 1) // L
  windows = np.stack([val[i * L:(i + 1) * L + 1] for i in range(n)]).astype(
      np.int32)
  logits = jax.jit(run.model.apply)({"params": params}, windows[:, :-1])
  nats = _nats(logits, windows[:, 1:]).sum()
  tokenizer = run.data.tokenizer
  num_bytes = len(tokenizer.decode(val[1:n * L + 1]).encode("utf-8"))
  assert num_bytes > n * L  # the corpus has multi-byte characters
  assert result["eval_tokens"] == n * L
  assert result["eval_loss"] == pytest.approx(nats / (n * L), rel=1e-5)
  assert result["eval_perplexity"] == pytest.approx(math.exp(nats / (n * L)),
                                                    rel=1e-5)
  assert result["eval_bits_per_byte"] == pytest.approx(
      nats / num_bytes / math.log(2), rel=1e-5)
  assert partial["eval_tokens"] == 2 * config.eval.batch_size * L


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(corpus_dir, data_cache, tmp_path, optimizer):
  """Steps 4-6 replayed from the step-3 checkpoint (state and data iterator)
  give bitwise the same losses as the uninterrupted run, with either
  optimizer's state; a warmup longer than the run is capped to a fifth of
  it in both, as config.json says."""
  config = tiny_run_config(corpus_dir, data_cache, steps=6)
  config.train.warmup_steps = 50
  config.train.optimizer = optimizer
  workdir = str(tmp_path / "run")
  loop.train(config, workdir)
  first = metrics_records(workdir)
  assert saved_config.load_saved(workdir).train.warmup_steps == 1
  peak = config.train.learning_rate
  assert [r["learning_rate"] for r in first if "loss" in r][:2] == [
      0, pytest.approx(peak)]
  with open(os.path.join(workdir, "samples", "step_6.txt")) as f:
    first_sample = f.read()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  loop.train(config, workdir)
  second = metrics_records(workdir)
  assert [r["step"] for r in second if "loss" in r] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in second if "eval_loss" in r] == [3, 6]
  key = lambda r: (r["step"], "eval_loss" in r)
  before = {key(r): r for r in first}
  for r in second:
    for name in ("loss", "grad_norm", "learning_rate", "eval_loss"):
      if name in r:
        assert r[name] == before[key(r)][name], (r["step"], name)
  with open(os.path.join(workdir, "samples", "step_6.txt")) as f:
    assert f.read() == first_sample


# ---------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def sampler():
  cfg = tiny_model_config(seq_len=8)
  return GPT(cfg), random_params(cfg, seed=5, std=0.3)


def _greedy_by_hand(model, params, prompt, n):
  """Argmax continuation with repeated model.apply over the window that
  window_start gives (right-padded to seq_len: the model is causal)."""
  W = model.cfg.seq_len
  apply = jax.jit(lambda ctx: model.apply({"params": params}, ctx))
  buf = np.asarray(prompt)
  for _ in range(n):
    ctx = buf[:, window_start(buf.shape[1], W):]
    padded = np.zeros((buf.shape[0], W), np.int32)
    padded[:, :ctx.shape[1]] = ctx
    logits = np.asarray(apply(padded))[:, ctx.shape[1] - 1]
    buf = np.concatenate([buf, logits.argmax(-1)[:, None]], axis=1)
  return buf


@pytest.mark.parametrize("sampler_fn", [generate, generate_uncached],
                         ids=["cached", "uncached"])
def test_greedy_generation_matches_hand_argmax(sampler, sampler_fn):
  model, params = sampler
  prompt = np.random.default_rng(6).integers(0, 37, (2, 3)).astype(np.int32)
  n = 10  # 3 + 10 > seq_len 8: the window restarts
  out = np.stack(sampler_fn(model, params, prompt, jax.random.key(0),
                            max_new_tokens=n, temperature=0.0))
  assert out.shape == (2, 13)
  np.testing.assert_array_equal(out[:, :3], prompt)
  expected = _greedy_by_hand(model, params, prompt, n)
  np.testing.assert_array_equal(out, expected)
  assert len(set(out[0, 3:].tolist())) > 1  # not a degenerate model
  top1 = np.stack(sampler_fn(model, params, prompt, jax.random.key(1),
                             max_new_tokens=n, temperature=1.0, top_k=1))
  np.testing.assert_array_equal(top1, expected)


def test_stochastic_generation_is_seeded(sampler):
  model, params = sampler
  prompt = np.array([[1, 2, 3, 4]], np.int32)
  sample = lambda seed: np.stack(generate(
      model, params, prompt, jax.random.key(seed), max_new_tokens=12,
      temperature=2.0))
  a, b, c = sample(0), sample(0), sample(1)
  assert a.shape == (1, 16)
  np.testing.assert_array_equal(a[:, :4], prompt)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  with pytest.raises(ValueError, match="at least one token"):
    generate(model, params, np.zeros((1, 0), np.int32), jax.random.key(0),
             max_new_tokens=2)


def test_sample_next_filters():
  logits = jnp.asarray(np.random.default_rng(7).normal(0, 2, (16, 50)),
                       jnp.float32)
  argmax = np.asarray(jnp.argmax(logits, -1))
  np.testing.assert_array_equal(sample_next(logits, None, 0.0), argmax)
  keys = jax.random.split(jax.random.key(0), 64)
  draw = jax.jit(jax.vmap(lambda k, t, kk, p: sample_next(logits, k, t, kk, p),
                          in_axes=(0, None, None, None)), static_argnums=(1, 2, 3))
  np.testing.assert_array_equal(np.asarray(draw(keys, 1.0, 0, 1e-6)),
                                np.broadcast_to(argmax, (64, 16)))
  np.testing.assert_array_equal(np.asarray(draw(keys, 1.0, 1, 1.0)),
                                np.broadcast_to(argmax, (64, 16)))
  top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
  drawn = np.asarray(draw(keys, 1.0, 3, 1.0))
  for row in range(16):
    assert set(drawn[:, row]) <= set(top3[row])
    assert len(set(drawn[:, row])) > 1
  # Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two.
  probs = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  nucleus = jax.jit(jax.vmap(lambda k: sample_next(probs, k, 1.0, 0, 0.7)))
  assert set(np.asarray(nucleus(keys)).ravel().tolist()) == {1, 3}


def test_corpus_smaller_than_a_batch_is_a_user_error(corpus_dir, data_cache,
                                                     tmp_path):
  from data.corpus import DataError
  config = tiny_run_config(corpus_dir, data_cache, steps=6)
  config.train.batch_size = 4096
  workdir = tmp_path / "run"
  with pytest.raises((ConfigError, DataError), match="fewer than one batch"):
    loop.train(config, str(workdir))
  assert not workdir.exists()


def test_cpu_steps_compile_dots_with_eigen_not_ynnpack():
  """trainer.state.compiler_options reaches the compiled step: XLA:CPU's
  default hands these dots to YNNPACK, our steps run them with Eigen
  (docs/performance.md)."""
  cfg = tiny_model_config()
  params = random_params(cfg, seed=3)
  args = (params, np.zeros((2, L + 1), np.int32), np.ones(2, bool),
          np.ones(37, np.int32))
  ours = state_lib.make_eval_step(GPT(cfg)).lower(*args).compile().as_text()
  default = jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t)).lower(
      params, args[1][:, :-1]).compile().as_text()
  assert state_lib.compiler_options() == {
      "xla_cpu_experimental_ynn_fusion_type": ""}
  assert "__ynn_fusion" in default
  assert "__ynn_fusion" not in ours and " dot(" in ours
