"""launch/sweep/: specs expand into the expected runs in a fixed order; a
bad spec stops with one line before anything is written; a sweep killed
midway and started again skips what is done, resumes what was cut off and
ends with the results of a sweep that never stopped (~1-2 minutes on 2
cores, most of it in the tiny train.py runs)."""

import csv
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

import layout
from conftest import (REPO, TINY_OVERRIDES, dead_pid, last_logged_step,
                      train_py_processes)
from configs import base
from launch.sweep.cli import main
from launch.sweep.queue import Queue
from launch.sweep.results import collect
from launch.sweep.spec import load
from launch.sweep.status import Lock, _state
from trainer.workdir_lock import HOST, STALE_S

TIMEOUT_S = 240  # for any one wait: far beyond a healthy sweep


def _spec(tmp_path, body: dict, name: str = "spec") -> str:
  """A spec file whose get_sweep() returns `body`."""
  path = tmp_path / f"{name}.py"
  path.write_text(f'"""A test sweep."""\n\ndef get_sweep():\n'
                  f"  return {body!r}\n")
  return str(path)


def _tiny(corpus_dir: str, data_cache: str, **overrides) -> dict:
  """Overrides for 12-step runs of the tiny model on the synthetic corpus
  (TINY_OVERRIDES but the learning rate, which the tests sweep)."""
  tiny = {k: v for k, v in TINY_OVERRIDES.items()
          if k != "train.learning_rate"}
  return {**tiny, "data.source": corpus_dir, "data.cache_dir": data_cache,
          "train.steps": 12, **overrides}


def _start(*args, log=None):
  """`python -m launch.sweep ARGS` in the repository root; its output goes
  to pipes, or both to the file `log`."""
  argv = [sys.executable, "-m", "launch.sweep", *map(str, args)]
  if log:
    with open(log, "w") as f:
      return subprocess.Popen(argv, cwd=REPO, text=True, stdout=f,
                              stderr=subprocess.STDOUT)
  return subprocess.Popen(argv, cwd=REPO, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)


def _finish(proc, timeout=TIMEOUT_S):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.communicate()
    pytest.fail(f"the sweep was still running after {timeout} s; killed")
  return out, err


def _wait_for(condition, what: str, timeout=TIMEOUT_S):
  deadline = time.monotonic() + timeout
  while not condition():
    if time.monotonic() > deadline:
      pytest.fail(f"no {what} after {timeout} s")
    time.sleep(0.05)


def _kill_leftovers(root) -> list:
  pids = list(train_py_processes(str(root)))
  for pid in pids:
    os.kill(pid, signal.SIGKILL)
  return pids


def _read_csv(path) -> list:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


# --- expansion ---------------------------------------------------------------

def test_grid_and_zip_expand_first_axis_slowest(tmp_path):
  spec = _spec(tmp_path, {
      "base": "configs/base.py", "overrides": {"train.steps": 100},
      "axes": [{"grid": {"model.d_model": [32, 64],
                         "train.learning_rate": [1e-3, 2e-3]}},
               {"zip": {"model.num_layers": [1, 2],
                        "model.num_heads": [2, 4]}}]})
  runs = load(spec, str(tmp_path / "root")).runs
  assert [r.swept for r in runs] == [
      {"model.d_model": d, "train.learning_rate": lr, "model.num_layers": n,
       "model.num_heads": h}
      for d, lr in ((32, 1e-3), (32, 2e-3), (64, 1e-3), (64, 2e-3))
      for n, h in ((1, 2), (2, 4))]
  first = runs[0]
  config = base.get_config()
  config.train.steps = 100
  config.model.update(d_model=32, num_layers=1, num_heads=2)
  config.train.learning_rate = 1e-3
  del config.checkpoint["keep_steps"]
  digest = hashlib.sha256(json.dumps(
      config.to_dict(), sort_keys=True).encode()).hexdigest()[:6]
  assert first.name == ("d_model=32,learning_rate=0.001,num_layers=1,"
                        f"num_heads=2-{digest}")
  assert first.workdir == str(tmp_path / "root" / first.name)
  assert first.args == [
      "--config=configs/base.py", f"--workdir={first.workdir}",
      "--config.train.steps=100", "--config.model.d_model=32",
      "--config.train.learning_rate=0.001", "--config.model.num_layers=1",
      "--config.model.num_heads=2"]
  assert first.steps == 100 and first.kind == "run"


