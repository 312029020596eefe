"""Research tools that read run tables and workdirs: scaling-law fits, plots
and a compute-optimal planner. Nothing here imports the trainer."""
