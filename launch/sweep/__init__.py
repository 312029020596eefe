"""Config sweeps (python -m launch.sweep; the commands and the spec format
are cli.py's docstring):

  spec.py        a spec expanded into its runs and cooldown branches (Task,
                 Sweep, load); the folders under its root that hold none
  run_config.py  a run's config as train.py builds it from the same flags,
                 checked; its digest and FLOPs per step
  status.py      what a workdir holds: the sweep's lock, its state file, the
                 run's metrics, and the status they give
  table.py       the table of runs, and its live display
  queue.py       the local queue of train.py processes
  results.py     results.csv and results.json
  slurm.py       SLURM job array scripts
  cli.py         the command line
"""
