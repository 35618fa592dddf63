"""Shared test set-up: quiet TensorFlow, a shared XLA compilation cache, no test
touches ~/tensorflow_datasets."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Many tests (and the training subprocesses they start, which inherit the
# environment) compile the same tiny train step: compile it once per session.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.pytest_cache', 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pytest


@pytest.fixture(autouse=True)
def _isolated_tfds_dir(tmp_path, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tensorflow_datasets'))
