"""The table of a sweep's runs: printed once, or redrawn live."""

import shutil
import sys
import time

from launch.sweep.status import STATUSES, Metrics, _state, _status

REDRAW_S = 2         # the live table on a terminal
SUMMARY_S = 60       # the summary line otherwise


def _rows(tasks: list, metrics: dict) -> list:
  rows = []
  for task in tasks:
    state, m = _state(task.workdir), metrics[task.name].update()
    rows.append({"name": task.name, "status": _status(task, state),
                 "step": m.step, "steps": task.steps,
                 "from_step": task.from_step, "loss": m.loss,
                 "eval_loss": m.last_eval.get("eval_loss"),
                 "wall_s": state.get("wall_s")})
  return rows


def _duration(seconds) -> str:
  if seconds is None:
    return ""
  minutes, s = divmod(int(seconds), 60)
  hours, m = divmod(minutes, 60)
  return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s" if m else f"{s}s"


def _number(x) -> str:
  return "" if x is None else f"{x:.4f}"


def _table(rows: list) -> list:
  width = max(len("run"), *(len(r["name"]) for r in rows))
  lines = [f"{'run':<{width}}  {'status':<11}  {'step/steps':>13}  "
           f"{'loss':>7}  {'eval loss':>9}  {'elapsed':>7}"]
  for r in rows:
    progress = f"{r['step']}/{r['steps']}"
    lines.append(f"{r['name']:<{width}}  {r['status']:<11}  {progress:>13}  "
                 f"{_number(r['loss']):>7}  {_number(r['eval_loss']):>9}  "
                 f"{_duration(r['wall_s']):>7}")
  return lines


def _counts(rows: list) -> str:
  counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
  return ", ".join(f"{n} {s}" for s, n in counts.items())


class Display:
  """On a terminal, the table redrawn in place every REDRAW_S with events
  scrolling above it; otherwise one line per event and a summary line every
  SUMMARY_S."""

  def __init__(self, tasks: list, out=sys.stdout):
    self.tasks, self.out, self.tty = tasks, out, out.isatty()
    self.metrics = {t.name: Metrics(t.workdir) for t in tasks}
    self.start = {n: m.update().step for n, m in self.metrics.items()}
    self.started = self.shown = time.monotonic()
    self.drawn = 0  # lines of the table on the terminal

  def event(self, text: str) -> None:
    self._erase()
    print(text, file=self.out, flush=True)
    if self.tty:
      self.update(force=True)

  def update(self, force: bool = False) -> None:
    now = time.monotonic()
    if not force and now - self.shown < (REDRAW_S if self.tty else SUMMARY_S):
      return
    self.shown = now
    rows = _rows(self.tasks, self.metrics)
    footer = f"{_counts(rows)}; ETA {self._eta(rows, now)}"
    if not self.tty:
      print(f"sweep: {footer}", file=self.out, flush=True)
      return
    columns, lines = shutil.get_terminal_size()
    shown, hidden = _fit(rows, lines - 3)
    table = _table(shown) + ([hidden] if hidden else []) + [footer]
    self._erase()
    print("\n".join(line[:columns - 1] for line in table), file=self.out,
          flush=True)
    self.drawn = len(table)

  def _erase(self) -> None:
    if self.drawn:
      self.out.write(f"\x1b[{self.drawn}F\x1b[J")
      self.drawn = 0

  def _eta(self, rows: list, now: float) -> str:
    """The steps left over the steps per second of this invocation."""
    done = sum(max(0, r["step"] - max(self.start[r["name"]], r["from_step"]))
               for r in rows)
    left = sum(r["steps"] - max(r["step"], r["from_step"]) for r in rows
               if r["status"] not in ("done", "failed"))
    if not left:
      return "0s"
    return _duration(left * (now - self.started) / done) if done else "?"


def _fit(rows: list, room: int) -> tuple:
  """(the rows a terminal has room for, the busiest first, in their order;
  a line counting the others, or None)."""
  if len(rows) <= room:
    return rows, None
  order = ("running", "failed", "interrupted", "queued", "done")
  keep = set(sorted(range(len(rows)), key=lambda i: order.index(
      rows[i]["status"]))[:max(room - 1, 0)])
  hidden = [r for i, r in enumerate(rows) if i not in keep]
  return ([r for i, r in enumerate(rows) if i in keep],
          f"... and {len(hidden)} more: {_counts(hidden)}")
