"""Cached generation: logits equal to the full forward's, greedy tokens equal
to the uncached reference sampler's (past the context window, on one device
and on a 4-device mesh), for dense and local layers and for rotary positions
(whose cache rolls past the context), the context policy, stops, and seeded
sampling."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params, tiny_model_config
from model import (GPT, KVCache, generate, generate_uncached, resize_vocab,
                   window_start)
from test_recipe import RECIPE

S = 16  # the tiny models' context
LENGTHS = (3, 20, 1, 9)  # one prompt longer than the context
NEW = 512


def _prompts(lengths=LENGTHS, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 37, n).astype(np.int32) for n in lengths]


def _sampler(std=0.3, **overrides):
  cfg = tiny_model_config(**overrides)
  # Larger weights than at init, so that greedy decoding does not settle
  # into repeating one token (with local layers or rotary positions, it
  # does within 100 tokens at 0.3, not at 0.5).
  return GPT(cfg), random_params(cfg, seed=1, std=std)


def _assert_rows_equal(got, want):
  assert len(got) == len(want)
  for row, (a, b) in enumerate(zip(got, want)):
    np.testing.assert_array_equal(a, b, err_msg=f"row {row}")


LOCAL = dict(attention_pattern="dense,local", local_window=5)
VARIANTS = {
    "loop": {},
    "scan": dict(scan_layers=True),
    "sinusoidal-untied-nobias-remat": dict(
        position="sinusoidal", tie_embeddings=False, use_bias=False,
        remat="full"),
    "dense-local": LOCAL,
    "local-dense-scan-rope": dict(LOCAL, attention_pattern="local,dense",
                                  scan_layers=True, position="rope"),
    "recipe-dense-local-scan-rope": dict(RECIPE, **LOCAL, position="rope",
                                         scan_layers=True),
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_cached_logits_match_full_forward(overrides):
  """Left-padded prompts of different lengths prefilled in one pass, then
  their true next tokens fed one per step: at every position the logits
  are those of the full forward over the row alone (two programs: measured
  <= 6.4e-6 apart, for logits up to 5.6, on two CPUs; a cache or position
  bug moves them by 1e-3 or more). Local layers' rings of 5 slots roll
  over meanwhile."""
  model, params = _sampler(**overrides)
  tokens = np.random.default_rng(1).integers(0, 37, (4, S)).astype(np.int32)
  full = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
  lengths = np.array([3, 7, 1, 5])
  P, steps = lengths.max(), S - lengths.max()
  prompt = np.zeros((4, P), np.int32)
  pos = np.full((4, P), -1, np.int32)
  for b, n in enumerate(lengths):
    prompt[b, P - n:] = tokens[b, :n]
    pos[b, P - n:] = np.arange(n)
  step = jax.jit(lambda params, tokens, pos, cache: model.apply(
      {"params": params}, tokens, cache=cache, pos_BxL=pos))
  logits, cache = step(params, prompt, pos, KVCache.empty(model.cfg, 4))
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(logits[b, P - n:], full[b, :n], rtol=0,
                               atol=5e-5, err_msg=f"prefill, row {b}")
  rows = np.arange(4)
  for t in range(steps):
    logits, cache = step(params, tokens[rows, lengths + t][:, None],
                         (lengths + t)[:, None], cache)
    np.testing.assert_allclose(logits[:, 0], full[rows, lengths + t],
                               rtol=0, atol=5e-5, err_msg=f"decode step {t}")
  assert int(cache.length) == S


def test_rolling_cache_matches_full_forward_past_the_context():
  """Rotary positions, 3 contexts and more of tokens: a prefill longer than
  the context, then one token per step, the rings rolling over. At every
  position the logits are those of the full forward over all the tokens,
  each layer attending to its last 16 keys (dense) or 5 (local)."""
  cfg = tiny_model_config(position="rope", **LOCAL)
  model, params = GPT(cfg), random_params(cfg, seed=1, std=0.3)
  N, P = 3 * S + 5, S + 4
  tokens = np.random.default_rng(2).integers(0, 37, (2, N)).astype(np.int32)
  full = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
  step = jax.jit(lambda tokens, pos, cache: model.apply(
      {"params": params}, tokens, cache=cache, pos_BxL=pos))
  logits, cache = step(tokens[:, :P], np.tile(np.arange(P), (2, 1)),
                       KVCache.empty(cfg, 2))
  np.testing.assert_allclose(logits, full[:, :P], rtol=0, atol=5e-5)
  for t in range(P, N):
    logits, cache = step(tokens[:, t:t + 1], np.full((2, 1), t), cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=0, atol=5e-5,
                               err_msg=f"position {t}")
  # The full forward's logits past the context differ from those of the
  # last context alone: the cache holds more than a window's tokens.
  last = np.asarray(jax.jit(model.apply)({"params": params},
                                         tokens[:, N - S:]))
  assert np.abs(last[:, -1] - full[:, -1]).max() > 1e-3


def test_decoding_reads_only_the_slots_written():
  """A context of 200 (a dense ring of 200 slots, a local one of 100):
  decoding steps read the first 64, then 128 slots, then all (256 >= 200),
  the local ring all of its slots once it rolls over (after 100 columns),
  and their logits stay those of the full forward at every position."""
  cfg = tiny_model_config(seq_len=200, attention_pattern="dense,local",
                          local_window=100, position="rope")
  model, params = GPT(cfg), random_params(cfg, seed=1, std=0.3)
  tokens = np.random.default_rng(3).integers(0, 37, (2, 200)).astype(np.int32)
  full = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
  step = jax.jit(lambda tokens, pos, cache: model.apply(
      {"params": params}, tokens, cache=cache, pos_BxL=pos))
  P = 30
  _, cache = step(tokens[:, :P], np.tile(np.arange(P), (2, 1)),
                  KVCache.empty(cfg, 2))
  spans = set()
  for t in range(P, 200):
    cache = cache.spanning(t + 1, cfg.seq_len)
    spans.add(cache.span)
    logits, cache = step(tokens[:, t:t + 1], np.full((2, 1), t), cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=0, atol=5e-5,
                               err_msg=f"position {t}, span {cache.span}")
  assert spans == {64, 128, None}


def test_context_policy():
  """Up to the context the window holds everything; past it, it restarts on
  the last half and grows back to the context before the next restart. A
  rolling cache's never restarts."""
  assert [window_start(n, 8) for n in range(9)] == [0] * 9
  seen = [n - window_start(n, 8) for n in range(9, 30)]
  assert seen == [4, 5, 6, 7, 8] * 4 + [4]
  assert [n - window_start(n, 1) for n in range(1, 5)] == [1, 1, 1, 1]
  assert [n - window_start(n, 5) for n in range(6, 13)] == [3, 4, 5] * 2 + [3]
  assert [window_start(n, 8, rolls=True) for n in range(30)] == [0] * 30


