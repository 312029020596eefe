"""launch/: the launchers' dry runs print exactly what they run, and
2-process runs on 127.0.0.1 give the losses of a 1-process run on as many
devices, whichever devices hold which rows of a batch (each real run takes
~30-60 s on 2 cores)."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (PROCESSES, REPO, TINY_FLAGS, last_logged_step,
                      metrics_records, run_train_py, train_py_processes)
from launch import local
from trainer import audit

pytestmark = PROCESSES

TIMEOUT_S = 240  # for any one wait: far beyond a healthy run


def _start(*args, **kwargs):
  """A command in the repository root, in a process group of its own."""
  return subprocess.Popen(args, cwd=REPO, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, start_new_session=True,
                          **kwargs)


def _finish(proc, timeout=TIMEOUT_S):
  """(stdout, stderr); on timeout the process group is killed and the test
  fails."""
  try:
    return proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    pytest.fail(f"{shlex.join(proc.args[:3])} ... still running after "
                f"{timeout} s; killed")


def _kill_group(proc) -> bool:
  """Kills what is left of proc's process group; whether anything was."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    return False
  return True


def _port_free(port: int) -> bool:
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("127.0.0.1", port))
    except OSError:
      return False
  return True


def _dry_run(*args, env=None):
  proc = _start(*args, env=env)
  out, err = _finish(proc, timeout=60)
  assert proc.returncode == 0, err
  return out.splitlines()


# --- launch/local.py ---------------------------------------------------------

