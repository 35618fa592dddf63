"""`digits`: scikit-learn's handwritten digits as a tfds dataset, built offline.

The 1,797 8x8 grey images (values 0-16, 10 classes) ship inside scikit-learn,
so `download_and_prepare()` builds this dataset in seconds without a network.
They are scaled to 0-255 and resized to 32x32, the smallest side that survives
VGG's five 2x2 poolings. The train/test split is a fixed stratified 80/20 split
(1,437 / 360 examples).

Citation (UCI Machine Learning Repository):

  E. Alpaydin and C. Kaynak. Optical Recognition of Handwritten Digits.
  UCI Machine Learning Repository, 1998. https://doi.org/10.24432/C50P49
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image

from vgg_flax.runtime import quiet_tf  # pylint: disable=unused-import  # Before tfds imports TF.
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
NUM_CLASSES = 10
_MAX_VALUE = 16  # load_digits() pixel values are counts of set bits, 0-16.
_TEST_FRACTION = 0.2
_SPLIT_SEED = 0  # Fixed: the split must not change between builds or machines.

_CITATION = """\
@misc{alpaydin1998digits,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {{Optical Recognition of Handwritten Digits}},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  note = {DOI: https://doi.org/10.24432/C50P49}
}
"""


def _to_image(pixels: np.ndarray) -> np.ndarray:
  """Maps one 8x8 0-16 image to a 32x32x1 uint8 image on the 0-255 scale."""
  grey = np.round(pixels.reshape(8, 8) * (255.0 / _MAX_VALUE)).astype(np.uint8)
  big = Image.fromarray(grey, mode='L').resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
  return np.asarray(big, dtype=np.uint8)[:, :, None]


def split_indices() -> dict[str, np.ndarray]:
  """Returns the indices into `load_digits()` of the train and test examples."""
  # scikit-learn (a second to import) only when the digits are built.
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  labels = sk_datasets.load_digits().target
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=_TEST_FRACTION, stratify=labels,
      random_state=_SPLIT_SEED)
  return {'train': np.sort(train), 'test': np.sort(test)}


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, resized to 32x32 grey images."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Stratified 80/20 split (random_state=0), 32x32 bilinear.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 1), encoding_format='png'),
            'label': tfds.features.ClassLabel(
                names=[str(i) for i in range(NUM_CLASSES)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
        citation=_CITATION,
    )

  # tfds prints these in bold on stdout; a built-in dataset says it in the log.
  def _log_download_bytes(self) -> None:
    logging.info('Preparing the built-in digits in %s (once, a few seconds).', self.data_dir)

  def _log_download_done(self) -> None:
    logging.info('Prepared the built-in digits in %s.', self.data_dir)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ships with scikit-learn: nothing to download.
    return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

  def _generate_examples(self, indices: np.ndarray):
    from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
    digits = sk_datasets.load_digits()
    for i in indices:
      # The index into load_digits() is a stable, unique key.
      yield int(i), {'image': _to_image(digits.data[i]), 'label': int(digits.target[i])}


@dataclasses.dataclass(frozen=True)
class Processes:
  """This process's place in the job and the two collectives `prepare` uses."""
  index: int
  count: int
  gather: Callable[[int], Sequence[int]]  # One int from every process, in process order.
  barrier: Callable[[str], None]  # Every process must call it, with the same name.


def jax_processes() -> Processes:
  """The processes of this JAX job (`jax.distributed`), and its collectives."""
  return Processes(jax.process_index(), jax.process_count(),
                   lambda x: multihost_utils.process_allgather(np.int32(x)).tolist(),
                   multihost_utils.sync_global_devices)


def prepare(data_dir: str | None, processes: Processes | None = None) -> Digits:
  """Returns the prepared `digits` builder, building it offline where it is missing.

  On several processes, every process takes part in the same collectives
  whatever it finds in its `data_dir`, shared or one per host (a barrier that
  only some processes reach deadlocks the job): they gather who lacks the
  data, then those build it one at a time, in process order, each build
  followed by a barrier. A shared data_dir is built once (the next processes
  find it built); per-host ones cost one build (seconds) each.

  Args:
    data_dir: the tfds data_dir; None = tfds's default.
    processes: default `jax_processes()`.
  """
  processes = processes or jax_processes()
  builder = Digits(data_dir=data_dir)
  if processes.count == 1:
    if not builder.is_prepared():
      _build(builder, data_dir)
    return Digits(data_dir=data_dir)
  missing = processes.gather(int(not builder.is_prepared()))
  for process in [i for i, m in enumerate(missing) if m]:  # The same list everywhere.
    if process == processes.index:
      builder = Digits(data_dir=data_dir)
      if not builder.is_prepared():  # Unless an earlier process built this very dir.
        _build(builder, data_dir)
    processes.barrier(f'vgg_flax: digits prepared by process {process}')
  return Digits(data_dir=data_dir)


def _build(builder: Digits, data_dir: str | None) -> None:
  tfds.display_progress_bar(False)  # Seconds of build: its bars would only clutter the log.
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except FileExistsError:
    # Independent trainers (a sweep's runs side by side) built the same folder
    # at once and another one renamed its copy into place first: the same data.
    if not Digits(data_dir=data_dir).is_prepared():
      raise
  finally:
    tfds.display_progress_bar(True)
