"""Training: the loop, optimizers, LR schedules, precision, checkpoints and logs."""
