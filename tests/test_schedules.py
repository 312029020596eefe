"""Learning-rate schedules (cosine, wsd, constant) and cooldown branches: a
wsd run's stable checkpoint decayed into a run of its own."""

import json
import os

import numpy as np
import optax
import pytest

from conftest import (TINY_FLAGS, file_snapshot, metrics_records,
                      run_train_py)
from configs import base
from trainer import audit, config as config_lib, optim, saved_config
from trainer.errors import ConfigError


def _config(**train):
  c = base.get_config()
  c.train.update(dict(steps=100, warmup_steps=10, learning_rate=1.0,
                      min_lr_ratio=0.1, schedule="cosine"))
  c.train.update(train)
  return c


def _lrs(config, steps):
  schedule = optim.lr_schedule(config)
  return np.array([float(schedule(s)) for s in steps])


def test_cosine_is_optax_warmup_cosine():
  c = _config()
  reference = optax.warmup_cosine_decay_schedule(
      0.0, 1.0, warmup_steps=10, decay_steps=100, end_value=0.1)
  steps = range(0, 101)
  np.testing.assert_allclose(_lrs(c, steps),
                             [float(reference(s)) for s in steps], atol=1e-6)


def test_cosine_steps_end_the_decay_early_then_hold():
  """GPT-3's: cosine to 10% over 260B tokens, then 10% to 300B."""
  c = _config(cosine_steps=60)
  reference = optax.warmup_cosine_decay_schedule(
      0.0, 1.0, warmup_steps=10, decay_steps=60, end_value=0.1)
  np.testing.assert_allclose(_lrs(c, range(61)),
                             [float(reference(s)) for s in range(61)],
                             atol=1e-6)
  np.testing.assert_allclose(_lrs(c, [60, 80, 100]), 0.1, atol=1e-7)
  # Beyond the run, the decay ends with it: as if cosine_steps were 0.
  np.testing.assert_allclose(_lrs(_config(cosine_steps=1000), range(101)),
                             _lrs(_config(), range(101)))


@pytest.mark.parametrize("shape, mid", [("linear", 0.55), ("cosine", 0.55),
                                        ("1-sqrt", 1 - 0.9 * 0.5**0.5)])
def test_wsd_warms_up_holds_then_decays(shape, mid):
  c = _config(schedule="wsd", decay_fraction=0.2, decay_shape=shape)
  # Warmup to step 10, the peak until step 80, the decay over steps 80-100.
  lrs = _lrs(c, [0, 5, 10, 50, 80, 90, 100])
  np.testing.assert_allclose(lrs, [0, 0.5, 1, 1, 1, mid, 0.1], atol=1e-6)
  decay = _lrs(c, range(80, 101))
  assert np.all(np.diff(decay) < 0)


def test_constant_never_decays():
  c = _config(schedule="constant")
  np.testing.assert_allclose(_lrs(c, [0, 5, 10, 99, 100]), [0, .5, 1, 1, 1],
                             atol=1e-7)


def test_branch_schedule_is_the_parent_up_to_its_start():
  parent = _config(schedule="wsd", decay_fraction=0.2)
  branch, workdir = saved_config.cooldown_branch(
      parent, _cooldown(from_step=40, steps=10), "runs/p")
  assert workdir == os.path.join("runs/p", "cooldowns", "40+10")
  assert branch.train.steps == 50 and parent.train.steps == 100
  assert branch.cooldown.parent == os.path.abspath("runs/p")
  np.testing.assert_allclose(_lrs(branch, range(41)), _lrs(parent, range(41)))
  # 1-sqrt (the parent's decay shape) from 40 to 50, ending at 0.1.
  np.testing.assert_allclose(_lrs(branch, [45, 50]),
                             [1 - 0.9 * 0.5**0.5, 0.1], atol=1e-6)


def _cooldown(**fields):
  c = base.get_config().cooldown
  c.update(fields)
  return c


@pytest.mark.parametrize("parent, cooldown, message", [
    (dict(schedule="cosine"), dict(from_step=40, steps=10),
     "was trained with train.schedule=cosine, which has no stable phase"),
    (dict(schedule="wsd"), dict(from_step=90, steps=10),
     "cooldown.from_step=90 is outside the stable phase of runs/p: steps 10 "
     "to 80"),
    (dict(schedule="wsd"), dict(from_step=5, steps=10),
     "cooldown.from_step=5 is outside the stable phase"),
    (dict(schedule="constant"), dict(from_step=40, steps=0),
     "--mode=cooldown needs --config.cooldown.steps=K > 0"),
])
def test_bad_branches_are_refused(parent, cooldown, message):
  with pytest.raises(ConfigError, match=message):
    saved_config.cooldown_branch(_config(**parent), _cooldown(**cooldown),
                                 "runs/p")


def test_a_branch_does_not_branch_again():
  parent = _config(schedule="wsd")
  branch, _ = saved_config.cooldown_branch(
      parent, _cooldown(from_step=40, steps=10), "runs/p")
  with pytest.raises(ConfigError, match="is itself a cooldown branch"):
    saved_config.cooldown_branch(branch, _cooldown(from_step=20, steps=5),
                                 "runs/p/cooldowns/40+10")


