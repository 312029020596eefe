"""Runs N processes of train.py on this machine, as a multi-host run would.

  python launch/local.py --num_processes=2 --devices_per_process=2 -- \
      --config.mesh.fsdp=2 --workdir=runs/x
  python launch/local.py --dry_run -- ARGS       # print the commands only

Each process gets CPU devices of its own (XLA_FLAGS=
--xla_force_host_platform_device_count) and joins the run through a
coordinator on 127.0.0.1 (a free port, or --port). Everything after `--` goes
to train.py, which runs in the repository root: relative paths are relative to
it. Process 0 prints to the console; process i > 0 writes to
<log_dir>/process_<i>.log. When a process fails the others are stopped and its
exit status is returned; SIGINT / SIGTERM are forwarded to every process.
"""

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def commands(num_processes: int, devices_per_process: int, port: int,
             train_args: list[str], log_dir: str) -> list[tuple]:
  """(environment variables set, argv, log file or None) of each process."""
  address = f"127.0.0.1:{port}"
  xla_flags = " ".join(filter(None, [
      os.environ.get("XLA_FLAGS"),
      f"--xla_force_host_platform_device_count={devices_per_process}"]))
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags,
         "JAX_COORDINATOR_BIND_ADDRESS": address}  # loopback only
  return [(env, [sys.executable, "train.py", f"--coordinator_address={address}",
                 f"--num_processes={num_processes}", f"--process_id={i}",
                 *train_args],
           os.path.join(log_dir, f"process_{i}.log") if i else None)
          for i in range(num_processes)]


def shell_line(env: dict, argv: list[str], log: str | None) -> str:
  line = shlex.join([f"{k}={v}" for k, v in env.items()] + argv)
  return line + (f" > {shlex.quote(log)} 2>&1" if log else "")


def exit_status(returncode: int) -> int:
  return returncode if returncode >= 0 else 128 - returncode  # killed: 128+sig


def run(procs: list[tuple], grace_s: float = 10.0) -> int:
  """Starts the processes in the repository root and waits for all of them;
  0, or the exit status of the first one that failed (the others are then
  terminated, killed after grace_s)."""
  children = []

  def stop(signum, _=None):
    for p in children:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {signum: signal.signal(signum, stop)
              for signum in (signal.SIGINT, signal.SIGTERM)}
  try:
    for env, argv, log in procs:
      out = open(log, "w") if log else None
      children.append(subprocess.Popen(
          argv, cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=out))
      if out:
        out.close()  # the child holds its own copy
    status, deadline = 0, None
    while True:
      codes = [p.poll() for p in children]
      if not status:
        status = next((exit_status(c) for c in codes if c), 0)
        if status:  # the others would wait for the failed one forever
          stop(signal.SIGTERM)
          deadline = time.monotonic() + grace_s
      if None not in codes:
        return status
      if deadline and time.monotonic() > deadline:
        stop(signal.SIGKILL)
      time.sleep(0.1)
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def main(argv: list[str]) -> int:
  ours, train_args = argv, []
  if "--" in argv:
    i = argv.index("--")
    ours, train_args = argv[:i], argv[i + 1:]
  parser = argparse.ArgumentParser(
      prog="launch/local.py", usage="%(prog)s [options] -- [train.py args]",
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="CPU devices of each process")
  parser.add_argument("--port", type=int, default=0,
                      help="coordinator port on 127.0.0.1 (0: a free one)")
  parser.add_argument("--log_dir", default="runs/local_logs",
                      help="where process_<i>.log of processes i > 0 go, "
                      "relative to the repository root")
  parser.add_argument("--dry_run", action="store_true",
                      help="print the commands (with environment) and exit")
  args = parser.parse_args(ours)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be positive")
  port = args.port or free_port()
  log_dir = os.path.join(REPO, args.log_dir)
  procs = commands(args.num_processes, args.devices_per_process, port,
                   train_args, log_dir)
  if args.dry_run:
    print("\n".join(shell_line(*p) for p in procs))
    return 0
  os.makedirs(log_dir, exist_ok=True)
  print(f"launch: {args.num_processes} processes x {args.devices_per_process} "
        f"CPU devices, coordinator 127.0.0.1:{port}; processes 1.. log to "
        f"{log_dir}", file=sys.stderr, flush=True)
  return run(procs)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
