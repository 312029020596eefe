"""What a run logs: TensorBoard events read back with TensorBoard's own
reader equal metrics.jsonl, and MFU is the hand-counted FLOPs over the
logged step time and the peak."""

import json
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from conftest import metrics_records, tiny_run_config
from trainer import loop

STEPS = 6
# metrics.jsonl key -> TensorBoard tag, as the README promises the charts.
TAGS = {
    "loss": "train/loss", "grad_norm": "train/grad_norm",
    "learning_rate": "train/learning_rate", "tokens_seen": "train/tokens_seen",
    "first_step_time_s": "perf/first_step_time_s",
    "tokens_per_sec": "perf/tokens_per_sec",
    "tokens_per_sec_per_device": "perf/tokens_per_sec_per_device",
    "step_time_ms": "perf/step_time_ms", "data_wait_ms": "perf/data_wait_ms",
    "mfu": "perf/mfu", "train_time_s": "perf/train_time_s",
    "train_cpu_time_s": "perf/train_cpu_time_s", "eval_loss": "eval/loss",
    "eval_perplexity": "eval/perplexity",
    "eval_bits_per_byte": "eval/bits_per_byte", "eval_tokens": "eval/tokens",
    "eval_items": "eval/items", "eval_split_items": "eval/split_items",
    "eval_time_s": "eval/time_s",
}


@pytest.fixture(scope="module")
def run_dir(corpus_dir, data_cache, tmp_path_factory):
  """6 steps of 1 layer x 32, batch 4 x 16, every step logged, evals at 3
  and 6, perf.peak_flops 1e12 on one device."""
  workdir = str(tmp_path_factory.mktemp("metrics") / "run")
  loop.train(tiny_run_config(corpus_dir, data_cache, steps=STEPS), workdir)
  return workdir


def _events(workdir):
  events = event_accumulator.EventAccumulator(
      os.path.join(workdir, "tensorboard"),
      size_guidance={event_accumulator.SCALARS: 0,
                     event_accumulator.TENSORS: 0})
  events.Reload()
  return events


def test_tensorboard_events_equal_metrics_jsonl(run_dir):
  events = _events(run_dir)
  records = metrics_records(run_dir)
  logged = {}  # tag -> {step: value}
  for record in records:
    for key, value in record.items():
      if key != "step":
        logged.setdefault(TAGS[key], {})[record["step"]] = value
  assert set(events.Tags()["scalars"]) == set(logged)
  for tag, by_step in logged.items():
    scalars = {e.step: e.value for e in events.Scalars(tag)}
    assert scalars == {step: float(np.float32(value))  # stored as float32
                       for step, value in by_step.items()}, tag
  assert sorted(logged["train/loss"]) == list(range(1, STEPS + 1))
  assert sorted(logged["eval/loss"]) == [3, STEPS]

  def text(tag):
    [event] = events.Tensors(tag)
    return event.tensor_proto.string_val[0].decode()
  with open(os.path.join(run_dir, "samples", f"step_{STEPS}.txt")) as f:
    assert text("sample/text_summary") == f.read()
  assert text("run/text_summary").startswith(
      "model: 1 layers x 32 x 2 heads, context 16")


def test_mfu_is_hand_counted_flops_over_step_time_and_peak(run_dir):
  with open(os.path.join(run_dir, "run.json")) as f:
    summary = json.load(f)
  d, layers, context = 32, 1, 16
  # 6 N, N non-embedding: QKV 3d^2 + 3d, output d^2 + d, MLP 8d^2 + 5d,
  # two LayerNorms 4d; the final LayerNorm.
  flops_per_token = 6 * (layers * (12 * d * d + 13 * d) + 2 * d)
  assert summary["flops_per_token"] == flops_per_token
  tokens_per_step, peak = 4 * context, 1e12  # batch 4, perf.peak_flops
  assert summary["tokens_per_step"] == tokens_per_step
  timed = [r for r in metrics_records(run_dir) if "mfu" in r]
  assert len(timed) >= 2
  for r in timed:
    step_time = r["step_time_ms"] / 1e3
    assert r["tokens_per_sec"] == pytest.approx(tokens_per_step / step_time,
                                                rel=1e-9)
    assert r["mfu"] == pytest.approx(
        flops_per_token * tokens_per_step / step_time / peak, rel=1e-9)


def test_train_time_adds_up_the_step_times_and_leaves_out_evals(run_dir):
  """Every step is logged here, each its own window: train_time_s is the
  sum of the step times after the first (which compiles), and the evals at
  steps 3 and 6, timed on their own, are not in it."""
  records = metrics_records(run_dir)
  steps = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
  assert [r["step"] for r in evals] == [3, 6]
  assert steps[0]["train_time_s"] == steps[0]["train_cpu_time_s"] == 0.0
  total = 0.0
  for r in steps[1:]:
    total += r["step_time_ms"] / 1e3
    assert r["train_time_s"] == pytest.approx(total, rel=1e-9)
  cpu = [r["train_cpu_time_s"] for r in steps]
  assert cpu == sorted(cpu) and cpu[-1] > 0
  assert all(r["eval_time_s"] > 0 for r in evals)
