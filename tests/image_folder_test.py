"""Issue 23: image folders in three layouts, split by a fraction, normalised with their own
constants; their errors, one line each; the real trainer, evaluate and predict on each layout.

The data layer is tested in this process on generated RGB folders; the command lines run
once per layout (`cli_test.run_clis`: real `python -m ...` children of one warm driver).
"""

import importlib.util
import json
import os
import random
import re
import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from cli_test import run_clis  # tests/cli_test.py
from helpers import DEFAULT_CONFIG, override
from vgg_flax import config as config_lib
from vgg_flax.data import image_folders
from vgg_flax.data import input_pipeline as ip
from vgg_flax.data.input_pipeline import DataError

CLASSES = ('bird', 'cat', 'golden retriever')  # A name with a space.
LAYOUTS = ('<root>/<class>/<image> with config.validation_split or config.eval_data_dir, '
           'or <root>/train/<class>/<image> and <root>/test/<class>/<image>')
EXTENSIONS = '.jpg, .jpeg, .png, .bmp, .gif, .webp'
TINY = ['--config=configs/default.py', '--config.dataset=image_folder', '--config.model.depth=11',
        '--config.model.width=8', '--config.model.fc_dim=32', '--config.num_epochs=1',
        '--config.batch_size=8', '--config.image_size=32', '--config.model.conv_impl=xla',
        '--config.log_every_steps=1']


def _write(folder, n, seed, classes=CLASSES, ext='.png'):
  """`n` distinct 40x40 RGB images per class, each class a colour of its own."""
  rng = np.random.default_rng(seed)
  for k, name in enumerate(classes):
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    for i in range(n):
      pixels = rng.integers(0, 90, (40, 40, 3)) + np.roll([150, 60, 0], k)
      Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, name, f'{i:02d}{ext}'))


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """The three layouts: ROOT/{train,test}/<class>, data/ + test/, photos/ (10 per class)."""
  tmp = tmp_path_factory.mktemp('images')
  _write(tmp / 'root' / 'train', 8, 0)
  _write(tmp / 'root' / 'test', 3, 1)
  _write(tmp / 'data', 8, 2)
  _write(tmp / 'test', 3, 3)
  _write(tmp / 'photos', 10, 4)
  return tmp


