"""What a run records about itself and checks when it resumes: the code
version in run.json, and a resumed run's config against its config.json."""

import json
import os
import subprocess

import pytest

from conftest import REPO, TINY_FLAGS, run_train_py, tiny_run_config
from trainer import metrics, saved_config
from trainer.errors import ConfigError


def test_a_resume_with_another_learning_rate_is_refused(corpus_dir,
                                                         data_cache,
                                                         tmp_path):
  workdir = str(tmp_path / "run")
  flags = [*TINY_FLAGS, f"--config.data.source={corpus_dir}",
           f"--config.data.cache_dir={data_cache}", f"--workdir={workdir}"]
  first = run_train_py(*flags, "--config.train.steps=3")
  assert first.returncode == 0, first.stderr[-2000:]
  with open(os.path.join(workdir, "run.json")) as f:
    assert json.load(f)["code"] == metrics.code_version()
  before = open(os.path.join(workdir, "config.json")).read()
  refused = run_train_py(*flags, "--config.train.steps=6",
                         "--config.train.learning_rate=0.01")
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines()[-1] == (
      f"error: {workdir} holds a run of another config: "
      "train.learning_rate (the run's 0.002, now 0.01); resume it with the "
      f"run's values (see {workdir}/config.json) or train this config in a "
      "new --workdir")
  assert open(os.path.join(workdir, "config.json")).read() == before
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]


def _saved_run(tmp_path, **changes):
  config = tiny_run_config("corpus", "", steps=10)
  saved_config.save(config, str(tmp_path))
  for field, value in changes.items():
    section, name = field.split(".")
    config[section][name] = value
  return config


def test_what_a_resume_may_change(tmp_path):
  saved_config.check_resumable(_saved_run(
      tmp_path, **{"train.steps": 20, "eval.every_steps": 7,
                   "checkpoint.keep_steps": (4,), "sample.prompt": "x",
                   "mesh.data": 1, "perf.peak_flops": 2.0}), str(tmp_path))
  with pytest.raises(ConfigError, match=r"model.d_model \(the run's 32, now "
                     r"64\), train.seed \(the run's 0, now 1\);"):
    saved_config.check_resumable(_saved_run(
        tmp_path, **{"model.d_model": 64, "train.seed": 1}), str(tmp_path))
  # The eval text is the run's: its size may not change, its batching may.
  def subset(max_batches, batch_size):
    config = tiny_run_config("corpus", "", steps=10)
    config.eval.update(max_batches=max_batches, batch_size=batch_size)
    return config

  saved_config.save(subset(2, 8), str(tmp_path))
  saved_config.check_resumable(subset(2, 8), str(tmp_path))
  saved_config.check_resumable(subset(4, 4), str(tmp_path))  # the same 16
  with pytest.raises(ConfigError, match=r"evals score 16 items of the "
                     r"validation split; eval.max_batches=3 and "
                     r"eval.batch_size=8 would score 24 items"):
    saved_config.check_resumable(subset(3, 8), str(tmp_path))
  with pytest.raises(ConfigError, match=r"would score the whole validation "
                     r"split, and every eval of a run scores the same text"):
    saved_config.check_resumable(subset(0, 8), str(tmp_path))


def test_code_version_without_git(monkeypatch):
  head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"],
                        capture_output=True, text=True).stdout.strip()
  assert metrics.code_version()["commit"] == head
  monkeypatch.setenv("PATH", "")
  assert metrics.code_version() == {"commit": None, "clean": None}
