"""Sweeps' launchers and report: runs as Ray tasks (`sweep_ray`) and the aggregated table
and plot (`sweep_report`). The grid and the local launcher are `vgg_flax.sweep`."""