def _config(**overrides):
  """configs/default.py (the digits' one-channel constants) on an image folder."""
  spec = importlib.util.spec_from_file_location('default_config', DEFAULT_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.dataset, config.batch_size, config.image_size = 'image_folder', 8, 32
  return override(config, **{k.replace('__', '.'): v for k, v in overrides.items()})


def _setup(**overrides):
  config = _config(**overrides)
  config_lib.validate(config)
  builder = ip.get_builder(config)
  return config, builder, ip.dataset_info(config, builder)


def _error(**overrides) -> str:
  with pytest.raises(ValueError) as e:
    _setup(**overrides)
  return str(e.value)


def test_the_three_layouts_give_their_splits_and_classes(folders):
  for overrides, splits in [
      (dict(data_dir=str(folders / 'root')), {'train': 24, 'test': 9}),
      (dict(data_dir=str(folders / 'data'), eval_data_dir=str(folders / 'test')),
       {'train': 24, 'test': 9}),
      (dict(data_dir=str(folders / 'photos'), validation_split=0.2),
       {'train': 24, 'validation': 6})]:
    config, builder, info = _setup(**overrides)
    assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == splits
    assert info.class_names == CLASSES and info.num_channels == 3
    assert (info.train_split, info.eval_split) == tuple(splits)  # eval_split '': the other one.
    batches = list(ip.eval_batches(config, builder, info))
    assert sum(b['mask'].sum() for b in batches) == splits[info.eval_split]


def test_the_root_train_test_layout_is_read_in_tfds_image_folders_order(folders):
  _, builder, _ = _setup(data_dir=str(folders / 'root'))
  reference = tfds.ImageFolder(str(folders / 'root'))
  for split in ('train', 'test'):
    names = [ex['image/filename'].decode() for ex in tfds.as_numpy(
        reference.as_dataset(split=split, shuffle_files=False))]
    assert [path for _, path in builder.files(split)] == names


def test_the_fraction_split_depends_on_file_names_and_seed_only(folders, tmp_path):
  classes = {name: sorted(os.listdir(folders / 'photos' / name)) for name in CLASSES}
  kept, held_out = image_folders.split_off(classes, 0.2, seed=0)
  assert {n: len(h) for n, h in held_out.items()} == {n: 2 for n in CLASSES}  # Stratified.
  for name in CLASSES:
    assert sorted(kept[name] + held_out[name]) == classes[name]
  # Another listing order (another file system, another host): the same split.
  shuffled = {name: random.Random(1).sample(files, len(files)) for name, files in classes.items()}
  assert image_folders.split_off(shuffled, 0.2, seed=0) == (kept, held_out)
  assert image_folders.split_off(classes, 0.2, seed=1)[1] != held_out  # A function of the seed.
  # Small classes: at least one image held out, at least one kept.
  assert image_folders.split_off({'a': ['x', 'y']}, 0.01, 0) in (
      ({'a': ('x',)}, {'a': ('y',)}), ({'a': ('y',)}, {'a': ('x',)}))
  assert len(image_folders.split_off({'a': list('abcd')}, 0.9, 0)[0]['a']) == 1
  # The folder copied elsewhere, its files written in reverse order: the same held-out files.
  copy = tmp_path / 'elsewhere'
  for name in CLASSES:
    (copy / name).mkdir(parents=True)
    for file in reversed(classes[name]):
      shutil.copy(folders / 'photos' / name / file, copy / name / file)
  builders = [_setup(data_dir=str(d), validation_split=0.2)[1]
              for d in (folders / 'photos', folders / 'photos', copy)]
  assert len({b.names_sha256('validation') for b in builders}) == 1
  assert builders[0].files('validation') == builders[1].files('validation')
  held = {f'{n}/{f}' for n, files in held_out.items() for f in files}
  assert {f'{n}/{os.path.basename(p)}' for n, p in builders[2].files('validation')} == held


def test_held_out_files_are_never_trained_on_by_any_process(folders):
  # Fixed 40 px crops of the 40 px images, no flip: each row is one file's pixels.
  config, builder, info = _setup(
      data_dir=str(folders / 'photos'), validation_split=0.2, image_size=40,
      input__scale_min=40, input__scale_max=40, input__eval_resize=40,
      input__train_crop='center')
  file_of = {np.asarray(Image.open(path).convert('RGB')).tobytes(): (name, path)
             for split in ('train', 'validation') for name, path in builder.files(split)}
  assert len(file_of) == 30

  def files_read(index, count):
    batches = ip.train_batches(config, builder, info, end_step=ip.steps_per_epoch(config, info),
                               process_index=index, process_count=count, normalized=False)
    return [file_of[row.tobytes()] for batch in batches for row in batch['image']]

  one = files_read(0, 1)
  two = files_read(0, 2) + files_read(1, 2)
  assert sorted(one) == sorted(two) == sorted(builder.files('train'))
  assert not set(one) & set(builder.files('validation'))


def test_extensions_in_any_case_hidden_files_and_other_files(tmp_path):
  formats = {'.jpg': 'JPEG', '.JPG': 'JPEG', '.jpeg': 'JPEG', '.png': 'PNG', '.PNG': 'PNG',
             '.bmp': 'BMP', '.gif': 'GIF', '.webp': 'WEBP', '.WebP': 'WEBP'}
  for name in ('a', 'b c'):
    (tmp_path / name).mkdir()
    for i, (ext, fmt) in enumerate(formats.items()):
      Image.new('RGB', (36 + i, 40), (i * 20, 100, 200)).save(tmp_path / name / f'{i}{ext}', fmt)
    (tmp_path / name / 'notes.txt').write_text('not an image')
    Image.new('RGB', (40, 40)).save(tmp_path / name / '.hidden.png')
  (tmp_path / '.ipynb_checkpoints').mkdir()
  config, builder, info = _setup(data_dir=str(tmp_path), validation_split=0.5, batch_size=2)
  assert info.class_names == ('a', 'b c')
  assert info.num_train_examples + info.num_eval_examples == 2 * len(formats)
  rows = sum(b['mask'].sum() for b in ip.eval_batches(config, builder, info))
  assert rows == info.num_eval_examples  # Every one decodes.
  assert len(list(ip.train_batches(config, builder, info, end_step=4))) == 4


def test_constants_come_from_the_training_images_once(folders, monkeypatch):
  config, builder, info = _setup(data_dir=str(folders / 'photos'), validation_split=0.2)
  assert tuple(config.input.mean) == (77.7,)  # The digits' constants: not for RGB.
  pixels = np.stack([np.asarray(Image.open(p)) for _, p in builder.files('train')])
  np.testing.assert_allclose(info.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-3)
  np.testing.assert_allclose(info.std, pixels.std(axis=(0, 1, 2)), atol=1e-3)
  batch = next(ip.train_batches(config, builder, info))
  assert np.all(np.abs(batch['image'].mean(axis=(0, 1, 2))) < 0.5)
  # A later launch reads them from the cache: no image is decoded for them.
  def no_reading(*args, **kwargs):
    raise AssertionError('the images were read again')
  monkeypatch.setattr(image_folders.ImageFiles, '_as_dataset', no_reading)
  assert _setup(data_dir=str(folders / 'photos'), validation_split=0.2)[2] == info
  # Constants with one value per channel are the config's: nothing is measured.
  _, _, imagenet = _setup(data_dir=str(folders / 'photos'), validation_split=0.2,
                          input__mean=config_lib.IMAGENET_MEAN, input__std=config_lib.IMAGENET_STD)
  assert (imagenet.mean, imagenet.std) == (config_lib.IMAGENET_MEAN, config_lib.IMAGENET_STD)


def test_a_changed_training_image_is_measured_again(tmp_path, monkeypatch):
  _write(tmp_path, 3, 5, classes=('a', 'b'))
  _, builder, info = _setup(data_dir=str(tmp_path), validation_split=0.3)
  _, path = builder.files('train')[0]
  Image.new('RGB', (40, 40), (255, 255, 255)).save(path)
  assert _setup(data_dir=str(tmp_path), validation_split=0.3)[2].mean > info.mean


def _folder(tmp_path, *paths):
  """Image files (and folders, ending in '/') under tmp_path."""
  for path in paths:
    full = tmp_path / path
    full.parent.mkdir(parents=True, exist_ok=True)
    if path.endswith('/'):
      full.mkdir(exist_ok=True)
    elif path.endswith('.txt'):
      full.write_text('not an image')
    else:
      Image.new('RGB', (40, 40)).save(full)
  return tmp_path


@pytest.mark.parametrize('paths, overrides, message', [
    (['data/cat/a.png', 'data/dog/a.png', 'data/bird/a.png', 'test/cat/a.png', 'test/dog/a.png',
      'test/fish/a.png'], dict(eval_data_dir='{tmp}/test'),
     'the class folders of {tmp}/data (config.data_dir) and {tmp}/test (config.eval_data_dir) '
     'differ: only in {tmp}/data: bird; only in {tmp}/test: fish.'),
    (['data/cat/a.png', 'data/dog/', 'test/cat/a.png', 'test/dog/a.png'],
     dict(eval_data_dir='{tmp}/test'),
     f'class folder {{tmp}}/data/dog holds no images ({EXTENSIONS}); add images or remove the '
     'folder.'),
    (['data/cat/a.png', 'data/cat/b.png', 'data/dog/notes.txt'], dict(validation_split=0.2),
     f'class folder {{tmp}}/data/dog holds no images ({EXTENSIONS}); add images or remove the '
     'folder.'),
    (['data/'], dict(validation_split=0.2),
     f'image folder {{tmp}}/data (config.data_dir) holds no class folders; expected '
     f'{{tmp}}/data/<class>/<image> ({EXTENSIONS}).'),
    (['data/a.png', 'data/b.png'], dict(validation_split=0.2),
     f'image folder {{tmp}}/data (config.data_dir) holds images but no class folders; expected '
     f'{{tmp}}/data/<class>/<image> ({EXTENSIONS}).'),
    (['data/train/cat/a.png', 'data/test/cat/a.png'], dict(validation_split=0.2),
     'config.validation_split=0.2 splits a folder of class folders, but image folder {tmp}/data '
     '(config.data_dir) holds split folders (test, train); set it to 0 to use them.'),
    (['data/train/cat/a.png', 'data/test/cat/a.png', 'test/cat/a.png'],
     dict(eval_data_dir='{tmp}/test'),
     'image folder {tmp}/data (config.data_dir) holds split folders (test, train); with '
     'config.eval_data_dir it must hold the training class folders.'),
    (['data/cat/a.png', 'data/dog/a.png'], {},
     'image folder {tmp}/data (config.data_dir) holds class folders (cat, dog) but no train/ and '
     'test/ folders: set config.validation_split (e.g. 0.2) or config.eval_data_dir.'),
    (['data/cat/a.png', 'data/cat/b.png', 'data/dog/a.png', 'data/dog/2019/b.png'],
     dict(validation_split=0.2),
     'class folder {tmp}/data/dog holds folders (2019): images must sit directly in their class '
     'folder; move them up or out.'),
    (['data/cat/a.png', 'data/cat/b.png', 'data/dog/a.png'], dict(validation_split=0.2),
     'class folder {tmp}/data/dog has 1 image; config.validation_split=0.2 needs 2 or more in '
     'each class.'),
    (['data/train/cat/a.png', 'data/test/'], {},
     f'split folder {{tmp}}/data/test has no class folders; expected '
     f'{{tmp}}/data/<split>/<class>/<image> ({EXTENSIONS}).'),
    ([], dict(eval_data_dir='{tmp}/nowhere'),
     f'image folder {{tmp}}/nowhere (config.eval_data_dir) does not exist; expected {LAYOUTS}.'),
], ids=['class mismatch', 'empty class in two folders', 'empty class in one folder',
        'no class folders', 'images but no class folders', 'fraction and a train/test root',
        'eval_data_dir and a train/test root', 'class folders and no split',
        'nested folder', 'one image to split', 'split folder without classes',
        'missing eval_data_dir'])
def test_folder_errors_name_the_folder(tmp_path, paths, overrides, message):
  _folder(tmp_path, 'data/', *paths)
  overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v
               for k, v in overrides.items()}
  assert _error(data_dir=str(tmp_path / 'data'), **overrides) == message.format(tmp=tmp_path)


