"""vgg_flax.load on a training run and a converted folder; a run exported to a
torchvision-layout VGG-16-BN gives its logits; predict --weights names ImageNet classes."""

import subprocess

import jax
import numpy as np
import pytest
from PIL import Image

import helpers
from vgg_flax import convert
from vgg_flax.interop import hub
from vgg_flax.interop import transfer
from vgg_flax import predict
from vgg_flax import train
import vgg_flax
from weights_export_test import rel_error, torch, torch_out, torchvision_vgg


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A `make train` run (VGG-16-BN, 1-channel digits at 32 px), tiny and short."""
  root = tmp_path_factory.mktemp('run')
  config = helpers.tiny_config(root / 'data', **{
      'model.depth': 16, 'model.batch_norm': True, 'train_split': 'train[:64]',
      'eval_split': 'test[:32]', 'num_epochs': 1, 'model.conv_impl': 'xla'})
  train.train_and_evaluate(config, str(root / 'workdir'))
  return str(root / 'workdir'), config


def test_load_a_run_and_export_it_to_torchvision(run, tmp_path):
  workdir, config = run
  model, variables = vgg_flax.load(workdir)
  reference_model, reference, _ = transfer.restore_model(workdir, config)
  assert hub.model_fields(model) == hub.model_fields(reference_model)
  jax.tree.map(np.testing.assert_array_equal, variables,
               {k: v for k, v in reference.items() if v})
  images = np.random.RandomState(0).randn(3, 32, 32, 1).astype(np.float32)
  with jax.default_matmul_precision('highest'):
    logits = np.asarray(jax.jit(model.apply)(variables, images))

  convert.export('torchvision', workdir, str(tmp_path / 'run.pth'))
  state = torch.load(tmp_path / 'run.pth', weights_only=True)
  vgg16_bn = torchvision_vgg('D', batch_norm=True, width=8, in_channels=1, fc_dim=32,
                             num_classes=10)
  vgg16_bn.load_state_dict(state, strict=True)
  assert int(state['features.1.num_batches_tracked']) == 0
  error = rel_error(torch_out(vgg16_bn, images.transpose(0, 3, 1, 2)), logits)
  print(f'run exported to torchvision: relative error {error:.1e}')
  assert error < 1e-5

  with pytest.raises(hub.LoadError, match=r"fc_dim=64\) expects \['params'\]\['fc1'\]\['bias'\] "
                                          r'of shape \(64,\), the source has \(32,\)'):
    vgg_flax.load(workdir, fc_dim=64)
  with pytest.raises(hub.LoadError, match="no model field 'dept'"):
    vgg_flax.load(workdir, dept=11)


def test_converted_folder_and_predict_with_imagenet_names(tmp_path):
  # A torchvision-layout VGG-11 with 1000 classes (tiny widths): converted to a folder,
  # loaded back, and classifying a photo through the CLI with ImageNet class names.
  reference = torchvision_vgg('A', width=8, fc_dim=32, num_classes=1000, seed=5)
  torch.save(reference.state_dict(), tmp_path / 'vgg11.pth')
  meta = convert.convert('torchvision', str(tmp_path / 'vgg11.pth'), str(tmp_path / 'folder'))
  assert meta['model']['depth'] == 11 and meta['preset'] == 'torchvision'
  model, variables = vgg_flax.load(tmp_path / 'folder')
  from_file, file_variables = vgg_flax.load(tmp_path / 'vgg11.pth')
  assert hub.model_fields(model) == hub.model_fields(from_file)
  jax.tree.map(np.testing.assert_array_equal, variables, file_variables)

  # 256x256: resizing the smaller side to 256 keeps it; the centre 224 crop is [16:240].
  pixels = np.random.RandomState(1).randint(0, 256, (256, 256, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / 'photo.png')
  crop = pixels[16:240, 16:240].astype(np.float32) / 255
  crop = (crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  expected = torch.softmax(torch.from_numpy(torch_out(reference, crop.transpose(
      2, 0, 1)[None].astype(np.float32))), -1).numpy()[0]
  names = predict.imagenet_classes()
  assert len(names) == 1000 and names[:2] == ['tench', 'goldfish']
  top = predict.predict_weights(str(tmp_path / 'folder'), [str(tmp_path / 'photo.png')], 3)[0]
  order = np.argsort(-expected)[:3]
  assert [n for n, _ in top] == [names[i] for i in order]
  np.testing.assert_allclose([p for _, p in top], expected[order], rtol=1e-4)
  out = subprocess.run([helpers.python(), '-m', 'vgg_flax.predict', f'--weights={tmp_path}/folder',
                        '--top_k=2', str(tmp_path / 'photo.png')], capture_output=True,
                       text=True, cwd=helpers.ROOT, check=True)
  lines = out.stdout.strip().splitlines()
  assert lines[1].split('%')[1].strip() == names[order[0]] and len(lines) == 3
