"""What every command runs on: one-line errors (`cli`, `errors`), quiet libraries
(`quiet`, `quiet_tf`), signals (`preemption`) and several processes (`multihost`)."""