@pytest.mark.parametrize('overrides, message', [
    (dict(validation_split=1.0), 'config.validation_split=1.0 is not allowed: must be in (0, 1): '
     'the fraction of each class held out for evaluation (0 = off).'),
    (dict(validation_split=-0.2), 'config.validation_split=-0.2 is not allowed: must be in (0, 1): '
     'the fraction of each class held out for evaluation (0 = off).'),
    (dict(validation_split=0.2, eval_data_dir='test'), "config.validation_split=0.2 is not "
     "allowed: set it or config.eval_data_dir ('test'), not both."),
    (dict(validation_split=0.2, dataset='digits'), "config.validation_split=0.2 is not allowed: "
     "only with config.dataset='image_folder' (tfds: train_split='train[:80%]', "
     "eval_split='train[80%:]')."),
    (dict(eval_data_dir='test', dataset='cifar10'), "config.eval_data_dir='test' is not "
     "allowed: only with config.dataset='image_folder' (tfds: train_split='train[:80%]', "
     "eval_split='train[80%:]')."),
])
def test_field_errors_come_before_any_folder_is_read(overrides, message):
  with pytest.raises(ValueError) as e:
    config_lib.validate(_config(data_dir='/nowhere', **overrides))
  assert str(e.value) == message


def test_unreadable_files_are_named_or_skipped_without_moving_the_split(folders, tmp_path):
  photos = tmp_path / 'photos'
  shutil.copytree(folders / 'photos', photos)
  _, builder, _ = _setup(data_dir=str(photos), validation_split=0.2)
  held_out = builder.files('validation')
  (photos / 'cat' / '00.png').write_bytes(b'not a png')
  assert _error(data_dir=str(photos), validation_split=0.2) == (
      f'1 of 30 files in image folder {photos} are not readable images: {photos}/cat/00.png. '
      'Remove them, or set config.input.skip_corrupt=True to skip them.')
  _, skipped, _ = _setup(data_dir=str(photos), validation_split=0.2, input__skip_corrupt=True)
  bad = ('cat', str(photos / 'cat' / '00.png'))
  assert set(skipped.files('validation')) == set(held_out) - {bad}
  assert bad not in skipped.files('train')


