"""The training skeleton every training stage's loop is written with (`stages.training.loop`)
and the harness that runs a loop in this process or on Ray Train (`stages.training.harness`)."""
