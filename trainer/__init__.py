"""Training machinery: config checks, mesh, optimizer, state, checkpoints,
metrics, and the train / eval / sample loops."""
