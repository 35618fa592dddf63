"""Shared test set-up: quiet TensorFlow, no test touches ~/tensorflow_datasets."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest


@pytest.fixture(autouse=True)
def _isolated_tfds_dir(tmp_path, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tensorflow_datasets'))
