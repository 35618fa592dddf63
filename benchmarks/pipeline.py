"""Host input throughput on photo-sized JPEGs, per host core.

  python -m vgg_flax.benchmark --pipeline [--json=benchmarks/pipeline.json]
  python benchmarks/pipeline.py --cores=1,2 --images=384        # the same, directly

Writes `--images` JPEGs the size of an average ImageNet photo (500x375,
quality 90, 1/f noise with correlated colours: ~100 KB each, close to
ImageNet's average file) into a tfds ImageFolder layout, then times the
product's own `input_pipeline.train_batches` with configs/vgg16.py's input
settings (the paper's augmentation: isotropic rescale to S ~ U[256, 512], 224
crop, flip, mean subtraction) in a child process pinned to 1, 2, ... cores
(`sched_setaffinity` before TensorFlow starts, so tf.data sizes its thread
pool to the cores it has). The files are read from the page cache: this is the
CPU cost of decoding and augmenting, not of storage.

Each child times float32 batches (normalised on the host, as the trainer
receives them today) and uint8 ones (`normalized=False`: a quarter of the
bytes, normalised on the device), and the epoch boundary: with a consumer
slower than the pipeline (a simulated accelerator step of 1.5x the batch
time), the wait for the first batch of the second epoch against the median.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> np.ndarray:
  """A uint8 HxWx3 image with a natural image's 1/f amplitude spectrum."""
  fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
  freq = np.hypot(fx, fy)
  freq[0, 0] = 1.0
  amplitude = freq ** -1.15  # A slightly steeper fall than 1/f: ~100 KB at quality 90.
  amplitude[0, 0] = 0.0
  channels = [np.fft.irfft2(amplitude * np.exp(2j * np.pi * rng.random(amplitude.shape)),
                            s=(height, width)) for _ in range(3)]
  x = np.stack(channels, -1) @ (np.eye(3) + rng.normal(0, 0.4, (3, 3)))  # Correlated colours.
  x = (x - x.mean()) / x.std()
  return np.clip(128 + 50 * x, 0, 255).astype(np.uint8)


def write_photos(root: str, num_images: int, *, num_classes: int = 10, quality: int = 90,
                 seed: int = 0) -> float:
  """Writes root/{train,test}/<class>/*.jpg (test: one per class); returns mean KB."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  sizes = []
  for split, count in (('train', num_images), ('test', num_classes)):
    for i in range(count):
      path = os.path.join(root, split, f'class{i % num_classes:02d}', f'{i:05d}.jpg')
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(photo(rng)).save(path, 'JPEG', quality=quality)
      sizes.append(os.path.getsize(path))
  return float(np.mean(sizes)) / 1e3


def measure(root: str, *, batch_size: int, batches: int, warmup: int) -> dict:
  """Times train_batches on this process's cores (call after setting the affinity)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from vgg_flax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('vgg16', os.path.join(_ROOT, 'configs',
                                                                      'vgg16.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.dataset, config.data_dir, config.batch_size = 'image_folder', root, batch_size
  builder = input_pipeline.get_builder(config)
  info = input_pipeline.dataset_info(config, builder)
  steps = input_pipeline.steps_per_epoch(config, info)

  def images_per_sec(normalized: bool) -> tuple[float, float, int]:
    it = input_pipeline.train_batches(config, builder, info, normalized=normalized)
    start = time.perf_counter()
    for _ in range(warmup):  # Build the pipeline, fill the shuffle and prefetch buffers.
      batch = next(it)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
    rate = batches * batch_size / (time.perf_counter() - start)
    assert batch['image'].shape == (batch_size, 224, 224, 3), batch['image'].shape
    return rate, first_s, batch['image'].nbytes // batch_size

  rate, first_s, image_bytes = images_per_sec(normalized=True)
  uint8_rate, _, uint8_bytes = images_per_sec(normalized=False)

  # The epoch boundary, with a consumer slower than the pipeline.
  step_s = 1.5 * batch_size / rate
  it = input_pipeline.train_batches(config, builder, info)
  waits = []
  for _ in range(steps + 3):
    start = time.perf_counter()
    next(it)
    waits.append(time.perf_counter() - start)
    time.sleep(step_s)
  return {'cores': len(os.sched_getaffinity(0)), 'images_per_sec': rate,
          'images_per_sec_per_core': rate / len(os.sched_getaffinity(0)),
          'batch_size': batch_size, 'batches': batches, 'first_batches_s': first_s,
          'image_bytes': image_bytes, 'uint8_images_per_sec': uint8_rate,
          'uint8_image_bytes': uint8_bytes,
          'steps_per_epoch': steps, 'simulated_step_s': step_s,
          'median_wait_s': float(np.median(waits[1:steps])),
          'epoch2_first_wait_s': waits[steps]}


def run(cores: list[int], *, num_images: int = 384, batch_size: int = 32, batches: int = 24,
        warmup: int = 2, root: str | None = None) -> dict:
  """Writes the photos (once per root) and measures each core count in a child process."""
  root = root or os.path.join(tempfile.gettempdir(), f'vgg_flax_photos_{num_images}')
  marker = os.path.join(root, 'train', 'DONE.json')
  if not os.path.exists(marker):
    kb = write_photos(root, num_images)
    with open(marker, 'w') as f:
      json.dump({'mean_kb': kb}, f)
  with open(marker) as f:
    out = {'root': root, 'images': num_images, 'mean_jpeg_kb': json.load(f)['mean_kb'],
           'runs': []}
  for n in cores:
    cmd = [sys.executable, os.path.abspath(__file__), '--child', f'--cores={n}', f'--root={root}',
           f'--batch_size={batch_size}', f'--batches={batches}', f'--warmup={warmup}']
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode:
      raise RuntimeError(f'pipeline benchmark on {n} core(s) failed:\n{result.stderr[-3000:]}')
    out['runs'].append(json.loads(result.stdout.strip().splitlines()[-1]))
  return out


def format_report(out: dict) -> str:
  lines = [f"input pipeline: {out['images']} JPEGs 500x375 (mean {out['mean_jpeg_kb']:.0f} KB), "
           'configs/vgg16.py augmentation (S in [256, 512], 224 crop, flip)']
  for r in out['runs']:
    lines.append(
        f"  {r['cores']} core(s): {r['images_per_sec']:.0f} img/s "
        f"({r['images_per_sec_per_core']:.0f} per core) float32; "
        f"{r['uint8_images_per_sec']:.0f} img/s uint8; epoch boundary wait "
        f"{r['epoch2_first_wait_s'] * 1e3:.0f} ms vs median {r['median_wait_s'] * 1e3:.0f} ms "
        f"(simulated step {r['simulated_step_s'] * 1e3:.0f} ms)")
  return '\n'.join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--cores', default='1,2', help='Comma-separated core counts to pin to.')
  p.add_argument('--images', type=int, default=384)
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--batches', type=int, default=24, help='Timed batches.')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--root', default=None, help='Where the JPEGs go (default: a temp folder).')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:  # Pin first: TensorFlow sizes its thread pools when it starts.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:int(args.cores)])
    sys.path.insert(0, _ROOT)
    print(json.dumps(measure(args.root, batch_size=args.batch_size, batches=args.batches,
                             warmup=args.warmup)))
    return
  out = run([int(c) for c in args.cores.split(',')], num_images=args.images,
            batch_size=args.batch_size, batches=args.batches, warmup=args.warmup,
            root=args.root)
  print(format_report(out))


if __name__ == '__main__':
  main()