def test_list_and_seeds_and_names_that_repeat(tmp_path):
  """Values are read as train.py reads them (1 -> 1.0 in a float field,
  tuples quoted), names are sanitized, and the same spec gives the same
  names and hashes; another value gives another hash."""
  body = {"base": "configs/base.py", "axes": [
      {"list": [{"train.batch_size": 16},
                {"train.batch_size": 32, "train.learning_rate": 1,
                 "data.holdout": ["hamlet", "lear"]}]},
      {"seeds": [0, 1]}]}
  runs = load(_spec(tmp_path, body), "root").runs
  assert [r.swept for r in runs] == [
      {"train.batch_size": 16, "train.seed": 0},
      {"train.batch_size": 16, "train.seed": 1},
      {"train.batch_size": 32, "train.learning_rate": 1.0,
       "data.holdout": ("hamlet", "lear"), "train.seed": 0},
      {"train.batch_size": 32, "train.learning_rate": 1.0,
       "data.holdout": ("hamlet", "lear"), "train.seed": 1}]
  assert runs[2].name.startswith(
      "batch_size=32,learning_rate=1,holdout=_hamlet_,_lear_,seed=0-")
  assert "--config.data.holdout=('hamlet', 'lear')" in runs[2].args
  again = load(_spec(tmp_path, body, "again"), "root").runs
  assert [r.name for r in again] == [r.name for r in runs]
  body["axes"][1] = {"seeds": [0, 2]}
  changed = load(_spec(tmp_path, body, "changed"), "root").runs
  assert changed[0].name == runs[0].name
  assert changed[1].name.rsplit("-", 1)[1] != runs[1].name.rsplit("-", 1)[1]


def test_random_draws_are_seeded_and_in_bounds(tmp_path):
  def draws(seed):
    spec = _spec(tmp_path, {"base": "configs/base.py", "axes": [
        {"random": {"n": 200, "seed": seed, "fields": {
            "train.learning_rate": ["log_uniform", 1e-4, 1e-2],
            "train.b2": ["uniform", 0.9, 0.99],
            "model.d_model": ["choice", [48, 96]]}}}]}, f"random{seed}")
    return [r.swept for r in load(spec, "root").runs]

  first = draws(3)
  assert draws(3) == first
  assert draws(4) != first
  lrs = [d["train.learning_rate"] for d in first]
  assert all(1e-4 <= lr <= 1e-2 for lr in lrs)
  assert all(0.9 <= d["train.b2"] <= 0.99 for d in first)
  assert {d["model.d_model"] for d in first} == {48, 96}
  # Uniform in log space: half below the geometric middle (1e-3); uniform
  # in linear space would put 9% there.
  assert 0.4 < sum(lr < 1e-3 for lr in lrs) / len(lrs) < 0.6
  assert abs(sum(map(math.log10, lrs)) / len(lrs) + 3) < 0.1



def test_cooldown_branches_follow_each_run(tmp_path):
  """Budget b of a T-step run with decay fraction f: T_b = round(b T) steps,
  K = max(1, round(f T_b)) of them decaying from S = T_b - K; the run keeps
  its checkpoints at every S."""
  spec = _spec(tmp_path, {**BASE, "overrides": {
      "train.steps": 100, "train.schedule": "wsd", "train.warmup_steps": 10},
      "axes": [{"seeds": [0, 1]}], "cooldowns": [0.25, 0.5, 0.75]})
  tasks = load(spec, str(tmp_path / "root")).tasks
  assert [(t.kind, t.name.split("/", 1)[-1], t.steps) for t in tasks] == [
      ("run", tasks[0].name, 100), ("cooldown", "cooldowns/20+5", 25),
      ("cooldown", "cooldowns/40+10", 50), ("cooldown", "cooldowns/60+15", 75),
      ("run", tasks[4].name, 100), ("cooldown", "cooldowns/20+5", 25),
      ("cooldown", "cooldowns/40+10", 50), ("cooldown", "cooldowns/60+15", 75)]
  run, branch = tasks[0], tasks[2]
  assert run.name.startswith("seed=0-")
  assert "--config.checkpoint.keep_steps=(20, 40, 60)" in run.args
  assert branch.parent is run and branch.from_step == 40
  assert branch.workdir == os.path.join(run.workdir, "cooldowns", "40+10")
  assert branch.args == ["--mode=cooldown", *run.args,
                         "--config.cooldown.from_step=40",
                         "--config.cooldown.steps=10",
                         f"--config.cooldown.workdir={branch.workdir}"]
  # A run too short for the default warmup (50) caps it (to 4 of 20 steps)
  # and branches after the capped one, as train.py would.
  capped = _spec(tmp_path, {**BASE, "overrides": {
      "train.steps": 20, "train.schedule": "wsd"}, "cooldowns": [0.5]},
      "capped")
  assert load(capped, "root").tasks[1].name.endswith("/cooldowns/8+2")


