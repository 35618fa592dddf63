"""Training: the train state and pure steps (`step`), optimisers and schedules (`optim`),
checkpoints and the resume order (`checkpoint`), launch checks (`preflight`), the workdir's
lease (`lease`) and metrics and progress (`reporting`)."""