# The command lines, once per layout.

@pytest.fixture(scope='module')
def runs(folders, tmp_path_factory):
  """Trains each layout with configs/default.py and no normalisation flag; then evaluates
  and predicts the fraction-split run. The whole output of each command is kept."""
  tmp = tmp_path_factory.mktemp('runs')
  photo = str(folders / 'photos' / 'golden retriever' / '00.png')
  commands = [
      ('vgg_flax.train', TINY + [f'--workdir={tmp}/root', f'--config.data_dir={folders}/root'],
       {}),
      ('vgg_flax.train', TINY + [f'--workdir={tmp}/two', f'--config.data_dir={folders}/data',
                                 f'--config.eval_data_dir={folders}/test'], {}),
      ('vgg_flax.train', TINY + [f'--workdir={tmp}/split', f'--config.data_dir={folders}/photos',
                                 '--config.validation_split=0.2'], {}),
      ('vgg_flax.evaluate', [f'--workdir={tmp}/split'], {}),
      ('vgg_flax.predict', [f'--workdir={tmp}/split', '--top_k=3', photo], {}),
      ('vgg_flax.train', TINY + [f'--workdir={tmp}/bad', f'--config.data_dir={folders}/root',
                                 '--config.validation_split=0.2'], {}),
  ]
  codes, texts = run_clis(commands, tmp_path_factory.mktemp('outputs'), timeout=540)
  return tmp, photo, codes, texts