def test_a_run_is_named_by_its_config_not_its_base_path(tmp_path):
  """A copy of the base names the same runs; a copy with another learning
  rate, other runs; cooldown budgets add checkpoints, not runs."""
  with open(os.path.join(REPO, "configs", "base.py")) as f:
    text = f.read()
  copy, other = tmp_path / "copy.py", tmp_path / "other.py"
  copy.write_text(text)
  other.write_text(text.replace("learning_rate=4.6e-3", "learning_rate=1e-3"))
  names = {}
  for base, cooldowns in (("configs/base.py", []),
                          ("configs/base.py", [0.5]),
                          ("configs/base.py", [0.25, 0.5]),
                          (str(copy), [0.5]), (str(other), [0.5])):
    spec = _spec(tmp_path, {"base": base, "overrides": {"train.steps": 400},
                            "axes": [{"seeds": [0, 1]}],
                            "cooldowns": cooldowns})
    names[base, len(cooldowns)] = [r.name for r in load(spec, "root").runs]
  assert len({tuple(v) for k, v in names.items() if k[0] != str(other)}) == 1
  assert not set(names[str(other), 1]) & set(names[str(copy), 1])


def test_budgets_set_the_steps_of_each_run_and_branch(tmp_path):
  """An IsoFLOP design: every size at every budget, train.steps from the
  FLOPs per token run.json will count; branches get their share."""
  spec = _spec(tmp_path, {
      "base": "configs/base.py",
      "overrides": {"train.schedule": "wsd", "train.warmup_steps": 10},
      "axes": [{"zip": {"model.d_model": [32, 64],
                        "model.num_heads": [1, 2]}}],
      "budgets": [1e12, 3e12], "cooldowns": [0.5]})
  loaded = load(spec, str(tmp_path / "root"))
  for run, (d, c) in zip(loaded.runs, [(32, 1e12), (32, 3e12), (64, 1e12),
                                       (64, 3e12)]):
    n = 3 * (12 * d * d + 13 * d) + 2 * d  # non-embedding, by hand
    assert run.steps == round(c / (6 * n * 32 * 128))
    assert run.budget == c and run.name.startswith(
        f"d_model={d},num_heads={d // 32},budget={c:.4g}-")
  branches = [t for t in loaded.tasks if t.parent]
  assert [b.budget for b in branches] == [5e11, 1.5e12, 5e11, 1.5e12]
  assert loaded.fields == ["model.d_model", "model.num_heads"]