# Greedy choices compared between two programs (cached and uncached, whose
# logits differ by round-off, < 1e-5) must not be near-ties. The smallest
# gap between the top two logits over each model's 2048 choices: 8.5e-4,
# 2.2e-3 (at std 0.3 this scan model's is 3.7e-5), 3.2e-3, 1.6e-3.
GREEDY = {
    "loop": {},
    "scan": dict(scan_layers=True, std=0.4),
    "dense-local": dict(LOCAL, std=0.5),
    "rope-dense-local-scan": dict(LOCAL, position="rope", scan_layers=True,
                                  std=0.5),
}


@pytest.mark.parametrize("overrides", GREEDY.values(), ids=GREEDY.keys())
def test_greedy_matches_uncached_reference(overrides):
  """512 new tokens, 32 times the context: every restart of the window, or
  with rotary positions, a cache that rolls (the reference runs the whole
  row each time)."""
  model, params = _sampler(**overrides)
  kwargs = dict(max_new_tokens=NEW, temperature=0.0)
  cached = generate(model, params, _prompts(), jax.random.key(0), **kwargs)
  reference = generate_uncached(model, params, _prompts(), jax.random.key(0),
                                **kwargs)
  assert [len(r) for r in cached] == [n + NEW for n in LENGTHS]
  for prompt, row in zip(_prompts(), cached):
    np.testing.assert_array_equal(row[:len(prompt)], prompt)
    assert len(set(row[-100:].tolist())) > 3  # not a degenerate model
  _assert_rows_equal(cached, reference)


@pytest.mark.parametrize("overrides", [{}, dict(LOCAL, position="rope")],
                         ids=["learned", "rope-dense-local"])
