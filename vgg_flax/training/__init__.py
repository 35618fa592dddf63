"""Training: the train state and pure steps (`step`), optimisers and schedules (`optim`),
checkpoints and the resume order (`checkpoint`), launch checks (`preflight`), what a launch
sets up before its first step (`launch`), the workdir's lease (`lease`), metrics and
progress (`reporting`) and the trainer's reports of them (`train_reports`)."""
