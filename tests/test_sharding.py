"""Sharded training is the same computation as single-device training, the
vocabulary (padded to model.vocab_multiple) split over tensor too.

The runs need 8 (fake CPU) devices, which must be chosen before jax starts,
so they happen in one subprocess: this file run as a script.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]  # (data, fsdp, tensor)
MUON_MESH = (2, 2, 2)  # Muon's kernels split over fsdp and tensor
STEPS = 5
PADDED = 128  # the tiny corpus's 34 characters, as configs/base.py pads


def _config(data, fsdp, tensor, optimizer="adamw"):
  from conftest import tiny_config
  c = tiny_config(batch_size=16, warmup_steps=2, weight_decay=0.1,
                  learning_rate=5e-3, optimizer=optimizer)
  c.model.num_heads = 4  # 4 heads of 8 and an MLP of 128 split over tensor <= 4
  c.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor))
  return c


def _bytes_per_device(tree) -> list[int]:
  """Bytes of the shards each device holds, measured from the arrays."""
  held = {}
  for leaf in __import__("jax").tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return sorted(held.values())


def _corpus_batch():
  """16 windows of 17 characters of the tiny corpus (conftest's documents)
  as the ids of its character tokenizer, and its vocabulary size."""
  from conftest import DOCS, make_text
  from data import tokenizers
  texts = [make_text(i, words) for i, words in enumerate(DOCS.values())]
  tokenizer = tokenizers.CharTokenizer.fit(texts)
  ids = tokenizer.encode("\n".join(texts))
  return ids[:16 * 17].reshape(16, 17), tokenizer.vocab_size


def _gpt2_vocabulary_shards() -> dict:
  """The embedding shard of GPT-2's vocabulary (50257 ids, padded to 50304)
  over tensor 2, 4 and 8, from abstract shapes; and the error without
  padding."""
  from configs import gpt2_small
  from trainer import run as run_lib, sharding
  from trainer.errors import ConfigError
  shards = {}
  for tensor in (2, 4, 8, 0):
    config = gpt2_small.get_config()
    config.model.update(num_layers=1, num_heads=16)  # 16 heads: tensor 8
    config.mesh.update(data=-1, tensor=tensor or 2)
    config.model.vocab_multiple = 128 if tensor else 1
    mesh = sharding.make_mesh(config.mesh)
    try:
      shardings = run_lib.model_and_optimizer(config, 50257, mesh)[3]
    except ConfigError as e:
      shards["unpadded"] = str(e)
      continue
    table = shardings.params["Embed_0"]["embedding"]
    shards[tensor] = table.shard_shape((50304, 768))
  return shards


def _run_all(out_dir: str) -> None:
  import jax
  from conftest import train_steps
  assert jax.device_count() == 8
  batch, vocab = _corpus_batch()
  batches = [batch] * STEPS  # one batch, so that the loss visibly falls
  runs = {"single": ((1, 1, 1), jax.devices()[:1], "adamw")}
  runs.update({"x".join(map(str, m)): (m, None, "adamw") for m in MESHES})
  runs["muon-single"] = ((1, 1, 1), jax.devices()[:1], "muon")
  runs["muon-" + "x".join(map(str, MUON_MESH))] = (MUON_MESH, None, "muon")
  report = {"vocab": vocab, "gpt2": _gpt2_vocabulary_shards()}
  for name, (mesh, devices, optimizer) in runs.items():
    losses, grad_norms, state = train_steps(_config(*mesh, optimizer),
                                            batches, vocab=vocab,
                                            devices=devices)
    params = jax.device_get(state.params)
    table = state.params["Embed_0"]["embedding"]
    np.savez(os.path.join(out_dir, f"{name}.npz"), **{
        jax.tree_util.keystr(p): v
        for p, v in jax.tree_util.tree_leaves_with_path(params)})
    report[name] = {
        "losses": losses, "grad_norms": grad_norms,
        "state_bytes_per_device": _bytes_per_device(
            (state.params, state.opt_state)),
        "state_bytes": sum(x.nbytes for x in jax.tree.leaves(
            (state.params, state.opt_state))),
        "table_shard": table.sharding.shard_shape(table.shape)}
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("meshes")
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, __file__, str(out)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "report.json") as f:
    return out, json.load(f)


@pytest.mark.parametrize("mesh", ["x".join(map(str, m)) for m in MESHES])
def test_mesh_matches_single_device(runs, mesh):
  """Same losses, gradient norms and final parameters as one device, to
  float32 round-off (measured: <= 7.4e-8 relative for losses, <= 5.3e-7
  for gradient norms, <= 1.5e-6 for parameters, under (2,2,2) too): the
  reductions are only split and reordered."""
  _assert_same_run(*runs, "single", mesh)


def test_muon_on_a_mesh_matches_single_device(runs):
  """Muon's Newton-Schulz iterations on kernels split over fsdp and tensor:
  the same losses, gradient norms and parameters as on one device, to
  round-off (measured: <= 1.6e-6 relative for parameters, as AdamW's)."""
  name = "x".join(map(str, MUON_MESH))
  _assert_same_run(*runs, "muon-single", f"muon-{name}")
  _, report = runs  # and Muon is not AdamW
  assert report["muon-single"]["losses"] != report["single"]["losses"]


def _assert_same_run(out, report, single_name: str, name: str) -> None:
  single, sharded = report[single_name], report[name]
  np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-5)
  np.testing.assert_allclose(sharded["grad_norms"], single["grad_norms"],
                             rtol=1e-5)
  assert single["losses"][-1] < single["losses"][0] - 0.2  # it did train
  # At first, the uniform distribution over the 34 real ids, not the 128.
  assert abs(single["losses"][0] - np.log(report["vocab"])) < 0.05
  want = np.load(out / f"{single_name}.npz")
  got = np.load(out / f"{name}.npz")
  assert sorted(want) == sorted(got)
  for key in want:
    a, b = got[key], want[key]
    if "qkv_bias" in key:
      # The key bias adds q.b_k to every score of a row, which the softmax
      # ignores: its true gradient is 0, and Adam turns round-off into steps.
      assert np.abs(a[1]).max() < 1e-4 and np.abs(b[1]).max() < 1e-4
      a, b = a[[0, 2]], b[[0, 2]]
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), key


