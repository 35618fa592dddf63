"""The paper's test protocol (section 3.2): dense, multi-crop, multi-scale evaluation."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from evaluate_test import tiny_digits_config
from vgg_flax import config as config_lib
from vgg_flax.data import input_pipeline as ip
from vgg_flax.data import preprocessing
from vgg_flax import evaluate
from vgg_flax.interop import transfer
from vgg_flax.io import run_config
from vgg_flax.io import workdirs
from vgg_flax import models
from vgg_flax import train
from vgg_flax.training import reporting

# Test images (H, W) of several aspect ratios. Their dense views at Q = 64 are
# 64x64 (four), 64x96 (two) and 96x64; at Q <= 36 all are 32x32 (one compile).
TEST_SHAPES = {'cat/a.png': (40, 48), 'cat/b.png': (48, 40), 'cat/c.png': (32, 52),
               'dog/a.png': (36, 36), 'dog/b.png': (64, 64), 'dog/c.png': (40, 68),
               'dog/d.png': (66, 40)}
DENSE_SHAPES_AT_64 = {(40, 48): (64, 64), (48, 40): (64, 64), (32, 52): (64, 96),
                      (36, 36): (64, 64), (64, 64): (64, 64), (40, 68): (64, 96),
                      (66, 40): (96, 64)}


@functools.cache
def _tiny_vgg(head='fc', image_size=32, num_classes=2, **kwargs):
  """A tiny VGG with BatchNorm and random variables (numpy: no init to compile)."""
  # XLA's convolution compiles several times faster than the CPU default 'patches'.
  model = models.VGG(depth=11, width=4, fc_dim=16, num_classes=num_classes, head=head,
                     batch_norm=True, conv_impl='xla', **kwargs)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, image_size, image_size, 3)))
  rng = np.random.default_rng(0)

  def random(path, s):
    if path[-1].key in ('var', 'scale'):  # BatchNorm: positive, about 1, keeps the signal.
      return (0.5 + rng.random(s.shape)).astype(np.float32)
    scale = 0.1 if len(s.shape) == 1 else np.prod(s.shape[:-1]) ** -0.5  # Biases: small.
    return (rng.standard_normal(s.shape) * scale).astype(np.float32)

  return model, jax.tree_util.tree_map_with_path(random, shapes)


def _probs(model, variables, images, *, dense_fc, flip=False, train_size=32):
  return np.asarray(evaluate.probabilities(variables, jnp.asarray(images), model=model,
                                           dense_fc=dense_fc, flip=flip, train_size=train_size))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """An image folder (2 classes) with test images of several shapes; config, builder, info."""
  root = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  files = {f'test/{name}': shape for name, shape in TEST_SHAPES.items()}
  files.update({'train/cat/a.png': (32, 32), 'train/dog/a.png': (32, 32)})
  for name, shape in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8)).save(root / name)
  config = config_lib.get_base_config()
  config.dataset, config.data_dir, config.image_size = 'image_folder', str(root), 32
  config.eval_split, config.eval_batch_size = 'test', 4
  config.input.update(dict(eval_resize=32, normalization='mean_std', mean=(127.5,) * 3,
                           std=(64.0,) * 3))
  builder = ip.get_builder(config)
  return config, builder, ip.dataset_info(config, builder)


@pytest.mark.parametrize('length, size, grid, expected', [
    (40, 32, 5, [0, 2, 4, 6, 8]),  # np.linspace(0, 8, 5).
    (100, 32, 3, [0, 34, 68]),
    (32, 32, 5, [0, 0, 0, 0, 0]),
    (41, 32, 1, [4]),  # One crop is the centre crop (floor, like preprocess_for_eval).
])
def test_crop_offsets(length, size, grid, expected):
  assert ip.crop_offsets(length, size, grid).numpy().tolist() == expected


def test_multicrop_grid_and_dense_shape_of_one_image():
  config = config_lib.get_base_config()
  config.image_size, config.input.normalization = 32, 'none'
  image = tf.constant(np.random.default_rng(1).integers(0, 256, (50, 80, 3), dtype=np.uint8))
  crops = ip.multicrop_images(image, config, 40).numpy()
  assert crops.shape == (25, 32, 32, 3)
  resized = preprocessing.resize_smaller_side(image, 40).numpy()  # 40x64: offsets 0..8 and 0..32.
  for k, (r, c) in enumerate((r, c) for r in (0, 2, 4, 6, 8) for c in (0, 8, 16, 24, 32)):
    np.testing.assert_array_equal(crops[k], resized[r:r + 32, c:c + 32])
  # Dense: smaller side Q, both sides cut down to multiples of 32 (70x112 -> 64x96).
  assert ip.dense_image(image, config, 70).shape == (64, 96, 3)
  assert ip.dense_image(image, config, 40).shape == (32, 64, 3)


def test_dense_fc_head_is_the_model_at_the_training_size_and_slides_beyond():
  model, variables = _tiny_vgg(image_size=64, num_classes=10)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  expected = jax.nn.softmax(model.apply(variables, x))
  np.testing.assert_allclose(_probs(model, variables, x, dense_fc=True, train_size=64),
                             expected, rtol=1e-5, atol=1e-7)
  # A 160x96 image: a 5x3 feature map, fc1 a 2x2 window on it -> a 4x2 score map.
  big = jax.random.normal(jax.random.PRNGKey(2), (2, 160, 96, 3))
  features = model.clone(head='none', pooling='').apply(variables, big)
  scores = evaluate.fc_as_conv(variables['params'], features, 64)
  assert features.shape[1:3] == (5, 3) and scores.shape == (2, 4, 2, 10)
  # With flip: the average of the score maps' posteriors, the image's and its mirror's.
  mirrored = evaluate.fc_as_conv(variables['params'], model.clone(head='none').apply(
      variables, big[:, :, ::-1]), 64)
  expected = (jax.nn.softmax(scores.mean(axis=(1, 2))) +
              jax.nn.softmax(mirrored.mean(axis=(1, 2)))) / 2
  np.testing.assert_allclose(_probs(model, variables, big, dense_fc=True, flip=True,
                                    train_size=64), expected, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match=r'fc1 has 128 inputs, not the 1x1x32 map of a 32 px '
                                       r'crop: is config.image_size'):
    evaluate.fc_as_conv(variables['params'], features, 32)


@pytest.mark.parametrize('hidden_dims', [(), (12,), (12, 8, 6)])
def test_dense_fc_head_with_any_hidden_layers_is_the_model_at_the_training_size(hidden_dims):
  model, variables = _tiny_vgg(image_size=64, num_classes=5, hidden_dims=hidden_dims)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  np.testing.assert_allclose(_probs(model, variables, x, dense_fc=True, train_size=64),
                             jax.nn.softmax(model.apply(variables, x)), rtol=1e-5, atol=1e-7)


def test_gap_head_on_the_whole_image_averages_the_linear_score_map():
  model, variables = _tiny_vgg(head='gap', num_classes=10)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 96, 64, 3))
  features = model.clone(head='none').apply(variables, x)  # (2, 3, 2, 32)
  head = variables['params']['predictions']
  score_map = features @ head['kernel'] + head['bias']
  np.testing.assert_allclose(_probs(model, variables, x, dense_fc=False),
                             jax.nn.softmax(score_map.mean(axis=(1, 2))), rtol=1e-5, atol=1e-7)


def test_dense_batches_group_images_by_shape(folder):
  config, builder, _ = folder
  # The split's own order: the index each example must carry through the groups.
  read = ip._read(builder, 'test', 0, 1, drop_remainder=False)
  originals = [(tuple(tf.io.decode_image(image).shape[:2]), label)
               for image, label in read.as_numpy_iterator()]
  batches = list(ip.protocol_batches(config, builder, 'test', 'dense', 64))
  seen = []
  for batch in batches:
    assert batch['image'].shape[0] == 4  # eval_batch_size, zero-padded with mask 0.
    real = batch['mask'] > 0
    assert real[:real.sum()].all()
    for i, label in zip(batch['index'][real], batch['label'][real]):
      shape, original_label = originals[i]
      assert batch['image'].shape[1:3] == DENSE_SHAPES_AT_64[shape] and label == original_label
      seen.append(i)
  assert sorted(seen) == list(range(7))  # Every example exactly once.
  assert len(batches) == 3  # The four 64x64 images, the two 64x96, the 96x64.


def test_multicrop_with_flips_averages_50_views(folder):
  config, builder, info = folder
  model, variables = _tiny_vgg()
  config = config.copy_and_resolve_references()
  config.eval.flip = True
  batches = list(ip.protocol_batches(config, builder, 'test', 'multicrop', 40))
  index = np.concatenate([b['index'][b['mask'] > 0] for b in batches])
  assert np.bincount(index).tolist() == [25] * 7  # 5x5 crops; mirrored on the device.
  probs, labels = evaluate.posteriors(model, variables, config, builder, info, 'test',
                                      'multicrop', 40)
  crops = np.concatenate([b['image'][b['mask'] > 0] for b in batches])
  views = np.concatenate([crops, crops[:, :, ::-1]])  # 50 views of each image.
  view_probs = jax.nn.softmax(jax.jit(model.apply)(variables, views))
  expected = np.stack([view_probs[np.concatenate([index, index]) == i].mean(axis=0)
                       for i in range(7)])
  np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
  assert np.ptp(probs[:, 0]) > 1e-3  # The random network does tell the images apart.
  assert sorted(labels) == [0, 0, 0, 1, 1, 1, 1]


def test_one_crop_at_the_training_size_is_the_centre_crop(folder):
  config, builder, info = folder
  model, variables = _tiny_vgg()
  config = config.copy_and_resolve_references()
  config.eval.update(dict(grid=1, flip=False))
  center = evaluate.posteriors(model, variables, config, builder, info, 'test', 'center', 32)
  one_crop = evaluate.posteriors(model, variables, config, builder, info, 'test', 'multicrop', 32)
  np.testing.assert_allclose(one_crop[0], center[0], rtol=1e-6)
  np.testing.assert_array_equal(one_crop[1], center[1])


def test_scales_and_views_average_their_posteriors(folder):
  config, builder, info = folder
  model, variables = _tiny_vgg()
  config = config.copy_and_resolve_references()
  # Q = 36 gives the dense shape of Q = 32 (32x32): no new compile.
  config.eval.update(dict(grid=2, flip=False, scales=(32, 36)))
  single = {(view, q): evaluate.posteriors(model, variables, config, builder, info, 'test',
                                           view, q)[0]
            for view in ('dense', 'multicrop') for q in (32, 36)}
  assert not np.allclose(single['dense', 32], single['dense', 36])
  config.eval.mode = 'dense'
  dense, _ = evaluate.protocol_posteriors(model, variables, config, builder, info, 'test')
  np.testing.assert_allclose(dense, (single['dense', 32] + single['dense', 36]) / 2, rtol=1e-6)
  config.eval.mode = 'multicrop'
  multicrop, _ = evaluate.protocol_posteriors(model, variables, config, builder, info, 'test')
  config.eval.mode = 'dense+multicrop'
  lines = []
  both, labels = evaluate.protocol_posteriors(model, variables, config, builder, info, 'test',
                                              progress=lines.append, every_s=1e9)
  np.testing.assert_allclose(both, (dense + multicrop) / 2, rtol=1e-6)
  # Progress: one line per pass (2 views x 2 scales) when no time limit is reached.
  n = len(labels)
  assert [l.split(', ETA')[0] for l in lines] == [
      f'evaluating: {k * n}/{4 * n} examples ({k / 4:.0%})' for k in (1, 2, 3, 4)]
  assert lines[-1].endswith('ETA 0m00s')
  np.testing.assert_allclose(both.sum(axis=1), 1.0, rtol=1e-6)
  assert sorted(labels) == [0, 0, 0, 1, 1, 1, 1]


def test_protocol_metrics():
  probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.0, 0.1, 0.9]])
  metrics = evaluate.protocol_metrics(probs, np.array([0, 1, 0]))
  assert metrics['eval_accuracy'] == pytest.approx(1 / 3)
  assert metrics['eval_top5_accuracy'] == 1.0
  assert metrics['eval_loss'] == pytest.approx(-(np.log(0.7) + np.log(0.3) + np.log(1e-12)) / 3)


@pytest.mark.parametrize('field, value, message', [
    ('eval.mode', 'ten_crop', r"config.eval.mode='ten_crop' is not allowed: expected one of "
                              r"'center', 'dense', 'multicrop', 'dense\+multicrop'."),
    ('eval.scales', (256, 200), r"config.eval.scales=\(256, 200\) is not allowed: every scale Q "
                                r"must be an integer >= image_size \(224\); \(\) = from the "
                                r"training scale; \('paper',\) = the paper's three."),
    ('eval.grid', 0, r"config.eval.grid=0 is not allowed: must be >= 1 \(5 = the paper's 5x5 "
                     r"crops\)."),
])
def test_bad_protocol_values_are_named(field, value, message):
  config = config_lib.get_base_config()
  config.eval[field.split('.')[1]] = value
  with pytest.raises(ValueError, match=f'^{message}$'):
    config_lib.validate(config)


@pytest.mark.parametrize('scale_min, scale_max, eval_resize, scales, expected', [
    # Single scale (section 4.1): Q = S for fixed S, the middle for jittered S.
    (256, 256, 0, (), (256,)),
    (384, 384, 0, (), (384,)),
    (256, 512, 0, (), (384,)),
    (256, 511, 0, (), (383,)),  # Rounded down.
    (256, 512, 256, (), (256,)),  # An explicit input.eval_resize wins.
    # Multi-scale (section 4.2): {S - 32, S, S + 32} for fixed S, {S_min, middle, S_max}.
    (256, 256, 0, ('paper',), (224, 256, 288)),
    (384, 384, 0, ('paper',), (352, 384, 416)),
    (256, 512, 0, ('paper',), (256, 384, 512)),
    (256, 512, 0, (300, 400), (300, 400)),  # Listed scales are taken as given.
])
def test_test_scales_follow_the_training_scale(scale_min, scale_max, eval_resize, scales,
                                               expected):
  config = config_lib.get_base_config()
  config.input.update(dict(scale_min=scale_min, scale_max=scale_max, eval_resize=eval_resize))
  config.eval.scales = scales
  config_lib.validate(config)
  assert config_lib.eval_scales(config) == expected
  if not scales:
    assert config_lib.eval_scale(config) == expected[0]
  assert evaluate.describe('dense', expected, 5, True).endswith(
      'Q=' + ','.join(map(str, expected)))


@pytest.mark.parametrize('image_size, expected', [(224, 256), (32, 36), (64, 73)])
def test_random_resized_crops_are_evaluated_at_a_crop_of_0875(image_size, expected):
  # Regression: Q came from the unused scale range, (256 + 512) // 2 = 384,
  # a centre crop of 0.58 of the side for the evaluations the schedule watches.
  config = config_lib.get_base_config()
  config.image_size = image_size
  config.input.train_crop = 'random_resized'
  assert config_lib.eval_scale(config) == config_lib.eval_scales(config)[0] == expected


def test_paper_scales_below_the_crop_are_refused():
  config = config_lib.get_base_config()
  config.input.update(dict(scale_min=224, scale_max=224))
  config.eval.scales = ('paper',)
  with pytest.raises(ValueError, match=r"^config.eval.scales=\('paper',\) is not allowed: gives "
                     r"Q=192 for fixed S=224, below image_size \(224\); list the scales "
                     r"instead.$"):
    config_lib.validate(config)


@pytest.mark.parametrize('scale_min, scale_max, q', [(40, 40, 40), (32, 48, 40)])
def test_training_evaluation_crops_at_the_derived_scale(scale_min, scale_max, q):
  config = config_lib.get_base_config()
  config.image_size = 32
  config.input.update(dict(scale_min=scale_min, scale_max=scale_max, eval_resize=0))
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
  derived = ip.preprocess_for_eval(image, config)
  np.testing.assert_array_equal(derived, ip.preprocess_for_eval(image, config, q))
  assert not np.array_equal(derived, ip.preprocess_for_eval(image, config, q + 8))


def test_overrides_parse_scales_as_tuples():
  config = config_lib.get_base_config()
  run_config.apply_overrides(config, {'eval.scales': '(256,384,512)', 'eval.mode': 'dense'})
  assert config.eval.scales == (256, 384, 512) and config.eval.mode == 'dense'
  run_config.apply_overrides(config, {'eval.scales': '384'})
  assert config.eval.scales == (384,)
  run_config.apply_overrides(config, {'eval.scales': 'paper'})
  assert config.eval.scales == ('paper',) and config_lib.eval_scales(config) == (256, 384, 512)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A tiny digits run of 2 steps, evaluated on 64 test images."""
  root = tmp_path_factory.mktemp('run')
  # evaluate_test's model and optimiser: the compilation cache serves both.
  config = tiny_digits_config(root / 'data')
  config.train_split, config.eval_split = 'train[:64]', 'test[:64]'
  config.eval.update(dict(mode='dense', at_end=True))  # The ImageNet configs' final evaluation.
  path = str(root / 'run')
  return path, train.train_and_evaluate(config, path)