@pytest.mark.parametrize("fields, warmup, notice", [
    (dict(steps=25, warmup_steps=50), 5,
     "note: train.warmup_steps=50 is longer than this 25-step run; warming "
     "up for 5 steps (a fifth of the run) instead"),
    (dict(steps=25, warmup_steps=50, schedule="wsd"), 5,
     "note: train.warmup_steps=50 does not end before the decay starts at "
     "step 20; warming up for 5 steps (a fifth of the run) instead"),
    (dict(schedule="wsd", decay_fraction=0.95), 5,
     "does not end before the decay starts at step 5; warming up for 5 "
     "steps (until the decay starts) instead"),
    (dict(steps=1, warmup_steps=50), 0, "warming up for 0 steps"),
    (dict(steps=10, warmup_steps=10), 10, ""),  # cosine: it may take the run
    (dict(schedule="constant", steps=50), 10, ""),
])
def test_a_warmup_longer_than_the_run_is_capped(fields, warmup, notice):
  """A short run of a config made for long ones just works."""
  config = _config(**fields)
  config_lib.validate(config)
  capped, said = config_lib.capped_warmup(config)
  assert capped.train.warmup_steps == warmup
  assert notice in said and bool(said) == bool(notice)
  assert (capped is config) == (not notice)
  assert config.train.warmup_steps == fields.get("warmup_steps", 10)
  lrs = _lrs(capped, range(warmup + 1))
  assert lrs[-1] == pytest.approx(1.0) and np.all(np.diff(lrs) > 0)


def test_a_branch_keeps_its_parents_warmup():
  parent = _config(schedule="wsd")
  branch, _ = saved_config.cooldown_branch(
      parent, _cooldown(from_step=10, steps=5), "runs/p")
  config_lib.validate(branch)
  assert config_lib.capped_warmup(branch) == (branch, "")


@pytest.fixture(scope="module")
def wsd_run(corpus_dir, tmp_path_factory):
  """A 12-step wsd run (decay over steps 9-12) that keeps a checkpoint at
  step 6 for branches, besides those at 3, 6, 9 and 12."""
  root = tmp_path_factory.mktemp("wsd")
  workdir = str(root / "run")
  result = run_train_py(
      *TINY_FLAGS, f"--config.data.source={corpus_dir}",
      f"--config.data.cache_dir={root / 'cache'}", "--config.train.steps=12",
      "--config.train.schedule=wsd", "--config.train.decay_fraction=0.25",
      "--config.checkpoint.keep=1", "--config.checkpoint.keep_best=False",
      "--config.checkpoint.keep_steps=(6, 9)", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _cooldown_py(workdir, start, steps, *flags):
  return run_train_py("--mode=cooldown", f"--workdir={workdir}",
                      f"--config.cooldown.from_step={start}",
                      f"--config.cooldown.steps={steps}", *flags)


def test_keep_steps_survive_keep_n(wsd_run):
  assert sorted(os.listdir(os.path.join(wsd_run, "checkpoints")),
                key=int) == ["6", "9", "12"]
  with open(os.path.join(wsd_run, "run.json")) as f:
    summary = json.load(f)
  assert summary["steps"] == 12 and summary["tokens_per_step"] == 4 * 16
  assert summary["flops_per_token"] == 6 * summary["params_non_embedding"]
  assert summary["params"] > summary["params_non_embedding"] > 0


def test_branch_at_the_decay_start_replays_the_runs_own_decay(wsd_run):
  """Branching at step 9 with 3 decay steps is the run's own schedule: the
  same losses, bitwise, and the same final eval."""
  parent_files = file_snapshot(wsd_run)
  result = _cooldown_py(wsd_run, 9, 3)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "cooldown branch from" in result.stderr + result.stdout
  branch = os.path.join(wsd_run, "cooldowns", "9+3")
  parent = {r["step"]: r for r in metrics_records(wsd_run) if "loss" in r}
  records = metrics_records(branch)
  losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
  assert losses == [(s, parent[s]["loss"]) for s in (10, 11, 12)]
  assert records[-1]["eval_loss"] == [
      r for r in metrics_records(wsd_run) if "eval_loss" in r][-1]["eval_loss"]
  # The branch's steps 10-12 saw the parent's batches, and nothing before.
  assert audit.main([branch, wsd_run]) == 0
  assert file_snapshot(wsd_run) == {**parent_files, **{
      k: v for k, v in file_snapshot(wsd_run).items() if k.startswith(branch)}}
  with open(os.path.join(branch, "config.json")) as f:
    saved = json.load(f)
  assert saved["train"]["steps"] == 12
  assert saved["cooldown"]["parent"] == os.path.abspath(wsd_run)


def test_short_branch_decays_and_resumes(wsd_run):
  result = _cooldown_py(wsd_run, 6, 2)
  assert result.returncode == 0, result.stderr[-3000:]
  branch = os.path.join(wsd_run, "cooldowns", "6+2")
  records = metrics_records(branch)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [7, 8]
  assert train[0]["learning_rate"] == pytest.approx(2e-3)  # the peak
  assert train[1]["learning_rate"] < 2e-3
  assert train[0]["tokens_seen"] == 7 * 4 * 16
  assert [r["step"] for r in records if "eval_loss" in r] == [8]
  files = file_snapshot(branch)
  again = _cooldown_py(wsd_run, 6, 2)  # done: nothing to do
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"{branch} is complete at step 8" in again.stdout
  assert file_snapshot(branch) == files


def test_branch_needs_a_kept_checkpoint(wsd_run):
  result = _cooldown_py(wsd_run, 4, 2)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"error: {os.path.abspath(wsd_run)}/checkpoints has no checkpoint at "
      "step 4 (it has [6, 9, 12]); train the run with "
      "--config.checkpoint.keep_steps='(4,)'")
  assert not os.path.exists(os.path.join(wsd_run, "cooldowns", "4+2",
                                         "config.json"))