@pytest.mark.parametrize("mesh", ["x".join(map(str, m)) for m in MESHES])
def test_the_padded_vocabulary_splits_over_tensor(runs, mesh):
  """The corpus's 34 characters (which 4 does not divide) padded to 128:
  the embedding's rows split over tensor, its columns over fsdp."""
  _, report = runs
  data, fsdp, tensor = map(int, mesh.split("x"))
  assert report["vocab"] == 34
  assert report[mesh]["table_shard"] == [PADDED // tensor, 32 // fsdp]


def test_gpt2_vocabulary_splits_over_tensor_2_4_8(runs):
  _, report = runs
  shards = report["gpt2"]
  assert [shards[str(t)] for t in (2, 4, 8)] == [
      [50304 // t, 768] for t in (2, 4, 8)]
  assert "Embed_0/embedding (50257, 768): dimension 0 (size 50257) does not " \
      "split over mesh tensor=2" in shards["unpadded"]
  assert "model.vocab_multiple" in shards["unpadded"]


def test_fsdp_shards_state_across_devices(runs):
  """Each device holds about 1/8 of the parameters and optimizer state under
  fsdp=8, and all of it under pure data parallelism. Only the 1-D biases
  indexed by heads or mlp (mapped to tensor, not fsdp) are replicated: 11%
  extra in this tiny model, a negligible share in a real one."""
  _, report = runs
  fsdp = report["1x8x1"]
  total = fsdp["state_bytes"]
  per_device = fsdp["state_bytes_per_device"]
  assert len(per_device) == 8
  assert all(total / 8 <= b <= 1.15 * total / 8 for b in per_device), (
      per_device, total)
  assert report["8x1x1"]["state_bytes_per_device"] == [total] * 8
  # Tensor parallelism splits what fsdp does not: less again under (1,2,4).
  assert max(report["1x2x4"]["state_bytes_per_device"]) < 0.2 * total


class _Layout:
  """A sharding whose addressable devices hold the given rows of a batch:
  what process_rows reads of a real one."""

  def __init__(self, *rows):
    self.rows = rows

  def addressable_devices_indices_map(self, shape):
    return {device: (rows, slice(None)) for device, rows in
            enumerate(self.rows)}


@pytest.mark.parametrize("rows, expected", [
    ((slice(4, 6), slice(6, 8)), slice(4, 8)),  # data over processes
    ((slice(6, 8), slice(4, 6)), slice(4, 8)),  # in any device order
    ((slice(None), slice(None)), slice(0, 8)),  # tensor across processes
    ((slice(0, 4), slice(0, 4), slice(4, 8), slice(4, 8)), slice(0, 8)),
])
def test_process_rows(rows, expected):
  from trainer import sharding
  assert sharding.process_rows(_Layout(*rows), (8, 17)) == expected


def test_process_rows_in_two_ranges_are_refused():
  from trainer import sharding
  from trainer.errors import ConfigError
  with pytest.raises(ConfigError, match=r"rows 0-1, 4-5 of each batch of 8, "
                     "not one contiguous range; choose mesh sizes"):
    sharding.process_rows(_Layout(slice(0, 2), slice(4, 6)), (8, 17))


def test_process_rows_of_one_process_are_the_batch():
  import jax
  from configs import base
  from trainer import sharding
  mesh = sharding.make_mesh(base.get_config().mesh)
  assert sharding.process_rows(sharding.batch_sharding(mesh), (
      4 * jax.device_count(), 17)) == slice(0, 4 * jax.device_count())


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  _run_all(sys.argv[1])
