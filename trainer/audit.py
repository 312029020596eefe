"""The data order of a run: what each step trained on, and an audit of it.

Training appends one line per step to <workdir>/data_order.jsonl (process 0,
with data.fingerprint), the moment the step's batch goes to the devices:

  {"step": 7, "epoch": 0, "fingerprint": "1f0c9a6b2e4d8357"}

`fingerprint` is a hash of the step's whole global batch (data.loader), so it
does not depend on the number of processes, devices or data workers; `epoch`
is the pass over the training windows that the batch's first window is from.
The file is never rewritten: a run resumed from a checkpoint appends the
steps it replays, so every batch that any restart consumed stays on record.

  python -m trainer.audit WORKDIR [OTHER_WORKDIR] [--recompute]

checks that no batch was repeated or skipped across restarts: every step from
the run's first (1, or a cooldown branch's cooldown.from_step + 1) to its
last appears, every replay of a step saw the batch of its first occurrence,
and no two steps of one epoch saw the same batch. --recompute also checks
each fingerprint and epoch against the batch the run's config and data give
(reading every batch again). With OTHER_WORKDIR both runs are checked, and
compared: the first step at which they saw different batches is named.

One line per finding; exit status 0 when there is none, 1 otherwise, 2 for
bad input (a workdir without a record).
"""

import argparse
import collections
import dataclasses
import json
import os
import sys

import errors
import layout
from data import loader, prepare, tokenizers
from trainer import saved_config
from trainer.errors import ConfigError



class DataOrderLog:
  """Appends a line per step to <workdir>/data_order.jsonl when `enabled`
  (process 0 of a run that fingerprints its batches)."""

  def __init__(self, workdir: str, global_batch: int, num_windows: int,
               enabled: bool):
    self.enabled = enabled
    self.global_batch, self.num_windows = global_batch, num_windows
    if not enabled:
      return
    path = os.path.join(workdir, layout.DATA_ORDER)
    _drop_cut_line(path)
    self._file = open(path, "a")

  def write(self, step: int, fingerprint: str) -> None:
    if not self.enabled:
      return
    epoch = loader.epoch_of(step, self.global_batch, self.num_windows)
    self._file.write(json.dumps(
        {"step": step, "epoch": epoch, "fingerprint": fingerprint}) + "\n")
    self._file.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()


def _drop_cut_line(path: str) -> None:
  """Removes a last line cut short by a kill (no newline at its end), so
  that the next record starts a line of its own; whole lines stay."""
  try:
    f = open(path, "r+b")
  except FileNotFoundError:
    return
  with f:
    size = f.seek(0, os.SEEK_END)
    tail_start = f.seek(max(0, size - 4096))  # records are ~70 bytes
    tail = f.read()
    if tail and not tail.endswith(b"\n"):
      f.truncate(tail_start + tail.rfind(b"\n") + 1)


@dataclasses.dataclass(frozen=True)
class Record:
  line: int
  step: int
  epoch: int
  fingerprint: str


@dataclasses.dataclass
class DataOrder:
  """A workdir's data-order record, read."""
  workdir: str
  path: str
  config: object
  records: list[Record]
  first: dict[int, Record]  # step -> its first record
  findings: list[str]

  def first_step(self) -> int:
    return (self.config.cooldown.from_step + 1
            if self.config.cooldown.steps > 0 else 1)


def read(workdir: str) -> DataOrder:
  path = os.path.join(workdir, layout.DATA_ORDER)
  config = saved_config.load_saved(workdir)
  if not os.path.isfile(path):
    raise ConfigError(f"{workdir!r} holds no {layout.DATA_ORDER}; only runs "
                      "trained with data.fingerprint=True record their "
                      "batches")
  records, findings = [], []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      try:
        fields = json.loads(line)
        record = Record(number, fields["step"], fields["epoch"],
                        fields["fingerprint"])
        valid = (type(record.step) is type(record.epoch) is int and
                 isinstance(record.fingerprint, str))
      except (ValueError, TypeError, KeyError):
        valid = False
      if valid:
        records.append(record)
      else:
        findings.append(f"{path}:{number}: not a data-order record: "
                        f"{line.strip()[:80]!r}")
  first = {}
  for record in records:
    first.setdefault(record.step, record)
  return DataOrder(workdir, path, config, records, first, findings)