def test_old_run_folders_are_named(tmp_path, capsys):
  """A folder holding a run of the spec under another name (as runs were
  named before) is named with the command that keeps it; others are
  listed."""
  spec = _spec(tmp_path, {**BASE, "axes": [{"seeds": [0, 1]}]})
  root = tmp_path / "root"
  run = load(spec, str(root)).runs[0]
  from trainer import config as config_lib, saved_config
  for folder, seed in (("seed=0-abcdef", 0), ("seed=5-123456", 5)):
    config = base.get_config()
    config.train.update(steps=100, seed=seed)
    os.makedirs(root / folder)
    saved_config.save(config_lib.capped_warmup(config)[0], str(root / folder))
  assert main(["status", spec, "--root", str(root)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[:2] == [
      f"note: seed=0-abcdef holds the config of run {run.name} (named before "
      f"run names hashed the config); to keep its training: mv "
      f"{root / 'seed=0-abcdef'} {root / run.name}",
      f"note: 1 folder(s) in {root} hold runs this spec does not have: "
      "seed=5-123456"]


# --- bad specs ---------------------------------------------------------------

BASE = {"base": "configs/base.py", "overrides": {"train.steps": 100}}
WSD = {**BASE, "overrides": {"train.steps": 100, "train.schedule": "wsd"}}


def test_the_queue_starts_the_costliest_ready_tasks_first(tmp_path,
                                                          monkeypatch):
  """The wider run (listed last) first, then the narrow one, and its
  branches after the runs (not ready until their run's checkpoint)."""
  spec = _spec(tmp_path, {**WSD, "axes": [{"grid": {
      "model.d_model": [48, 192]}}], "cooldowns": [0.8]})
  loaded = load(spec, str(tmp_path / "root"))
  narrow, narrow_branch, wide, wide_branch = loaded.tasks
  assert wide.cost > narrow.cost > narrow_branch.cost > 0
  assert wide.cost / wide_branch.cost == 100 / 16  # its own steps only
  queue = Queue(loaded, parallel=4, retries=0, display=None)
  monkeypatch.setattr(queue, "_try_start",
                      lambda task: queue.running.update({task.name: task}))
  queue._start()
  assert list(queue.running) == [wide.name, narrow.name]
BAD_SPECS = {
    "unknown field": ({**BASE, "overrides": {"train.nope": 1}},
                      "unknown config field"),
    "wrong type": ({**BASE, "axes": [{"grid": {"model.d_model": [64, 1.5]}}]},
                   "model.d_model"),
    "string for a number": ({**BASE, "axes": [{"seeds": ["one"]}]},
                            "integer seeds"),
    "empty axis": ({**BASE, "axes": [{"grid": {"train.b2": []}}]},
                   "non-empty list"),
    "zip lengths": ({**BASE, "axes": [{"zip": {"model.num_layers": [1, 2],
                                               "model.num_heads": [2]}}]},
                    "different lengths"),
    "zero runs": ({**BASE, "axes": [{"random": {"n": 0, "fields": {
        "train.b2": ["uniform", 0.9, 0.99]}}}]}, "positive"),
    "identical runs": ({**BASE, "axes": [
        {"grid": {"train.learning_rate": [1, 1.0]}}]}, "same config"),
    "set twice": ({**BASE, "axes": [{"grid": {"train.steps": [10, 20]}}]},
                  "train.steps is set by overrides and by axis 0"),
    "bad run config": ({**BASE, "axes": [
        {"grid": {"model.num_heads": [3, 5]}}]},
        "run 1 (num_heads=5): model.d_model=96 is not divisible"),
    "cooldowns without wsd": ({**BASE, "overrides": {
        "train.steps": 100, "train.schedule": "cosine"}, "cooldowns": [0.5]},
                              "train.schedule='wsd'"),
    "cooldown in the warmup": ({**WSD, "cooldowns": [0.05]},
                               "cooldowns/4+1: cooldown.from_step=4 is "
                               "outside the stable phase"),
    "budgets and steps": ({**BASE, "budgets": [1e12]},
                          "train.steps is set by overrides and by budgets"),
    "a budget of 0": ({"base": "configs/base.py", "budgets": [0]},
                      "budgets must be a list of positive FLOP counts"),
    "cooldown twice": ({**WSD, "cooldowns": [0.5, 0.501]},
                       "the same branch twice (40+10)"),
    "missing base": ({**BASE, "base": "configs/nope.py"}, "configs/nope.py"),
}


@pytest.mark.parametrize("case", BAD_SPECS)
def test_bad_spec_is_one_line_and_writes_nothing(case, tmp_path, capsys):
  body, message = BAD_SPECS[case]
  spec, root = _spec(tmp_path, body), tmp_path / "root"
  for command in ("run", "status", "collect", "slurm"):
    assert main([command, spec, "--root", str(root)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert message in err, err
    assert not root.exists()


def test_bad_command_lines(tmp_path, capsys, monkeypatch):
  spec, root = _spec(tmp_path, BASE), tmp_path / "root"
  monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
  for argv, message in (
      (["run", spec, "--parallel", "0"], "--parallel"),
      (["run", spec, "--retries", "x"], "invalid int value"),
      (["slurm", spec], "sbatch not found"),
      (["run", str(tmp_path / "nope.py")], "no such file")):
    assert main([*argv, "--root", str(root)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert message in err, err
    assert not root.exists()


def test_bad_spec_from_the_command_line(tmp_path):
  root = tmp_path / "root"
  proc = _start("run", _spec(tmp_path, BAD_SPECS["zip lengths"][0]), "--root",
                root)
  out, err = _finish(proc)
  assert proc.returncode == 2
  assert out == "" and err.startswith("error: ") and err.count("\n") == 1
  assert not root.exists()



# --- collect -----------------------------------------------------------------

def _write_run(task, info: dict, records: list, checkpoint: int) -> None:
  """A workdir as train.py leaves it: run.json, metrics.jsonl (its last line
  cut short, as by a kill) and a checkpoint."""
  os.makedirs(os.path.join(task.workdir, "checkpoints", str(checkpoint)))
  with open(os.path.join(task.workdir, "run.json"), "w") as f:
    json.dump(info, f)
  with open(os.path.join(task.workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
    f.write('{"step": 4')


def test_collect_rows_of_done_partial_and_unstarted_runs(tmp_path):
  spec = _spec(tmp_path, {**BASE, "axes": [{"seeds": [0, 1, 2]}]})
  done, partial, unstarted = load(spec, str(tmp_path / "root")).runs
  info = {"params": 1000, "params_non_embedding": 800,
          "flops_per_token": 5000.0, "tokens_per_step": 64, "vocab_size": 37,
          "steps": 100, "code": {"commit": "abc", "clean": True}}
  records = [{"step": 1, "loss": 4.0},  # compiling: no tokens_per_sec
             {"step": 20, "loss": 3.5, "tokens_per_sec": 900.0},
             {"step": 20, "eval_loss": 3.0, "eval_bits_per_byte": 4.0},
             {"step": 40, "loss": 3.25, "tokens_per_sec": 1000.0},
             {"step": 40, "eval_loss": 2.5, "eval_bits_per_byte": 3.5}]
  _write_run(partial, info, records, checkpoint=40)
  _write_run(done, info, records + [
      {"step": 100, "loss": 2.0, "tokens_per_sec": 1200.0},
      {"step": 100, "eval_loss": 2.75, "eval_bits_per_byte": 3.75}],
      checkpoint=100)
  rows = collect(load(spec, str(tmp_path / "root")))
  assert rows == _read_json_rows(tmp_path / "root" / "results.json")
  # Every eval of a run scores the same text: the best is the best of all.
  assert (rows[0]["best_eval_loss"], rows[1]["best_eval_loss"]) == (2.5, 2.5)
  assert [r["name"] for r in rows] == [done.name, partial.name,
                                       unstarted.name]
  assert rows[0] == {
      "name": done.name, "kind": "run", "parent": None, "train.seed": 0,
      "status": "done", "partial": False, "steps": 100, "target_steps": 100,
      "tokens": 6400, "params": 800, "params_total": 1000,
      "flops": 5000.0 * 6400, "budget": None, "loss": 2.75,
      "eval_bits_per_byte": 3.75, "best_eval_loss": 2.5,
      "best_eval_bits_per_byte": 3.5, "train_loss": 2.0,
      "tokens_per_sec": 1000.0, "code": "abc", "wall_s": None,
      "workdir": done.workdir}
  assert rows[1]["status"] == "interrupted" and rows[1]["partial"] is True
  assert (rows[1]["steps"], rows[1]["tokens"], rows[1]["flops"],
          rows[1]["train_loss"], rows[1]["loss"]) == (
              40, 2560, 5000.0 * 2560, 3.25, 2.5)
  assert rows[2]["status"] == "queued" and rows[2]["partial"] is True
  assert [rows[2][k] for k in ("steps", "tokens", "params", "flops",
                               "train_loss")] == [0, None, None, None, None]
  csv_rows = _read_csv(tmp_path / "root" / "results.csv")
  assert list(csv_rows[0]) == list(rows[0])
  assert csv_rows[2]["params"] == "" and csv_rows[1]["partial"] == "True"


def test_cooldown_branch_runs_and_counts_all_its_tokens(
    tmp_path, corpus_dir, data_cache):
  """A tiny wsd run with cooldowns [0.5] (12 steps: a branch 5+1) run by
  the queue: the branch starts from the run's kept checkpoint, and its row
  counts the tokens of its S + K steps."""
  spec = _spec(tmp_path, {"base": "configs/base.py",
                          "overrides": _tiny(corpus_dir, data_cache,
                                             **{"train.schedule": "wsd"}),
                          "cooldowns": [0.5]})
  root = tmp_path / "root"
  proc = _start("run", spec, "--root", root, "--parallel", 2)
  out, err = _finish(proc)
  assert proc.returncode == 0, out + err
  run, branch = load(spec, str(root)).tasks
  assert branch.name == f"{run.name}/cooldowns/5+1"
  assert f"cooldown branch from {run.workdir}/checkpoints/5" in _log(branch)
  assert main(["collect", spec, "--root", str(root)]) == 0
  rows = _read_json_rows(root / "results.json")
  with open(os.path.join(branch.workdir, "run.json")) as f:
    tokens_per_step = json.load(f)["tokens_per_step"]
  assert rows[1]["name"] == branch.name and rows[1]["kind"] == "cooldown"
  assert rows[1]["parent"] == run.name and rows[1]["status"] == "done"
  assert rows[1]["steps"] == rows[1]["target_steps"] == 6
  assert rows[1]["tokens"] == 6 * tokens_per_step
  assert rows[0]["tokens"] == 12 * tokens_per_step


def _read_json_rows(path) -> list:
  with open(path) as f:
    return json.load(f)


# --- SLURM -------------------------------------------------------------------

SLURM_ENV = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "SLURM_JOB_ID": "7",
             "SLURM_JOB_NODELIST": "gpu1,gpu2", "SLURM_CPUS_ON_NODE": "64",
             "SLURM_GPUS_ON_NODE": "8"}


def _array_task(script, i: int):
  return subprocess.run(["bash", str(script)], capture_output=True, text=True,
                        timeout=60, env={**SLURM_ENV,
                                         "SLURM_ARRAY_TASK_ID": str(i)})


def test_slurm_array_task_i_runs_run_i(tmp_path, capsys):
  spec = _spec(tmp_path, {**BASE, "overrides": {
      "train.steps": 100, "sample.prompt": "ROMEO: it's",
      "data.holdout": ("hamlet", "lear")}, "axes": [
          {"grid": {"train.learning_rate": [1e-3, 2e-3, 4e-3]}}]})
  root = tmp_path / "root"
  assert main(["slurm", spec, "--root", str(root), "--dry-run",
               "--parallel", "2"]) == 0
  script = root / "sweep.sbatch"
  assert capsys.readouterr().out == f"sbatch {script}\n"
  assert os.listdir(root) == ["sweep.sbatch"]
  assert "#SBATCH --array=0-2%2" in script.read_text().splitlines()
  runs = load(spec, str(root)).runs
  for i, run in enumerate(runs):
    task = _array_task(script, i)
    assert task.returncode == 0, task.stderr
    srun = shlex.split(task.stdout.splitlines()[1])
    assert srun[0] == "srun" and srun[srun.index("train.py") + 1:] == run.args
  assert _array_task(script, 3).returncode == 2
  os.makedirs(os.path.join(runs[1].workdir, "checkpoints", "100"))
  task = _array_task(script, 1)
  assert task.returncode == 0 and task.stdout.startswith("done already")


def test_slurm_cooldowns_follow_the_runs(tmp_path, capsys, monkeypatch):
  """The branches are a second array, submitted to start once the first
  has succeeded."""
  spec = _spec(tmp_path, {**BASE, "overrides": {
      "train.steps": 100, "train.schedule": "wsd", "train.warmup_steps": 10},
      "axes": [{"seeds": [0, 1]}], "cooldowns": [0.5, 0.75]})
  root = tmp_path / "root"
  assert main(["slurm", spec, "--root", str(root), "--dry-run"]) == 0
  runs, cooldowns = root / "sweep.sbatch", root / "cooldowns.sbatch"
  assert capsys.readouterr().out == (
      f"sbatch {runs}\n"
      f"sbatch '--dependency=afterok:<job id of the first>' {cooldowns}\n")
  assert "#SBATCH --array=0-1" in runs.read_text().splitlines()
  assert "#SBATCH --array=0-3" in cooldowns.read_text().splitlines()
  branches = [t for t in load(spec, str(root)).tasks if t.parent]
  for i, branch in enumerate(branches):
    srun = shlex.split(_array_task(cooldowns, i).stdout.splitlines()[1])
    assert srun[srun.index("train.py") + 1:] == branch.args

  bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text(
      f"#!/bin/bash\necho \"$*\" >> {calls}\necho '4242;cluster'\n")
  (bin_dir / "sbatch").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  assert main(["slurm", spec, "--root", str(root)]) == 0
  assert calls.read_text().splitlines() == [
      f"--parsable {runs}",
      f"--parsable --dependency=afterok:4242 {cooldowns}"]
  assert capsys.readouterr().out.splitlines() == [
      f"submitted job 4242: sbatch {runs}",
      f"submitted job 4242: sbatch --dependency=afterok:4242 {cooldowns}"]


# --- locks -------------------------------------------------------------------

def _write_lock(workdir, host=HOST, sweep_pid=None, child_pid=None,
                age_s=0.0):
  now = time.time()
  lock = {"host": host, "sweep_pid": sweep_pid, "child_pid": child_pid,
          "started": now - age_s, "heartbeat": now - age_s}
  (workdir / layout.SWEEP_LOCK).write_text(json.dumps(lock))
  return lock


def test_live_lock_is_respected_and_stale_locks_are_taken_over(tmp_path,
                                                              sleeper):
  live_pid, dead = sleeper.pid, dead_pid()
  cases = [  # (lock, taken over)
      (dict(sweep_pid=live_pid), False),
      (dict(sweep_pid=dead, child_pid=live_pid), False),
      (dict(host="elsewhere", sweep_pid=dead), False),  # pids unknowable there
      (dict(sweep_pid=dead, child_pid=dead), True),
      # Here the pids decide: an owner stopped for minutes is still alive.
      (dict(sweep_pid=live_pid, age_s=STALE_S + 1), False),
      (dict(host="elsewhere", sweep_pid=dead, age_s=STALE_S + 1), True)]
  for i, (fields, stale) in enumerate(cases):
    workdir = tmp_path / str(i)
    workdir.mkdir()
    found = _write_lock(workdir, **fields)
    lock, seen = Lock.acquire(str(workdir))
    assert seen == found, fields
    assert (lock is not None) == stale, fields
    owner = json.loads((workdir / layout.SWEEP_LOCK).read_text())
    assert owner == (lock.owner if stale else found)
    if stale:
      assert owner["host"] == HOST
      assert owner["sweep_pid"] == os.getpid()
      # Taken: a second taker finds a live owner (this process).
      assert Lock.acquire(str(workdir)) == (None, owner)
      assert lock.renew(child_pid=live_pid)
      lock.release()
      assert not (workdir / layout.SWEEP_LOCK).exists()
    assert sorted(os.listdir(workdir)) == [layout.SWEEP_LOCK] * (not stale)


def test_a_run_locked_by_a_live_process_waits_for_it(tmp_path, corpus_dir,
                                                      data_cache, sleeper):
  """Not started while the owner lives; taken over once it is gone."""
  spec = _spec(tmp_path, {"base": "configs/base.py",
                          "overrides": _tiny(corpus_dir, data_cache)})
  root, log = tmp_path / "root", tmp_path / "sweep.out"
  (task,) = load(spec, str(root)).tasks
  os.makedirs(task.workdir)
  _write_lock(root / task.name, sweep_pid=sleeper.pid)
  proc = _start("run", spec, "--root", root, log=log)
  try:
    waiting = (f"waiting {task.name}: locked by {HOST} pid "
               f"{sleeper.pid} (train.py pid None)\n")
    _wait_for(lambda: waiting in log.read_text() or proc.poll() is not None,
              "waiting line")
    assert os.listdir(task.workdir) == [layout.SWEEP_LOCK]  # nothing started
    sleeper.kill()
    sleeper.wait()
    _finish(proc)
  finally:
    proc.kill()
    leftovers = _kill_leftovers(root)
  out = log.read_text()
  assert proc.returncode == 0, out
  assert waiting in out
  assert (f"took over {task.name}: the lock of {HOST} pid "
          f"{sleeper.pid}") in out
  assert f"done {task.name}" in out
  assert task.done()
  assert not os.path.exists(os.path.join(task.workdir, layout.SWEEP_LOCK))
  assert not leftovers


# --- kill and restart --------------------------------------------------------

def _log(task) -> str:
  with open(os.path.join(task.workdir, layout.SWEEP_LOG)) as f:
    return f.read()


def _checkpoints(task) -> list:
  try:
    return sorted(int(s) for s in os.listdir(
        os.path.join(task.workdir, "checkpoints")) if s.isdigit())
  except FileNotFoundError:
    return []


def test_killed_sweep_restarts_where_it_stopped(tmp_path, corpus_dir,
                                                data_cache, capsys):
  """The acceptance test: a 2 x 2 sweep, 2 runs at a time, SIGKILLed once a
  run is done and another is halfway; the same command again skips the done
  runs, resumes the cut one from its checkpoint and gives the results.csv of
  a sweep that never stopped, losses bit for bit."""
  spec = _spec(tmp_path, {
      "base": "configs/base.py", "overrides": _tiny(corpus_dir, data_cache),
      "axes": [{"grid": {"train.learning_rate": [2e-3, 4e-3]}},
               {"seeds": [0, 1]}]})
  roots = {name: tmp_path / name for name in ("reference", "killed")}
  command = lambda name: ("run", spec, "--root", roots[name], "--parallel", 2)
  proc = _start(*command("reference"))
  out, err = _finish(proc)
  assert proc.returncode == 0, err
  assert main(["collect", spec, "--root", str(roots["reference"])]) == 0

  runs = load(spec, str(roots["killed"])).runs
  proc = _start(*command("killed"))
  try:
    # Halfway: a checkpoint, and no step after 6 of 12 logged (committed
    # checkpoints may lag behind), so that SIGTERM (sent by the kernel when
    # the sweep dies) stops the run long before its end.
    halfway = lambda r: (not r.done() and _checkpoints(r) and
                         last_logged_step(r.workdir) <= 6)
    _wait_for(lambda: any(r.done() for r in runs) and any(map(halfway, runs)),
              "done run beside a halfway one")
    proc.kill()
    proc.wait()
    _wait_for(lambda: not train_py_processes(str(roots["killed"])),
              "exit of the orphaned train.py processes")
  finally:
    proc.kill()
    _kill_leftovers(roots["killed"])
  done = [r for r in runs if r.done()]
  cut = [r for r in runs if not r.done() and _checkpoints(r)]
  assert done and cut
  for run in cut:  # the kernel's SIGTERM reached them: they saved and left
    assert "preempted: stopped by SIGTERM after step" in _log(run)

  # collect and status on the stopped sweep: unfinished rows are partial.
  assert main(["collect", spec, "--root", str(roots["killed"])]) == 0
  rows = {r["name"]: r for r in _read_csv(roots["killed"] / "results.csv")}
  for run in runs:
    started = os.path.exists(os.path.join(run.workdir, layout.SWEEP_STATE))
    assert rows[run.name]["partial"] == str(run not in done)
    assert rows[run.name]["status"] == (
        "done" if run in done else "interrupted" if started else "queued")
  assert main(["status", spec, "--root", str(roots["killed"])]) == 0
  table = capsys.readouterr().out
  assert f"{len(done)} done" in table and "0 running" in table

  proc = _start(*command("killed"))
  out, err = _finish(proc)
  assert proc.returncode == 0, err
  for run in done:  # skipped: no new attempt
    assert _state(run.workdir)["attempts"] == 1
    assert _log(run).count("=== ") == 1
    assert f"start {run.name}" not in out
  for run in cut:  # resumed from its checkpoint
    resumed = _log(run).split("=== ")[2]
    assert f"resuming from {run.workdir}/checkpoints at step" in resumed
    assert f"took over {run.name}" in out
  assert all(r.done() for r in runs)

  assert main(["collect", spec, "--root", str(roots["killed"])]) == 0
  expected, got = (_read_csv(roots[name] / "results.csv")
                   for name in ("reference", "killed"))
  for row in expected + got:  # timings and places differ
    del row["wall_s"], row["tokens_per_sec"], row["workdir"]
  assert got == expected
  assert {r["status"] for r in got} == {"done"}
