"""Shared fixtures: tiny models, a tiny synthetic corpus, and subprocess runs.

Everything is sized for a shared 2-core CPU: models are 1-2 layers of width 32
with a context of 16 tokens.
"""

import fcntl
import os
import random
import subprocess
import sys
import tempfile

# Before jax is imported anywhere: a persistent compilation cache (shared with
# the train.py subprocesses, which inherit the environment) unless the caller
# chose one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      tempfile.gettempdir(), "gpt_jax_tests_compilation_cache")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests that run train.py in several processes joined through
# jax.distributed take turns across pytest-xdist's workers (the README runs
# 2), so that two of them never share the cores while their collectives wait
# on each other (pytest-xdist's own xdist_group does not group under pytest 9).
PROCESSES = pytest.mark.processes
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def pytest_configure(config):
  config.addinivalue_line("markers", "processes: starts several train.py "
                          "processes; such tests take turns (conftest.py)")


@pytest.fixture(autouse=True)
def _processes_take_turns(request):
  if request.node.get_closest_marker("processes") is None:
    yield
    return
  lock = os.path.join(tempfile.gettempdir(), "gpt_jax_tests_processes.lock")
  with open(lock, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
    yield

# Words with multi-byte UTF-8 characters, so that bytes != characters.
_WORDS = ("the king queen lord lady night day sword crown love death ghost "
          "storm island sea father son speak hear see come go my thy thou art "
          "café naïve — ’tis o’er").split()

# Document name -> number of words. hamlet and tempest are the default
# holdout of configs/base.py, so the default holdout works here too.
DOCS = {"hamlet": 180, "tempest": 120, "macbeth": 500, "lear": 500,
        "sonnets": 450}


def make_text(seed: int, num_words: int) -> str:
  rng = random.Random(seed)
  lines, line = [], []
  for _ in range(num_words):
    line.append(rng.choice(_WORDS))
    if len(line) == 8:
      lines.append(("KING: " if rng.random() < 0.3 else "") + " ".join(line))
      line = []
  lines.append(" ".join(line))
  return "\n".join(lines)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
  """A directory of small .txt documents (read-only for tests)."""
  path = tmp_path_factory.mktemp("corpus")
  for i, (name, words) in enumerate(DOCS.items()):
    (path / f"{name}.txt").write_text(make_text(i, words), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
  """A data.cache_dir shared by the tests that only read prepared data."""
  return str(tmp_path_factory.mktemp("data_cache"))


def tiny_model_config(**overrides):
  from model import GPTConfig
  fields = dict(vocab_size=37, num_layers=2, d_model=32, num_heads=2,
                seq_len=16)
  fields.update(overrides)
  return GPTConfig(**fields)


def param_shapes(cfg):
  """The GPT parameter tree as ShapeDtypeStructs: traced, never allocated."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from model import GPT
  shapes = jax.eval_shape(GPT(cfg).init, jax.random.key(0),
                          jnp.zeros((1, cfg.seq_len), jnp.int32))
  return nn.unbox(shapes)["params"]


def random_params(cfg, seed=0, std=0.02):
  """GPT-like random parameters without compiling `init` (slow on CPU):
  N(0, std) weights and biases, unit LayerNorm scales."""
  import jax
  import numpy as np
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, np.float32)
                       if path[-1].key == "scale" else
                       rng.normal(0, std, s.shape).astype(np.float32)),
      param_shapes(cfg))


def tiny_config(corpus_dir: str = "", cache_dir: str = "", **train):
  """configs/base.py shrunk to a 2-layer model that can memorize a batch
  in 150 steps; on the synthetic corpus if given."""
  from configs import base
  c = base.get_config()
  c.model.update(dict(num_layers=2, d_model=32, num_heads=2, seq_len=16))
  c.train.update(dict(batch_size=4, steps=150, warmup_steps=10,
                      learning_rate=1e-2, weight_decay=0.0,
                      schedule="cosine", log_every_steps=1))
  c.train.update(train)
  c.perf.peak_flops = 1e12  # skip the CPU matmul measurement
  if corpus_dir:
    c.data.source = corpus_dir
  if cache_dir:
    c.data.cache_dir = cache_dir
  return c


def train_steps(config, batches, *, seed=0, vocab=37, grad_accum_steps=1,
                devices=None):
  """A freshly initialized (seed) model trained on `batches` on a mesh of
  `devices` (default: all): per-step losses and gradient norms, and the final
  state."""
  import flax.linen as nn
  import jax
  from trainer import run as run_lib, sharding
  from trainer import state as state_lib
  mesh = sharding.make_mesh(config.mesh, devices)
  model, tx, rules, shardings = run_lib.model_and_optimizer(config, vocab,
                                                            mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  losses, grad_norms = [], []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = state_lib.init_state(model, tx, shardings, seed)
    step = state_lib.make_train_step(model, tx, shardings,
                                     grad_accum_steps=grad_accum_steps,
                                     seed=config.train.seed)
    for batch in batches:
      state, metrics = step(state, sharding.to_global(batch, batch_sharding,
                                                      batch.shape))
      losses.append(float(metrics["loss"]))
      grad_norms.append(float(metrics["grad_norm"]))
  return losses, grad_norms, state


# The train.py tests start from configs/base.py (every field at its usual
# value, character-level), not the default's recipe and BPE.
BASE_CONFIG = "--config=configs/base.py"

# The tiny run of the train.py tests, as config overrides (the in-process run
# tests use the same values, so compilations are shared through the cache).
TINY_OVERRIDES = {
    "model.num_layers": 1, "model.d_model": 32, "model.num_heads": 2,
    "model.seq_len": 16, "train.batch_size": 4, "train.warmup_steps": 2,
    "train.learning_rate": 2e-3, "train.schedule": "cosine",
    "train.log_every_steps": 1, "eval.every_steps": 3, "eval.batch_size": 16,
    "checkpoint.every_steps": 3, "sample.max_new_tokens": 20,
    "perf.peak_flops": 1e12, "data.holdout": ("hamlet",),
}
TINY_FLAGS = (BASE_CONFIG, *(
    f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
    for k, v in TINY_OVERRIDES.items()))


def tiny_run_config(corpus_dir: str, cache_dir: str, steps: int):
  """configs/base.py with TINY_OVERRIDES, as train.py would build it."""
  from configs import base
  c = base.get_config()
  for key, value in TINY_OVERRIDES.items():
    section, name = key.split(".")
    c[section][name] = value
  c.data.update(dict(source=corpus_dir, cache_dir=cache_dir))
  c.train.steps = steps
  return c


def run_train_py(*args, timeout=300, wait=True, devices=0, log=None):
  """Runs `python train.py ARGS` in the repository root (from BASE_CONFIG
  unless ARGS name a config), on `devices` fake CPU devices if given.
  Without waiting, returns the Popen; its stdout and
  stderr go to pipes, or both to the file `log`."""
  env = dict(os.environ)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.setdefault("GPT_JAX_CACHE", os.path.join(tempfile.gettempdir(),
                                               "gpt_jax_tests_data"))
  if not any(a.startswith("--config=") for a in args):
    args = (BASE_CONFIG, *args)
  cmd = [sys.executable, "train.py", *args]
  if not wait:
    if log:
      with open(log, "a") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=f,
                                stderr=subprocess.STDOUT)
    return subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  return subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True,
                        timeout=timeout)


def train_py_processes(marker: str) -> dict:
  """{pid: command-line args} of the live train.py processes whose command
  line holds `marker` (e.g. a workdir or a sweep root)."""
  found = {}
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().decode().split("\0")
    except OSError:
      continue
    if "train.py" in args and any(marker in a for a in args):
      found[int(pid)] = args
  return found


def metrics_records(workdir) -> list[dict]:
  """The records of a run's metrics.jsonl."""
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def file_snapshot(directory) -> dict:
  """Every file under directory with its size and modification time."""
  return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size,
                               os.stat(os.path.join(d, f)).st_mtime_ns)
          for d, _, files in os.walk(directory) for f in files}


def last_logged_step(workdir) -> int:
  """The step of the newest complete record of a run that may still be
  writing (0 before the first)."""
  import json
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = f.readlines()
  except OSError:
    return 0
  for line in reversed(lines):
    try:
      return json.loads(line)["step"]
    except ValueError:  # being written, or cut short by a kill
      continue
  return 0


@pytest.fixture
def sleeper():
  """A live process that is not this one (a lock's holder); killed at the
  end."""
  proc = subprocess.Popen(["sleep", "600"])
  yield proc
  proc.kill()
  proc.wait()


def dead_pid() -> int:
  """The pid of a process that has exited."""
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid
