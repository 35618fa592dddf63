"""Image folders (`config.dataset='image_folder'`): three layouts, checked, split and read.

  ROOT/train/<class>/<image>, ROOT/test/<class>/...   config.data_dir=ROOT (any split names)
  DATA/<class>/<image> and TEST/<class>/<image>       config.data_dir=DATA, config.eval_data_dir=TEST
  PHOTOS/<class>/<image>                              config.data_dir=PHOTOS, config.validation_split=0.2

Images sit directly in their class folder: a folder inside a class folder is
refused (its images would silently be left out), and names starting with '.'
are ignored. Extensions match in any case: .jpg, .jpeg, .png, .bmp, .gif, .webp
(what TF's decode_image reads; of a GIF or WebP animation, the first frame).
The layout is checked from the
folder listings, before any image is decoded; then every image is decoded
once (the verdict is cached) so that an unreadable file is named before
training. The files are read through `ImageFiles`, a `tfds.ImageFolder` over
given file lists, like any other tfds dataset.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import math
import os
import random
from typing import Mapping, Sequence

from absl import logging
import ml_collections
import PIL.Image
from vgg_flax.runtime.quiet_tf import graph_fn, tf
import tensorflow_datasets as tfds

from vgg_flax.data.data_sources import DataError, cached_json

IMAGE_FOLDER_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
_EXTENSIONS = ', '.join(IMAGE_FOLDER_EXTENSIONS)
LAYOUTS = ('<root>/<class>/<image> with config.validation_split or config.eval_data_dir, '
           'or <root>/train/<class>/<image> and <root>/test/<class>/<image>')

Files = tuple[tuple[str, str], ...]  # (class name, path) pairs.


def get_builder(config: ml_collections.ConfigDict) -> ImageFiles:
  """The builder of the image folder(s) `config` names, checked; see the module's layouts.

  Args:
    config: uses `data_dir`, `eval_data_dir`, `validation_split`, `seed` and
      `input.skip_corrupt`.

  Raises:
    DataError: a missing folder, a layout that does not fit the fields, an
      empty class, class lists that differ, or unreadable images.
  """
  root, splits, class_names = list_files(config)
  where = ' and '.join(p for p in (root, config.get('eval_data_dir')) if p)
  files = sorted({path for split in splits.values() for _, path in split})
  identity = _fingerprint(files)
  bad = set(_unreadable_images(where, files, identity))
  if bad:
    shown = ', '.join(sorted(bad)[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
    if not config.input.skip_corrupt:
      raise DataError(f'{len(bad)} of {len(files)} files in image folder {where} are not '
                      f'readable images: {shown}. Remove them, or set '
                      'config.input.skip_corrupt=True to skip them.')
    logging.warning('Skipping %d unreadable files of %d in %s (config.input.skip_corrupt): %s',
                    len(bad), len(files), where, shown)
    splits = {s: tuple(f for f in split if f[1] not in bad) for s, split in splits.items()}
  return ImageFiles(root, splits, class_names, identity)


def list_files(config: ml_collections.ConfigDict
               ) -> tuple[str, dict[str, Files], tuple[str, ...]]:
  """`(root, {split: files}, class names)` of the config's layout, from listings only.

  ROOT/<split>/<class> gives its split folders (the union of their classes, as
  tfds.ImageFolder); `eval_data_dir` gives 'train' and 'test' (the same
  classes in both); `validation_split` gives 'train' and 'validation'
  (`split_off`). ROOT is taken for ROOT/<split>/<class> when none of its
  folders holds images and some hold folders.
  """
  root, eval_root = config.data_dir, config.get('eval_data_dir')
  fraction = config.get('validation_split', 0.0)
  if not root:
    raise DataError(f"config.dataset='image_folder' needs config.data_dir: {LAYOUTS}.")
  for path, field in ((root, 'data_dir'), (eval_root, 'eval_data_dir')):
    if path and not tf.io.gfile.isdir(path):
      raise DataError(f'image folder {path} (config.{field}) does not exist; expected {LAYOUTS}.')
  label = f'image folder {root} (config.data_dir)'
  top = _listing(root)
  children = {name: _listing(os.path.join(root, name)) for name in top.folders}
  if children and not any(c.images for c in children.values()) and any(
      c.folders for c in children.values()):  # ROOT/<split>/<class>/<image>.
    if fraction:
      raise DataError(f'config.validation_split={fraction} splits a folder of class folders, but '
                      f'{label} holds split folders ({_few(children)}); set it to 0 to use them.')
    if eval_root:
      raise DataError(f'{label} holds split folders ({_few(children)}); with '
                      'config.eval_data_dir it must hold the training class folders.')
    return _split_folders(root, children)
  classes = _classes(root, label, top, children)
  if eval_root:
    eval_classes = _classes(eval_root, f'image folder {eval_root} (config.eval_data_dir)')
    if set(classes) != set(eval_classes):
      only = [f'only in {folder}: {_few(sorted(set(a) - set(b)))}'
              for folder, a, b in ((root, classes, eval_classes), (eval_root, eval_classes, classes))
              if set(a) - set(b)]
      raise DataError(f'the class folders of {root} (config.data_dir) and {eval_root} '
                      f'(config.eval_data_dir) differ: {"; ".join(only)}.')
    return root, {'train': _paths(root, classes), 'test': _paths(eval_root, eval_classes)}, tuple(
        sorted(classes))
  if not fraction:
    raise DataError(f'{label} holds class folders ({_few(classes)}) but no train/ and test/ '
                    'folders: set config.validation_split (e.g. 0.2) or config.eval_data_dir.')
  for name, images in classes.items():
    if len(images) < 2:
      raise DataError(f'class folder {os.path.join(root, name)} has 1 image; '
                      f'config.validation_split={fraction} needs 2 or more in each class.')
  kept, held_out = split_off(classes, fraction, config.seed)
  return root, {'train': _paths(root, kept), 'validation': _paths(root, held_out)}, tuple(
      sorted(classes))


def _split_folders(root: str, splits: Mapping[str, _Listing]
                   ) -> tuple[str, dict[str, Files], tuple[str, ...]]:
  """ROOT/<split>/<class>/<image>: every split folder, the union of their classes."""
  by_split = {}
  for name, split in splits.items():
    path = os.path.join(root, name)
    if not split.folders:
      raise DataError(f'split folder {path} has no class folders; expected '
                      f'{root}/<split>/<class>/<image> ({_EXTENSIONS}).')
    by_split[name] = _paths(path, _classes(path, f'split folder {path}', split))
  return root, by_split, tuple(sorted({c for s in by_split.values() for c, _ in s}))


def split_off(classes: Mapping[str, Sequence[str]], fraction: float, seed: int
              ) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
  """`(kept, held_out)`: each class's image names split, a fraction held out.

  Each class holds out round(n * fraction) of its n images (at least 1, at
  most n - 1): those with the smallest SHA-256 of (seed, class, name). The
  split is a function of the names and the seed only: the same files on every
  run and host, whatever order the folder is listed in or where it is mounted.
  """
  kept, held_out = {}, {}
  for name, images in classes.items():
    ranked = sorted(images, key=lambda image: hashlib.sha256(
        f'{seed}\0{name}\0{image}'.encode()).digest())
    k = min(max(math.floor(len(images) * fraction + 0.5), 1), len(images) - 1)
    held_out[name], kept[name] = tuple(sorted(ranked[:k])), tuple(sorted(ranked[k:]))
  return kept, held_out


@dataclasses.dataclass(frozen=True)
class _Listing:
  """A folder's visible subfolders and image files (names, sorted); other files are ignored."""
  folders: tuple[str, ...]
  images: tuple[str, ...]


def _listing(path: str) -> _Listing:
  folders, images = [], []
  for entry in sorted(tf.io.gfile.listdir(path)):  # gfile: gs:// folders work too.
    name = entry.rstrip('/')
    if name.startswith('.'):  # .DS_Store, .ipynb_checkpoints, ...
      continue
    if name.lower().endswith(IMAGE_FOLDER_EXTENSIONS):
      images.append(name)
    elif entry.endswith('/') or tf.io.gfile.isdir(os.path.join(path, name)):
      folders.append(name)
  return _Listing(tuple(folders), tuple(images))


def _classes(root: str, label: str, top: _Listing | None = None,
             children: Mapping[str, _Listing] | None = None) -> dict[str, tuple[str, ...]]:
  """{class: its image names} of a folder of class folders (`label` names it in errors)."""
  top = top or _listing(root)
  if not top.folders:
    found = 'holds images but no class folders' if top.images else 'holds no class folders'
    raise DataError(f'{label} {found}; expected {root}/<class>/<image> ({_EXTENSIONS}).')
  classes = {}
  for name in top.folders:
    path = os.path.join(root, name)
    folder = children[name] if children else _listing(path)
    if folder.folders:
      raise DataError(f'class folder {path} holds folders ({_few(folder.folders)}): images must '
                      'sit directly in their class folder; move them up or out.')
    if not folder.images:
      raise DataError(f'class folder {path} holds no images ({_EXTENSIONS}); add images or '
                      'remove the folder.')
    classes[name] = folder.images
  return classes


def _paths(root: str, classes: Mapping[str, Sequence[str]]) -> Files:
  return tuple((name, os.path.join(root, name, image))
               for name, images in classes.items() for image in images)


def _few(names, shown: int = 3) -> str:
  names = list(names)
  return ', '.join(names[:shown]) + (f' and {len(names) - shown} more' if len(names) > shown
                                     else '')


def _fingerprint(files: Sequence[str]) -> str:
  """Changes when a file is added, removed or rewritten (on object storage, where a stat
  per file costs a request: when the names change)."""
  def identity(path: str) -> str:
    if '://' in path:
      return path
    stat = os.stat(path)
    return f'{path}\t{stat.st_size}\t{stat.st_mtime_ns}'
  return _sha256_lines(map(identity, files))


def _sha256_lines(lines) -> str:
  digest = hashlib.sha256()
  for line in lines:  # One at a time: an ImageNet-sized folder has a million.
    digest.update(line.encode() + b'\n')
  return digest.hexdigest()


def _is_readable_image(path: str) -> bool:
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:  # Read whole: PIL's WebP seeks past a GFile's end.
      data = f.read()
    with PIL.Image.open(io.BytesIO(data)) as image:
      image.load()  # A full decode: verify() alone passes truncated JPEGs.
    return True
  except Exception:  # pylint: disable=broad-except  (PIL raises many kinds)
    return False


def _unreadable_images(where: str, files: list[str], fingerprint: str) -> list[str]:
  """The files of `files` that do not decode; cached while the folder is unchanged.

  Decoding every image takes minutes on an ImageNet-sized folder, so the
  verdict is kept in `data_sources.cache_dir()` under the folder's name and
  its fingerprint: any added, removed or rewritten file checks it again.
  """
  def check():
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      return [f for f, ok in zip(files, pool.map(_is_readable_image, files)) if not ok]
  return cached_json('image_folders', where, fingerprint, check)


class StillImage(tfds.features.Image):
  """An RGB image feature that also reads animated files (WebP, GIF) as their first frame,
  which tfds' decodes as a 4-D stack of frames."""

  def decode_example(self, example):
    image = tf.image.decode_image(example, channels=3, expand_animations=False)
    image.set_shape((None, None, 3))
    return image


class ImageFiles(tfds.ImageFolder, skip_registration=True):
  """A `tfds.ImageFolder` over given files per split, whatever folders they are in.

  tfds' own lists ROOT/<split>/<class> itself; this one takes `list_files`'s
  lists, in ImageFolder's read order: by class and path, then shuffled by a
  generator seeded with the split's name (so ROOT/<split>/<class> folders are
  read as they always were).
  """
  name = 'image_folder'

  def __init__(self, root: str, splits: Mapping[str, Files], class_names: Sequence[str],
               identity: str = ''):
    self._class_names = list(class_names)
    self._splits = {}
    for split, files in splits.items():
      files = sorted(files)
      random.Random(split).shuffle(files)
      self._splits[split] = tuple(files)
    self._identity = identity
    # Not ImageFolder's __init__, which lists ROOT/<split>/<class>: its base's.
    tfds.core.DatasetBuilder.__init__(self, data_dir=root)  # pylint: disable=non-parent-init-called
    self._data_dir = root  # As ImageFolder: the images themselves, nothing prepared.
    self.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[len(files)], num_bytes=0)
        for split, files in self._splits.items()]))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description='Images in class folders (vgg_flax.data.image_folders).',
        features=tfds.features.FeaturesDict({
            'image': StillImage(),
            'label': tfds.features.ClassLabel(names=self._class_names),
            'image/filename': tfds.features.Text()}),
        supervised_keys=('image', 'label'))

  def _as_dataset(self, split, shuffle_files: bool = False, decoders=None,
                  read_config=None) -> tf.data.Dataset:
    del read_config  # Nothing to configure: the files are read as they are.
    files = self.files(str(split))
    label = self.info.features['label']
    ds = tf.data.Dataset.from_tensor_slices((
        tf.constant([path for _, path in files], tf.string),
        tf.constant([label.str2int(name) for name, _ in files], tf.int64)))
    if shuffle_files:  # vgg_flax never asks: its order is a function of the seed.
      ds = ds.shuffle(len(files))

    def load(path, label):
      return self.info.features.decode_example(
          {'image': tf.io.read_file(path), 'label': label, 'image/filename': path},
          decoders=decoders)
    return ds.map(graph_fn(load), num_parallel_calls=tf.data.AUTOTUNE)

  def files(self, split: str) -> Files:
    """The (class name, path) pairs of `split`, in read order."""
    if split not in self._splits:
      raise DataError(f'{split!r} is not a split of image folder {self.data_dir}; available: '
                      f'{sorted(self._splits)}.')
    return self._splits[split]

  def names_sha256(self, split: str) -> str:
    """SHA-256 of the split's 'class/name' list: which files, wherever the folder is mounted."""
    return _sha256_lines(sorted(f'{name}/{os.path.basename(path)}'
                                for name, path in self.files(split)))

  def cache_key(self, split: str) -> str:
    """Changes with the split's files, or when any file of the folder changes."""
    return _sha256_lines([self._identity] + sorted(path for _, path in self.files(split)))