def test_local_dry_run_prints_each_process(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  lines = _dry_run(sys.executable, "launch/local.py", "--dry_run",
                   "--num_processes=3", "--devices_per_process=2",
                   "--port=23456", "--log_dir=logs", "--",
                   "--config.train.steps=6", "--config.sample.prompt=ROMEO: hi")
  env = ("JAX_PLATFORMS=cpu 'XLA_FLAGS=--xla_cpu_enable_fast_math=false "
         "--xla_force_host_platform_device_count=2' "
         "JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:23456")
  python = shlex.quote(sys.executable)
  assert lines == [
      f"{env} {python} train.py --coordinator_address=127.0.0.1:23456 "
      f"--num_processes=3 --process_id={i} --config.train.steps=6 "
      "'--config.sample.prompt=ROMEO: hi'" +
      (f" > {shlex.quote(os.path.join(REPO, 'logs', f'process_{i}.log'))} 2>&1"
       if i else "")
      for i in range(3)]


def test_local_dry_run_picks_one_free_port():
  lines = _dry_run(sys.executable, "launch/local.py", "--dry_run",
                   "--num_processes=2")
  ports = {int(p) for line in lines
           for p in re.findall(r"127\.0\.0\.1:(\d+)", line)}
  assert len(lines) == 2 and len(ports) == 1
  assert _port_free(ports.pop())


def test_local_stops_the_others_when_one_fails(tmp_path):
  stubborn = [sys.executable, "-c", "import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"]
  failing = [sys.executable, "-c",
             "import os; print(os.environ['GREETING']); raise SystemExit(3)"]
  log = str(tmp_path / "process_1.log")
  start = time.monotonic()
  status = local.run([({}, stubborn, None),
                      ({"GREETING": "bad input"}, failing, log)],
                     grace_s=1)
  assert status == 3
  assert time.monotonic() - start < 60  # the stubborn one was killed
  with open(log) as f:
    assert f.read() == "bad input\n"


def test_local_forwards_ctrl_c(corpus_dir, tmp_path):
  """Only launch/local.py gets the signal: the run stops (long before its
  100000 steps) only if it forwards it."""
  logs = tmp_path / "logs"
  proc = _start(sys.executable, "launch/local.py", f"--log_dir={logs}", "--",
                *TINY_FLAGS, f"--config.data.source={corpus_dir}",
                f"--config.data.cache_dir={tmp_path / 'cache'}",
                "--config.train.steps=100000", f"--workdir={tmp_path / 'run'}")
  try:
    deadline = time.monotonic() + 60
    while not (logs / "process_1.log").exists():  # both processes started
      assert time.monotonic() < deadline and proc.poll() is None
      time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = _finish(proc, timeout=60)
    # The status of an interrupted process depends on what it was doing.
    assert proc.returncode != 0, err
  finally:
    left = _kill_group(proc)
  assert not left, "processes of the run were left behind"


# --- launch/slurm.sbatch -----------------------------------------------------

@pytest.fixture
def fake_bin(tmp_path):
  """A PATH entry whose srun and gcloud record their arguments (and the JAX
  environment) instead of running anything."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls.jsonl"
  for name in ("srun", "gcloud"):
    (bin_dir / name).write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(calls)!r}, 'a') as f:\n"
        "  f.write(json.dumps({'argv': sys.argv[1:], 'env': {\n"
        "      k: v for k, v in os.environ.items() if k.startswith('JAX_')}})"
        " + '\\n')\n")
    (bin_dir / name).chmod(0o755)
  return str(bin_dir), calls


def _calls(path):
  if not path.exists():
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def _slurm_env(bin_dir, **variables):
  """A fake 2-node SLURM job (no scontrol on this PATH)."""
  return {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "4100",
          "SLURM_JOB_NODELIST": "gpu1,gpu2", "SLURM_CPUS_ON_NODE": "64",
          **variables}


ARGS = ("--config=configs/gpt2_small.py", "--config.sample.prompt=ROMEO: it's")


def test_slurm_dry_run_one_process_per_node(fake_bin):
  bin_dir, calls = fake_bin
  env = _slurm_env(bin_dir, SLURM_GPUS_ON_NODE="4")
  lines = _dry_run("bash", "launch/slurm.sbatch", *ARGS,
                   env={**env, "DRY_RUN": "1"})
  task = ("'export JAX_PROCESS_ID=$SLURM_PROCID "
          "JAX_LOCAL_DEVICE_IDS=0,1,2,3; exec \"$@\"'")
  srun = ("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 "
          f"--cpus-per-task=64 bash -c {task} bash python3 train.py "
          "--config=configs/gpt2_small.py "
          "'--config.sample.prompt=ROMEO: it'\\''s'")
  assert lines == [
      # 61440 + job id % 4096, as JAX's own SLURM detection
      "export JAX_COORDINATOR_ADDRESS=gpu1:61444 JAX_NUM_PROCESSES=2",
      srun,
      "# gpu1: JAX_PROCESS_ID=0 JAX_LOCAL_DEVICE_IDS=0,1,2,3",
      "# gpu2: JAX_PROCESS_ID=1 JAX_LOCAL_DEVICE_IDS=0,1,2,3"]
  assert _calls(calls) == []

  # Without DRY_RUN it runs what it printed.
  out = _dry_run("bash", "launch/slurm.sbatch", *ARGS, env=env)
  assert out == lines[:2]
  assert _calls(calls) == [{
      "argv": shlex.split(srun)[1:],
      "env": {"JAX_COORDINATOR_ADDRESS": "gpu1:61444",
              "JAX_NUM_PROCESSES": "2"}}]
  assert _calls(calls)[0]["argv"][-2:] == list(ARGS)


def test_slurm_dry_run_one_process_per_gpu(fake_bin):
  env = _slurm_env(fake_bin[0], SLURM_GPUS_ON_NODE="8", GPUS_PER_NODE="2",
                   PER_GPU="1", PORT="23456", PYTHON=".venv/bin/python",
                   DRY_RUN="1")
  lines = _dry_run("bash", "launch/slurm.sbatch", "--config.train.steps=6",
                   env=env)
  assert lines == [
      "export JAX_COORDINATOR_ADDRESS=gpu1:23456 JAX_NUM_PROCESSES=4",
      "srun --nodes=2 --ntasks=4 --ntasks-per-node=2 --kill-on-bad-exit=1 "
      "--cpus-per-task=32 bash -c 'export JAX_PROCESS_ID=$SLURM_PROCID "
      "JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID; exec \"$@\"' bash "
      ".venv/bin/python train.py --config.train.steps=6",
      "# gpu1: JAX_PROCESS_ID=0 JAX_LOCAL_DEVICE_IDS=0",
      "# gpu1: JAX_PROCESS_ID=1 JAX_LOCAL_DEVICE_IDS=1",
      "# gpu2: JAX_PROCESS_ID=2 JAX_LOCAL_DEVICE_IDS=0",
      "# gpu2: JAX_PROCESS_ID=3 JAX_LOCAL_DEVICE_IDS=1"]


def test_slurm_outside_a_job_says_so(fake_bin):
  env = _slurm_env(fake_bin[0], SLURM_GPUS_ON_NODE="8", DRY_RUN="1")
  del env["SLURM_JOB_NODELIST"]
  proc = _start("bash", "launch/slurm.sbatch", env=env)
  out, err = _finish(proc, timeout=60)
  assert proc.returncode != 0 and out == ""
  assert "SLURM_JOB_NODELIST: not in a SLURM job" in err


# --- launch/tpu.sh -----------------------------------------------------------

def test_tpu_dry_run_contacts_nothing(fake_bin):
  bin_dir, calls = fake_bin
  env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
  options = ("--setup", "--name=pod", "--zone=us-central2-b",
             "--project=proj", "--repo=code/gpt jax")
  lines = _dry_run("bash", "launch/tpu.sh", "--dry-run", *options, "--", *ARGS,
                   env=env)
  assert _calls(calls) == []  # gcloud never ran
  setup, train = (shlex.split(line) for line in lines)
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod",
         "--zone=us-central2-b", "--project=proj", "--worker=all"]
  assert setup[:-1] == ssh and train[:-1] == ssh
  assert shlex.split(setup[-1].removeprefix("--command=")) == [
      "cd", "code/gpt jax", "&&", "python3", "-m", "pip", "install", "-r",
      "requirements.txt", "jax[tpu]"]
  assert shlex.split(train[-1].removeprefix("--command=")) == [
      "cd", "code/gpt jax", "&&", "python3", "train.py",
      "--distributed=cluster", *ARGS]
  assert lines[1] == (
      "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --project=proj "
      "--worker=all '--command=cd '\\''code/gpt jax'\\'' && python3 train.py "
      "--distributed=cluster --config=configs/gpt2_small.py "
      "'\\''--config.sample.prompt=ROMEO: it'\\''\\'\\'''\\''s'\\'''")

  # Without --dry-run it runs what it printed.
  assert _dry_run("bash", "launch/tpu.sh", *options, "--", *ARGS,
                  env=env) == lines
  assert [c["argv"] for c in _calls(calls)] == [setup[1:], train[1:]]


def test_tpu_needs_name_and_zone():
  proc = _start("bash", "launch/tpu.sh", "--dry-run", "--name=pod")
  out, err = _finish(proc, timeout=60)
  assert proc.returncode == 2 and out == ""
  assert err.startswith("launch/tpu.sh --name=NAME --zone=ZONE")


# --- a real 2-process run ----------------------------------------------------

def _two_processes_and_one(flags, tmp_path, monkeypatch):
  """Runs train.py FLAGS as 2 processes x 2 CPU devices (launch/local.py)
  and as 1 process x 4; returns their workdirs (1 process, 2 processes),
  their consoles (stdout) and the 2-process run's logs folder."""
  one, two, logs = (str(tmp_path / name) for name in ("one", "two", "logs"))
  # Started first, so that it does not inherit the 1-process run's XLA_FLAGS.
  proc = _start(sys.executable, "launch/local.py", "--num_processes=2",
                "--devices_per_process=2", f"--log_dir={logs}", "--", *flags,
                f"--workdir={two}")
  try:
    with monkeypatch.context() as m:
      m.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
      m.setenv("JAX_PLATFORMS", "cpu")
      single = run_train_py(*flags, f"--workdir={one}", timeout=TIMEOUT_S)
    assert single.returncode == 0, single.stderr[-3000:]
    out, err = _finish(proc)
    assert proc.returncode == 0, err[-3000:]
  finally:
    left = _kill_group(proc)
  assert not left, "processes of the run were left behind"
  port = int(re.search(r"coordinator 127\.0\.0\.1:(\d+)", err).group(1))
  assert _port_free(port)
  return one, two, single.stdout, out, logs


def _same_losses(one, two, steps):
  expected, got = metrics_records(one), metrics_records(two)
  assert [r["step"] for r in got if "loss" in r] == list(range(1, steps + 1))
  for key in ("loss", "grad_norm", "eval_loss"):
    np.testing.assert_allclose([r[key] for r in got if key in r],
                               [r[key] for r in expected if key in r],
                               rtol=1e-5, err_msg=key)


def test_two_processes_match_one_process(corpus_dir, tmp_path, monkeypatch):
  """2 processes x 2 CPU devices vs 1 process x 4, on a (data 2, fsdp 2) mesh:
  the same losses to float32 round-off (rtol 1e-5), one writer."""
  flags = (*TINY_FLAGS, f"--config.data.source={corpus_dir}",
           f"--config.data.cache_dir={tmp_path / 'cache'}",
           "--config.train.batch_size=8", "--config.mesh.data=2",
           "--config.mesh.fsdp=2", "--config.train.steps=6")
  one, two, single, out, logs = _two_processes_and_one(flags, tmp_path,
                                                       monkeypatch)

  assert ("mesh: {'data': 2, 'fsdp': 2, 'tensor': 1} over 4 cpu devices in 1 "
          "process(es)") in single
  assert ("mesh: {'data': 2, 'fsdp': 2, 'tensor': 1} over 4 cpu devices in 2 "
          "process(es)") in out
  assert [sorted(r) for r in metrics_records(two)] == [
      sorted(r) for r in metrics_records(one)]
  _same_losses(one, two, steps=6)

  # Process 0 alone wrote logs, TensorBoard events, samples and the data
  # order: the workdir holds what a single process writes. Both
  # checkpointed the final step, whose data position is the step alone.
  assert sorted(os.listdir(two)) == sorted(os.listdir(one))
  for workdir in (one, two):
    assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1
    assert os.listdir(os.path.join(workdir, "samples")) == ["step_6.txt"]
    assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))
  assert "data" not in os.listdir(os.path.join(two, "checkpoints", "6"))
  assert audit.main([one, two]) == 0  # the same batches
  with open(os.path.join(logs, "process_1.log")) as f:
    process_1 = f.read()
  assert "step 6: eval loss" in out and "--- sample" in out
  for line in ("mesh:", "eval loss", "--- sample"):
    assert line not in process_1, process_1[-2000:]