def test_seeded_sampling_matches_reference(overrides):
  """Temperature, top-k and top-p as `sample_next` applies them, with the
  reference's per-token keys: the same draws; another seed differs."""
  model, params = _sampler(**overrides)
  kwargs = dict(max_new_tokens=40, temperature=1.0, top_k=5, top_p=0.9)
  cached = generate(model, params, _prompts(), jax.random.key(3), **kwargs)
  _assert_rows_equal(cached, generate_uncached(
      model, params, _prompts(), jax.random.key(3), **kwargs))
  _assert_rows_equal(cached, generate(model, params, _prompts(),
                                      jax.random.key(3), **kwargs))
  other = generate(model, params, _prompts(), jax.random.key(4), **kwargs)
  assert any(not np.array_equal(a, b) for a, b in zip(cached, other))


def _streamed(model, params, prompts, **kwargs):
  """generate's rows, and what on_token streamed of each row."""
  calls = []
  rows = generate(model, params, prompts, jax.random.key(0), temperature=0.0,
                  on_token=lambda *args: calls.append(args), **kwargs)
  streamed = [[int(tokens[b]) for tokens, growing in calls if growing[b]]
              for b in range(len(prompts))]
  return rows, streamed, len(calls)


def _expected_stop(reference, prompts, stops_after):
  """Each reference row cut after the first continuation token for which
  `stops_after(continuation so far)` holds."""
  out = []
  for row, prompt in zip(reference, prompts):
    new = row[len(prompt):]
    end = next((i + 1 for i in range(len(new)) if stops_after(new[:i + 1])),
               len(new))
    out.append(row[:len(prompt) + end])
  return out


def test_stops_at_end_of_text():
  model, params = _sampler()
  prompts = _prompts((3, 5, 9))
  reference = generate_uncached(model, params, prompts, jax.random.key(0),
                                max_new_tokens=40, temperature=0.0)
  eot = int(reference[0][3 + 10])  # some token row 0 makes
  expected = _expected_stop(reference, prompts, lambda new: new[-1] == eot)
  rows, streamed, steps = _streamed(model, params, prompts, stop_token=eot,
                                    max_new_tokens=40)
  _assert_rows_equal(rows, expected)
  assert len(rows[0]) <= 3 + 11 and rows[0][-1] == eot
  for row, prompt, tokens in zip(rows, prompts, streamed):
    assert tokens == row[len(prompt):].tolist()
  # The call ends once the last row stopped (or at max_new_tokens).
  assert steps == max(len(r) - len(p) for r, p in zip(rows, prompts))


def test_stops_at_stop_string():
  """A stop string spanning two tokens, matched in the continuation's text
  (not the prompt's); rows that never complete it run to max_new_tokens."""
  model, params = _sampler()
  alphabet = "abcdefghijklmnopqrstuvwxyz0123456789!"
  to_text = lambda ids: "".join(alphabet[i] for i in ids)
  prompts = _prompts((3, 5, 9))
  reference = generate_uncached(model, params, prompts, jax.random.key(0),
                                max_new_tokens=40, temperature=0.0)
  stop = to_text(reference[1][5 + 6:5 + 8])
  expected = _expected_stop(reference, prompts,
                            lambda new: stop in to_text(new))
  assert len(expected[1]) <= 5 + 8
  rows, streamed, steps = _streamed(
      model, params, prompts, stop_strings=("never", stop), to_text=to_text,
      max_new_tokens=40)
  _assert_rows_equal(rows, expected)
  assert steps == max(len(r) - len(p) for r, p in zip(rows, prompts))


def test_bad_arguments():
  model, params = _sampler()
  with pytest.raises(ValueError, match="at least one token"):
    generate(model, params, [[1, 2], []], jax.random.key(0),
             max_new_tokens=2)
  with pytest.raises(ValueError, match="to_text"):
    generate(model, params, [[1, 2]], jax.random.key(0), max_new_tokens=2,
             stop_strings=("x",))
  rows = generate(model, params, [[1, 2], [3]], jax.random.key(0),
                  max_new_tokens=0)
  _assert_rows_equal(rows, [[1, 2], [3]])


