"""A sweep as SLURM job arrays through launch/slurm.sbatch."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import layout
from launch.local import REPO
from errors import BadInput
from launch.sweep.spec import Sweep


def _sbatch_resources() -> list:
  """launch/slurm.sbatch's #SBATCH lines (nodes, GPUs, time: edited there
  for a cluster), without those an array script sets itself."""
  with open(os.path.join(REPO, "launch", "slurm.sbatch")) as f:
    return [line.rstrip("\n") for line in f if line.startswith("#SBATCH")
            and not re.match(r"#SBATCH --(job-name|output|array)\b", line)]


def array_script(tasks: list, job_name: str, what: str, root: str,
                 parallel: int) -> str:
  """A job array whose task i runs tasks[i] through launch/slurm.sbatch (so
  each may span several nodes); one already done exits at once."""
  cases = "\n".join(
      f"  {i}) final={shlex.quote(layout.checkpoint(t.workdir, t.steps))}\n"
      f"     args=({shlex.join(t.args)}) ;;" for i, t in enumerate(tasks))
  limit = f"%{parallel}" if parallel else ""
  return "\n".join([
      "#!/bin/bash",
      f"# The {what}, written by python -m launch.sweep slurm:",
      "# array task i runs the i-th through launch/slurm.sbatch.",
      f"#SBATCH --job-name={job_name}", *_sbatch_resources(),
      f"#SBATCH --array=0-{len(tasks) - 1}{limit}",
      f"#SBATCH --output={root}/slurm-%A_%a.out",
      "set -euo pipefail",
      f"cd {shlex.quote(REPO)}",
      f"export PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}",
      "case $SLURM_ARRAY_TASK_ID in", cases,
      '  *) echo "no task $SLURM_ARRAY_TASK_ID in this array" >&2; exit 2 ;;',
      "esac",
      'if [[ -d $final ]]; then echo "done already: $final"; exit 0; fi',
      'exec bash launch/slurm.sbatch "${args[@]}"', ""])


def slurm(sweep: Sweep, parallel: int, dry_run: bool) -> int:
  """Writes <root>/sweep.sbatch (the runs) and, with cooldowns,
  <root>/cooldowns.sbatch (once the first has succeeded); submits them or,
  with dry_run, prints how."""
  if not dry_run and not shutil.which("sbatch"):
    raise BadInput("sbatch not found on PATH; with --dry-run the scripts "
                    "are written and the submit commands printed")
  stem = os.path.splitext(os.path.basename(sweep.spec))[0]
  arrays = [("sweep", sweep.runs, "runs")]
  branches = [t for t in sweep.tasks if t.parent]
  if branches:
    arrays.append(("cooldowns", branches, "cooldown branches"))
  os.makedirs(sweep.root, exist_ok=True)
  job = "<job id of the first>"
  for i, (name, tasks, what) in enumerate(arrays):
    path = os.path.join(sweep.root, f"{name}.sbatch")
    with open(path, "w") as f:
      f.write(array_script(tasks, f"{stem}-{name}",
                           f"{len(tasks)} {what} of {sweep.spec}",
                           sweep.root, parallel))
    command = ["sbatch", *([f"--dependency=afterok:{job}"] if i else []), path]
    if dry_run:
      print(shlex.join(command))
      continue
    submitted = subprocess.run([command[0], "--parsable", *command[1:]],
                               capture_output=True, text=True)
    if submitted.returncode:
      print(f"error: {shlex.join(command)}: {submitted.stderr.strip()}",
            file=sys.stderr)
      return submitted.returncode
    job = submitted.stdout.strip().split(";")[0]  # "id" or "id;cluster"
    print(f"submitted job {job}: {shlex.join(command)}")
  return 0