def test_the_final_state_is_evaluated_with_the_protocol_at_the_end(workdir):
  path, trained = workdir
  rows = [r for r in reporting.read_metrics(os.path.join(path, 'metrics.jsonl'))
          if 'final_eval_accuracy' in r]
  with open(os.path.join(path, 'result.json')) as f:
    final = json.load(f)['final_eval']
  assert [r['step'] for r in rows] == [2] and final['protocol'] == 'dense +flip, Q=32'
  # The same numbers as the evaluate CLI's protocol on the last checkpoint (the final state);
  # the training-time eval_* numbers are the centre crop's.
  again = evaluate.evaluate_workdir(path, checkpoint='latest')
  assert again['protocol'] == final['protocol']
  for key in ('eval_loss', 'eval_accuracy', 'eval_top5_accuracy'):
    assert rows[0][f'final_{key}'] == pytest.approx(final[key], abs=1e-6), key
    assert again[key] == pytest.approx(final[key], abs=1e-6), key
  assert trained['eval_loss'] != final['eval_loss']


def test_dense_multicrop_multiscale_on_a_trained_run(workdir):
  path, _ = workdir
  # conv_impl is a lowering, not parameters: 'xla' compiles faster.
  r = evaluate.evaluate_workdir(path, {'eval.mode': 'dense+multicrop', 'eval.scales': '(32,40)',
                                       'eval.grid': '2', 'eval.flip': 'False',
                                       'model.conv_impl': 'xla'})
  assert (r['step'], r['num_examples']) == (2, 64)
  assert r['protocol'] == 'dense+multicrop 2x2, Q=32,40'
  # The metrics of the mean of the four single passes' posteriors (2 views x 2 scales).
  config = run_config.apply_overrides(run_config.load_config(path), {
      'eval.grid': '2', 'eval.flip': 'False', 'model.conv_impl': 'xla'})
  model, variables, _ = transfer.restore_model(path, config)
  builder = ip.get_builder(config)
  info = ip.dataset_info(config, builder)
  passes = {(view, q): evaluate.posteriors(model, variables, config, builder, info,
                                           info.eval_split, view, q)
            for view in ('dense', 'multicrop') for q in (32, 40)}
  labels = passes['dense', 32][1]
  expected = evaluate.protocol_metrics(np.mean([p for p, _ in passes.values()], axis=0), labels)
  for key in ('eval_loss', 'eval_accuracy', 'eval_top5_accuracy'):
    assert r[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
  # Averaging matters: each single pass alone gives another loss.
  assert all(evaluate.protocol_metrics(*p)['eval_loss'] != pytest.approx(r['eval_loss'], rel=1e-6)
             for p in passes.values())


def test_old_runs_and_centre_posteriors_reproduce_the_training_evaluation(workdir, tmp_path):
  path, trained = workdir
  # A run saved before the `eval` group existed: its config takes the defaults.
  with open(os.path.join(path, workdirs.CONFIG_FILE)) as f:
    saved = json.load(f)
  del saved['eval']
  old = tmp_path / 'old_run'
  old.mkdir()
  os.symlink(os.path.join(path, 'checkpoints'), old / 'checkpoints')
  (old / workdirs.CONFIG_FILE).write_text(json.dumps(saved))
  (old / workdirs.DATASET_FILE).write_text(open(os.path.join(path, workdirs.DATASET_FILE)).read())
  config = run_config.load_config(str(old))
  assert config.eval.to_dict() == config_lib.get_base_config().eval.to_dict()
  results = evaluate.evaluate_workdir(str(old))  # 'center' at one scale: the trainer's path.
  assert results['protocol'] == 'center, Q=32'
  # The protocol's per-example posteriors give the same numbers.
  model, variables, _ = transfer.restore_model(path, config)
  builder = ip.get_builder(config)
  info = ip.dataset_info(config, builder)
  metrics = evaluate.protocol_metrics(*evaluate.posteriors(
      model, variables, config, builder, info, info.eval_split, 'center', 32))
  for key in ('eval_loss', 'eval_accuracy', 'eval_top5_accuracy'):
    assert results[key] == pytest.approx(trained[key], abs=1e-5), key
    assert metrics[key] == pytest.approx(trained[key], abs=1e-5), key