def check(run: DataOrder) -> list[str]:
  """Skipped steps, replays that saw another batch, and batches seen twice
  in one epoch."""
  findings = list(run.findings)
  if not run.first:
    return findings + [f"{run.path}: no step recorded"]
  start, last = run.first_step(), max(run.first)
  for step in sorted(s for s in run.first if s < start):
    findings.append(f"{run.path}:{run.first[step].line}: step {step} is "
                    f"before the run's first step, {start}")
  missing = [s for s in range(start, last + 1) if s not in run.first]
  for low, high in _ranges(missing):
    findings.append(f"{run.path}: step {low} is missing" if low == high else
                    f"{run.path}: steps {low}-{high} are missing")
  for record in run.records:
    first = run.first[record.step]
    if record.fingerprint != first.fingerprint:
      findings.append(
          f"{run.path}:{record.line}: step {record.step} replayed with batch "
          f"{record.fingerprint}; line {first.line} has {first.fingerprint}")
  seen = collections.defaultdict(list)
  for step in sorted(run.first):
    record = run.first[step]
    seen[record.epoch, record.fingerprint].append(record)
  for (epoch, fingerprint), same in seen.items():
    if len(same) > 1:
      steps = ", ".join(str(r.step) for r in same)
      findings.append(f"{run.path}:{same[1].line}: steps {steps} of epoch "
                      f"{epoch} saw the same batch {fingerprint}")
  return findings


def recompute(run: DataOrder) -> list[str]:
  """Recorded fingerprints and epochs that differ from those of the batches
  the run's config and data give."""
  c = run.config
  data = prepare.of_config(c, tokenizers.load_dir(  # sft/dpo: the run's
      os.path.join(run.workdir, layout.TOKENIZER)))
  source = loader.source_for(c, data, "train", data.tokenizer.eot_id)
  batch = c.train.batch_size
  ids = loader.window_ids(len(source), batch, c.train.seed,
                         c.data.order_version)
  findings = []
  for step, record in sorted(run.first.items()):
    if step < 1:
      continue
    want = loader.fingerprint(loader.stack([source[i] for i in ids[step - 1]]))
    epoch = loader.epoch_of(step, batch, len(source))
    if (record.fingerprint, record.epoch) != (want, epoch):
      findings.append(
          f"{run.path}:{record.line}: step {step} recorded batch "
          f"{record.fingerprint} of epoch {record.epoch}; the config and "
          f"data give {want} of epoch {epoch}")
  return findings


def compare(a: DataOrder, b: DataOrder) -> list[str]:
  """The first step both runs recorded at which their batches differ."""
  common = sorted(set(a.first) & set(b.first))
  if not common:
    return [f"{a.workdir} and {b.workdir} recorded no step in common"]
  for step in common:
    if a.first[step].fingerprint != b.first[step].fingerprint:
      return [f"{a.workdir} and {b.workdir}: the data order first differs at "
              f"step {step} ({a.first[step].fingerprint} vs "
              f"{b.first[step].fingerprint})"]
  return []


def _ranges(steps: list[int]) -> list[tuple[int, int]]:
  """[3, 4, 5, 9] -> [(3, 5), (9, 9)]."""
  ranges = []
  for step in steps:
    if ranges and ranges[-1][1] == step - 1:
      ranges[-1] = (ranges[-1][0], step)
    else:
      ranges.append((step, step))
  return ranges


def _summary(runs: list[DataOrder], recomputed: bool) -> str:
  parts = []
  for run in runs:
    steps = sorted(run.first)
    parts.append(f"{run.workdir}: steps {steps[0]}-{steps[-1]} in "
                 f"{len(run.records)} records "
                 f"({len(run.records) - len(steps)} replays)")
  checked = ("batches recomputed from the config and data; " if recomputed
             else "")
  same = "; the same batches at every common step" if len(runs) == 2 else ""
  return f"ok: {'; '.join(parts)}; {checked}none skipped or repeated{same}"


@errors.command
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m trainer.audit", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdir")
  parser.add_argument("other_workdir", nargs="?")
  parser.add_argument("--recompute", action="store_true",
                      help="also check every batch against the config and "
                      "data (reads them all again)")
  args = parser.parse_args(argv)
  runs = [read(w) for w in (args.workdir, args.other_workdir) if w]
  findings = []
  for run in runs:
    findings += check(run)
    if args.recompute:
      findings += recompute(run)
  if len(runs) == 2:
    findings += compare(*runs)
  print("\n".join(findings) if findings else _summary(runs, args.recompute))
  return 1 if findings else 0


if __name__ == "__main__":
  sys.exit(main())