# The default rules, but the vocabulary (34 characters here) is not split.
_RULES_WITHOUT_VOCAB = (
    "--config.mesh.rules=(('batch', ('data', 'fsdp')), ('vocab', None), "
    "('embed', 'fsdp'), ('heads', 'tensor'), ('mlp', 'tensor'))")


@pytest.mark.parametrize("mesh", [(1, 4), (2, 2)],
                         ids=["tensor4", "data2-tensor2"])
def test_processes_holding_the_same_rows(corpus_dir, tmp_path, monkeypatch,
                                         mesh):
  """2 processes x 2 devices where both processes hold every row (tensor 4
  across them) or each process's 2 devices hold the same rows (data 2 over
  processes, tensor 2 within): each process loads the rows its devices
  need, and the losses are those of 1 process x 4 devices."""
  data, tensor = mesh
  flags = (*TINY_FLAGS, f"--config.data.source={corpus_dir}",
           f"--config.data.cache_dir={tmp_path / 'cache'}",
           "--config.model.num_heads=4", _RULES_WITHOUT_VOCAB,
           "--config.train.batch_size=8", f"--config.mesh.data={data}",
           f"--config.mesh.tensor={tensor}", "--config.train.steps=4",
           "--config.eval.max_batches=1", "--config.sample.max_new_tokens=4")
  one, two, _, out, _ = _two_processes_and_one(flags, tmp_path, monkeypatch)
  rows = 8 // data
  assert (f"4 cpu devices in 2 process(es); batch 8 x 16 tokens, {rows} "
          f"sequences per device (2 devices and {rows} sequences per "
          "process)") in out
  _same_losses(one, two, steps=4)
  assert audit.main([one, two]) == 0


