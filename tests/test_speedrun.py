"""benchmarks.speedrun reads a run's time to a target loss from its
metrics.jsonl: the training clock at the first eval at or below the
target, the loss counted per byte of held-out text."""

import math

import pytest

from benchmarks import speedrun
from conftest import REPO


def _records(evals: dict, every: int = 100, steps: int = 400,
             bytes_per_token: float = 1.0) -> list[dict]:
  """Step records every `every` steps (0.5 s and 1 CPU s per step after the
  first) and the given evals {step: nats per byte}, of a tokenizer whose
  tokens hold `bytes_per_token` bytes."""
  records = [{"step": 1, "loss": 4.0, "tokens_seen": 64, "train_time_s": 0.0,
              "train_cpu_time_s": 0.0}]
  for step in range(every, steps + 1, every):
    records.append({"step": step, "loss": 2.0, "tokens_seen": 64 * step,
                    "train_time_s": 0.5 * (step - 1),
                    "train_cpu_time_s": 1.0 * (step - 1)})
    if step in evals:
      records.append({"step": step,
                      "eval_loss": evals[step] * bytes_per_token,
                      "eval_bits_per_byte": evals[step] / math.log(2),
                      "eval_time_s": 2.0})
  return records


def test_the_first_eval_at_the_target_and_the_clock_there():
  result = speedrun.time_to_target(
      _records({200: 1.7, 300: 1.58, 400: 1.55}), target=1.583)
  assert result == {"final_step": 400, "final_loss": 1.55, "eval_s": 6.0,
                    "reached": True, "step": 300, "loss": 1.58,
                    "tokens": 64 * 300, "train_s": 149.5,
                    "train_cpu_s": 299.0}


def test_a_bpe_run_is_judged_per_byte_not_per_token():
  """Its eval_loss (nats per token, here 2.4 bytes) is far above the target;
  per byte it reaches it at step 300."""
  result = speedrun.time_to_target(
      _records({200: 1.7, 300: 1.58, 400: 1.55}, bytes_per_token=2.4), 1.583)
  assert result["step"] == 300 and result["train_s"] == 149.5
  assert result["loss"] == pytest.approx(1.58, abs=1e-12)
  assert result["final_loss"] == pytest.approx(1.55, abs=1e-12)


def test_a_run_that_never_reaches_the_target():
  result = speedrun.time_to_target(_records({200: 1.7, 400: 1.6}), 1.583)
  assert result == {"final_step": 400, "final_loss": 1.6, "eval_s": 4.0,
                    "reached": False}


def test_a_resumed_run_is_not_timed():
  records = _records({400: 1.5})
  records[3]["train_time_s"] = 3.0  # step 300: the clock restarted
  with pytest.raises(ValueError, match="the run was resumed"):
    speedrun.time_to_target(records, 1.583)


def test_a_run_without_the_clock_is_not_timed():
  records = _records({400: 1.5})
  del records[2]["train_cpu_time_s"]  # logged by an older version
  with pytest.raises(ValueError, match="has no training clock"):
    speedrun.time_to_target(records, 1.583)


def test_a_run_without_bits_per_byte_is_not_judged():
  records = _records({400: 1.5})
  del records[-1]["eval_bits_per_byte"]  # logged by an older version
  with pytest.raises(ValueError, match="no eval_bits_per_byte"):
    speedrun.time_to_target(records, 1.583)


def test_workdirs_differ_by_config_fields_overrides_and_seed(tmp_path):
  args = lambda *s, config=f"{REPO}/configs/default.py": type(
      "A", (), {"config": config, "set": list(s), "every": 200,
                "root": "runs"})
  a = speedrun.workdir(args(), 0)
  assert a.startswith("runs/default-") and a.endswith("/seed_0")
  assert speedrun.workdir(args(), 1) == a[:-1] + "1"
  assert speedrun.workdir(args("train.steps=10"), 0) != a
  edited = tmp_path / "default.py"  # the same name, one field changed
  edited.write_text("from configs import default\n\n\ndef get_config():\n"
                    "  c = default.get_config()\n  c.train.steps = 10\n"
                    "  return c\n")
  assert speedrun.workdir(args(config=str(edited)), 0) != a