def test_padded_ids_are_never_sampled():
  """37 ids padded to 48, the padded rows of the table far larger than the
  real ones: unmasked they would be drawn nearly every step (the same
  parameters read as an unpadded 48-id model show it); masked, neither
  sampler ever gives one, greedy or at a high temperature."""
  model, params = _sampler(vocab_multiple=16)
  params = jax.tree.map(np.array, resize_vocab(params, 48))
  params["Embed_0"]["embedding"][37:] *= 30
  unmasked = GPT(tiny_model_config(vocab_size=48))
  rows = generate(unmasked, params, _prompts(), jax.random.key(0),
                  max_new_tokens=32, temperature=0.0)
  assert np.mean([(r[n:] >= 37).mean() for r, n in zip(rows, LENGTHS)]) > 0.5
  for sampler, kwargs in ((generate, dict(temperature=0.0)),
                          (generate, dict(temperature=2.0, top_p=0.99)),
                          (generate_uncached, dict(temperature=2.0))):
    rows = sampler(model, params, _prompts(), jax.random.key(1),
                   max_new_tokens=40, **kwargs)
    new = np.concatenate([r[n:] for r, n in zip(rows, LENGTHS)])
    assert new.size == 4 * 40 and new.max() < 37, (sampler, kwargs)
    assert len(set(new.tolist())) > 5  # not one token repeated


# ------------------------------------------------------------ 4-device mesh

MESH = dict(data=2, fsdp=1, tensor=2)
PADDING = dict(vocab_multiple=8)  # 37 ids padded to 40, split over tensor
MESH_MODELS = {"dense": PADDING,
               "rope-dense-local": dict(PADDING, **LOCAL, position="rope",
                                        std=0.5)}
REPORT = "report.json"


def _run_on_mesh(out_dir: str) -> None:
  """Runs in a subprocess with 4 devices: both samplers on a data x tensor
  mesh (batch split over data, heads over tensor), and a cache's sharding."""
  import flax.linen as nn
  from configs import base
  from trainer import sharding
  if jax.device_count() < 4:
    report = {"skip": f"{jax.device_count()} device(s), the mesh needs 4"}
  else:
    config = base.get_config()
    config.mesh.update(MESH)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
    rules = sharding.logical_rules(config.mesh)
    report = {}
    for name, overrides in MESH_MODELS.items():
      model, params = _sampler(**overrides)
      kwargs = dict(max_new_tokens=NEW, temperature=0.0)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(model.init, jax.random.key(0),
                               jnp.zeros((1, S), jnp.int32))
        params = jax.device_put(params, nn.logical_to_mesh_sharding(
            nn.get_partition_spec(boxed), mesh, rules)["params"])
        prompts = _prompts()
        cached = generate(model, params, prompts, jax.random.key(0), **kwargs)
        reference = generate_uncached(model, params, prompts,
                                      jax.random.key(0), **kwargs)
        _, cache = jax.jit(lambda params, tokens: model.apply(
            {"params": params}, tokens, pos_BxL=jnp.zeros_like(tokens),
            cache=KVCache.empty(model.cfg, 4)))(params, np.zeros((4, 1),
                                                                 np.int32))
      table = params["Embed_0"]["embedding"]
      report[name] = {
          "cached": [r.tolist() for r in cached],
          "reference": [r.tolist() for r in reference],
          "cache_shards": [ring.k_ZxBxWxHxK.sharding.shard_shape(
              ring.k_ZxBxWxHxK.shape) for ring in cache.rings],
          "table_shard": table.sharding.shard_shape(table.shape)}
  with open(os.path.join(out_dir, REPORT), "w") as f:
    json.dump(report, f)


def test_greedy_on_a_4_device_mesh_matches_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / REPORT) as f:
    report = json.load(f)
  if "skip" in report:
    pytest.skip(report["skip"])
  # [layers, batch, length, heads, head_dim]: batch over data, heads over
  # tensor; a local layer's ring holds its window.
  assert report["dense"]["cache_shards"] == [[2, 2, S, 1, 16]]
  assert report["rope-dense-local"]["cache_shards"] == [[1, 2, S, 1, 16],
                                                        [1, 2, 5, 1, 16]]
  for name, overrides in MESH_MODELS.items():
    # The padded vocabulary's half.
    assert report[name]["table_shard"] == [20, 32], name
    model, params = _sampler(**overrides)
    one_device = generate_uncached(model, params, _prompts(),
                                   jax.random.key(0), max_new_tokens=NEW,
                                   temperature=0.0)
    _assert_rows_equal(report[name]["cached"], one_device)
    _assert_rows_equal(report[name]["reference"], one_device)


if __name__ == "__main__":
  _run_on_mesh(sys.argv[1])