def _pids_of(marker: str) -> dict:
  """{process_id: pid} of the train.py processes of a multi-process run
  whose command line holds `marker`."""
  return {int(a.split("=")[1]): pid
          for pid, args in train_py_processes(marker).items()
          for a in args if a.startswith("--process_id=")}


def test_sigterm_to_one_process_stops_all_at_one_step(corpus_dir, tmp_path):
  """SIGTERM to process 1 only: through JAX's preemption sync both processes
  save the same step, and the launcher exits with the preempted status 75."""
  workdir, logs = str(tmp_path / "run"), str(tmp_path / "logs")
  proc = _start(sys.executable, "launch/local.py", "--num_processes=2",
                "--devices_per_process=2", f"--log_dir={logs}", "--",
                *TINY_FLAGS, f"--config.data.source={corpus_dir}",
                f"--config.data.cache_dir={tmp_path / 'cache'}",
                "--config.train.batch_size=8", "--config.mesh.fsdp=2",
                "--config.train.steps=100000", "--config.eval.every_steps=1000",
                "--config.checkpoint.every_steps=1000", f"--workdir={workdir}")
  try:
    deadline = time.time() + TIMEOUT_S
    while (time.time() < deadline and proc.poll() is None and
           last_logged_step(workdir) < 10):
      time.sleep(0.1)
    pids = _pids_of(workdir)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGTERM)
    out, err = _finish(proc)
  finally:
    left = _kill_group(proc)
  assert not left, "processes of the run were left behind"
  assert proc.returncode == 75, err[-3000:]
  with open(os.path.join(logs, "process_1.log")) as f:
    process_1 = f.read()
  steps = [re.search(r"preempted: stopped by SIGTERM after step (\d+)",
                     text).group(1) for text in (err, process_1)]
  assert steps[0] == steps[1], steps
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [steps[0]]
  assert "commit_success.txt" in os.listdir(
      os.path.join(workdir, "checkpoints", steps[0], "state"))