def _assert_clean(text):
  """No library warning, and no rate or ETA of a step that was not timed."""
  for line in text.splitlines():
    assert not re.match(r'W\d{4} |WARNING', line), text
    assert ' 0.0 img/s' not in line and not re.search(r'ETA \d{3,}h', line), text


def test_each_layout_trains_with_the_default_config(runs, folders):
  tmp, _, codes, texts = runs
  for i, name in enumerate(('root', 'two', 'split')):
    assert codes[i] == 0, texts[i][-3000:]
    _assert_clean(texts[i])
    dataset = json.loads((tmp / name / 'dataset.json').read_text())
    assert len(dataset['mean']) == len(dataset['std']) == 3  # Measured: RGB.
    # The first report, right after the compiling step: no rate, no ETA.
    first = next(l for l in texts[i].splitlines() if '] step 1/3 ' in l)
    assert re.search(r'train_loss=\S+ .*learning_rate=\S+$', first), first  # No mfu=0.0%.
    assert '|' not in first, first
  # The trainer (another process) held out the files this process holds out.
  _, builder, _ = _setup(data_dir=str(folders / 'photos'), validation_split=0.2)
  dataset = json.loads((tmp / 'split' / 'dataset.json').read_text())
  assert dataset['eval_files_sha256'] == builder.names_sha256('validation')
  assert (dataset['num_train_examples'], dataset['num_eval_examples']) == (24, 6)


def test_evaluate_and_predict_normalise_as_the_run_did(runs, folders):
  tmp, photo, codes, texts = runs
  assert codes[3] == 0 and codes[4] == 0, texts[3] + texts[4]
  _assert_clean(texts[3] + texts[4])
  last = [json.loads(l) for l in (tmp / 'split' / 'metrics.jsonl').read_text().splitlines()][-1]
  assert texts[3].strip() == (
      f'{tmp}/split step 3, 6 examples, center, Q=32: loss {last["eval_loss"]:.4f}  top-1 '
      f'{last["eval_accuracy"]:.4f}  top-5 {last["eval_top5_accuracy"]:.4f}')
  lines = texts[4].strip().splitlines()
  assert lines[0] == photo and len(lines) == 4
  assert sorted(l.split('%  ')[1] for l in lines[1:]) == list(CLASSES)
  # predict's probabilities give the trainer's evaluation loss on the held-out files.
  from vgg_flax import predict  # pylint: disable=g-import-not-at-top
  _, builder, _ = _setup(data_dir=str(folders / 'photos'), validation_split=0.2)
  files = builder.files('validation')
  top = predict.predict(str(tmp / 'split'), [p for _, p in files], top_k=3)
  loss = np.mean([-np.log(dict(t)[name]) for (name, _), t in zip(files, top)])
  assert loss == pytest.approx(last['eval_loss'], abs=2e-4)


def test_a_layout_error_is_one_line_from_the_command_line(runs, folders):
  _, _, codes, texts = runs
  assert codes[5] == 1
  assert texts[5].strip() == (
      f'error: config.validation_split=0.2 splits a folder of class folders, but image folder '
      f'{folders}/root (config.data_dir) holds split folders (test, train); set it to 0 to use '
      'them.')


def test_evaluate_refuses_a_folder_whose_held_out_files_changed(runs, folders, tmp_path):
  from vgg_flax import evaluate  # pylint: disable=g-import-not-at-top
  tmp, _, codes, texts = runs
  assert codes[2] == 0, texts[2][-3000:]
  moved = tmp_path / 'moved'  # The same files elsewhere: the same split, the same evaluation.
  shutil.copytree(folders / 'photos', moved)
  result = evaluate.evaluate_workdir(str(tmp / 'split'), {'data_dir': str(moved)})
  assert f'loss {result["eval_loss"]:.4f}' in texts[3]
  for i in range(3):  # 3 more cats: 13 hold out 3, which may be one that was trained on.
    Image.new('RGB', (40, 40), (i, 0, 0)).save(moved / 'cat' / f'new{i}.png')
  with pytest.raises(DataError) as e:
    evaluate.evaluate_workdir(str(tmp / 'split'), {'data_dir': str(moved)})
  assert str(e.value) == (
      f'the files that config.validation_split=0.2 holds out of {moved} are not the ones the run '
      'held out (dataset.json): the folder changed since training, and some may have been '
      'trained on. Evaluate it as it was.')
