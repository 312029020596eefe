"""launch/memory.py: the per-device memory of a tiny model's train step on 8
fake devices, compiled ahead of time in a subprocess (~10 s each), and of
GPT-3 175B on 1024."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

# 2 layers x 32, no biases: every parameter has an `embed` axis, so FSDP
# splits all of them.
TINY = ("--config.model.num_layers=2", "--config.model.d_model=32",
        "--config.model.num_heads=2", "--config.model.seq_len=16",
        "--config.model.vocab_size=64", "--config.model.use_bias=False",
        "--config.train.batch_size=8")


def _memory(*args):
  return subprocess.run(
      [sys.executable, "-m", "launch.memory", "--devices=8",
       "--config=configs/base.py", *TINY, *args],
      cwd=REPO, text=True, capture_output=True, timeout=300)


def _report(*mesh):
  result = _memory(*mesh, "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)


def test_fsdp_splits_the_state_and_compiled_sizes_are_per_device():
  dp = _report("--config.mesh.data=8")
  fsdp = _report("--config.mesh.data=1", "--config.mesh.fsdp=8")
  assert dp["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert dp["batch_per_device"] == fsdp["batch_per_device"] == 1
  assert fsdp["params_bytes"] * 8 == dp["params_bytes"] == 4 * dp["params"]
  # Only the step and Adam's counts (scalars) stay whole.
  assert 0 <= fsdp["opt_state_bytes"] - dp["opt_state_bytes"] / 8 < 64
  for r in (dp, fsdp):
    state = r["params_bytes"] + r["opt_state_bytes"]
    # The compiled program is one device's: the donated state is its shard,
    # the arguments add one sequence of 17 int32 tokens.
    assert r["alias_bytes"] == state
    assert r["argument_bytes"] == state + 17 * 4
    assert r["temp_bytes"] > 0
    assert r["total_bytes"] == (r["argument_bytes"] + r["output_bytes"]
                                - r["alias_bytes"] + r["temp_bytes"])


def test_summary():
  result = _memory("--config.mesh.data=1", "--config.mesh.fsdp=8")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "mesh data 1 x fsdp 8 x tensor 1 over 8 devices; batch 8 = 1 " in out
  for name in ("parameters", "optimizer state", "temporaries", "total"):
    assert f"\n  {name} " in out


def test_a_vocabulary_padded_to_128_splits_over_tensor_8():
  """84 ids, which 8 does not divide, padded to 128 (model.vocab_multiple's
  default): the layout compiles, and the counted parameters are the
  padded ones, as stored."""
  from model import GPTConfig
  r = _report("--config.mesh.data=1", "--config.mesh.tensor=8",
              "--config.model.num_heads=8", "--config.model.vocab_size=84")
  assert r["mesh"] == {"data": 1, "fsdp": 1, "tensor": 8}
  cfg = GPTConfig(vocab_size=84, vocab_multiple=128, num_layers=2,
                  d_model=32, num_heads=8, seq_len=16, use_bias=False)
  assert r["params"] == cfg.num_params(padded=True)


def test_gpt3_175b_fits_80gb_on_1024_devices():
  """docs/distributed.md's plan, compiled whole (~40 s): the state is 12 bytes
  a parameter over 1024 devices, 3 sequences at a time, under 80 GB."""
  result = subprocess.run(
      [sys.executable, "-m", "launch.memory", "--config=configs/gpt3_175b.py",
       "--devices=1024", "--json"],
      cwd=REPO, text=True, capture_output=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads(result.stdout)
  assert r["mesh"] == {"data": 1, "fsdp": 128, "tensor": 8}
  assert r["batch_per_device"] // r["grad_accum_steps"] == 3
  state = r["params_bytes"] + r["opt_state_bytes"]
  assert abs(state / (12 * r["params"] / 1024) - 1) < 0.01
  assert r["total_bytes"] < 80e9


@pytest.mark.parametrize("args, message", [
    (("--config.mesh.data=2", "--config.mesh.fsdp=2"),
     "mesh data*fsdp*tensor = 2*2*1 = 4 but there are 8 devices"),
    (("--config.mesh.data=1", "--config.mesh.tensor=8"),
     "model.num_heads = 2 is not divisible by mesh.tensor=8"),
    (("--config.mesh.data=1", "--config.mesh.tensor=8",
      "--config.model.num_heads=8", "--config.model.vocab_size=84",
      "--config.model.vocab_multiple=1"),
     "Embed_0/embedding (84, 32): dimension 0 (size 84) does not split over "
     "mesh tensor=8; pick mesh sizes that divide it (for the vocabulary: a "
     "model.vocab_multiple they divide)"),
    (("--config.mesh.data=1", "--config.mesh.fsdp=8",
      "--config.train.batch_size=4"),
     "train.batch_size=4 is not divisible by the data-parallel size 8"),
])
def test_bad_layout_is_one_line(args, message):
  result = _memory(*args)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert message in lines[0]
