"""The PyTorch peer of the benchmark: torchvision's VGG layout in plain torch.nn.

torchvision is not installable offline here, so this rebuilds its `vgg*()`:
`features` (Conv2d 3x3 pad 1, [BatchNorm2d], ReLU(inplace), MaxPool2d(2)),
then `classifier` (Linear 4096, ReLU, Dropout, Linear 4096, ReLU, Dropout,
Linear classes), NCHW, with torchvision's initialisation. One difference, so
that both sides do the same FLOPs at any size: the classifier reads the
flattened feature map of whatever size it is (512 * 7 * 7 at 224 px, as in
torchvision; 512 at 32 px, where torchvision's AdaptiveAvgPool2d(7) would
copy the 1x1 map 49 times into a 25088-wide fc1), like vgg_flax's 'fc' head.

The step is what a PyTorch user writes: forward, cross-entropy, backward,
`torch.optim.SGD` with momentum and weight decay. PyTorch is a benchmark extra
(`pip install -e '.[bench]'`), never imported by vgg_flax itself.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

# torchvision.models.vgg.cfgs, with 'M' for a 2x2 max pool.
CFGS = {
    11: [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    13: [64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    16: [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M',
         512, 512, 512, 'M'],
    19: [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M',
         512, 512, 512, 512, 'M'],
}


class VGG(nn.Module):
  """torchvision's VGG, with fc1 sized to the flattened feature map."""

  def __init__(self, depth: int = 16, num_classes: int = 1000, image_size: int = 224,
               in_channels: int = 3, batch_norm: bool = False, dropout: float = 0.5,
               width: int = 64, fc_dim: int = 4096):
    super().__init__()
    layers, c = [], in_channels
    for v in CFGS[depth]:
      if v != 'M':
        v = max(1, v * width // 64)  # vgg_flax's `width`: 64 = torchvision.
      if v == 'M':
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers.append(nn.Conv2d(c, v, kernel_size=3, padding=1))
        if batch_norm:
          layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        c = v
    self.features = nn.Sequential(*layers)
    side = image_size // 32
    self.classifier = nn.Sequential(
        nn.Linear(c * side * side, fc_dim), nn.ReLU(True), nn.Dropout(p=dropout),
        nn.Linear(fc_dim, fc_dim), nn.ReLU(True), nn.Dropout(p=dropout),
        nn.Linear(fc_dim, num_classes))
    for m in self.modules():  # torchvision's init.
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        nn.init.constant_(m.bias, 0)
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.constant_(m.bias, 0)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.classifier(torch.flatten(self.features(x), 1))


class TorchStep:
  """A PyTorch train step on a fixed random batch; call it to run one step.

  Args:
    depth: 11, 13, 16 or 19.
    image_size, batch_size, in_channels, num_classes, batch_norm, width, fc_dim:
      the workload, as in `vgg_flax.models.VGG`.
    lr, momentum, weight_decay: `torch.optim.SGD`'s.
    bf16: run forward and backward under CPU autocast to bfloat16 (float32
      parameters and optimiser), the counterpart of vgg_flax's model.dtype.
    channels_last: model and input in `torch.channels_last` (NHWC in memory),
      the layout oneDNN's fastest CPU convolutions want; None = with bf16
      (PyTorch's best CPU mode then), NCHW in float32 (as before).
    seed: of the parameters and the batch.
  """

  def __init__(self, depth: int, image_size: int, batch_size: int, *, in_channels: int = 3,
               num_classes: int = 1000, batch_norm: bool = False, lr: float = 0.01,
               momentum: float = 0.9, weight_decay: float = 5e-4, bf16: bool = False,
               width: int = 64, fc_dim: int = 4096, channels_last: bool | None = None,
               seed: int = 0):
    torch.manual_seed(seed)
    self.channels_last = bf16 if channels_last is None else channels_last
    layout = torch.channels_last if self.channels_last else torch.contiguous_format
    self.model = VGG(depth, num_classes, image_size, in_channels, batch_norm,
                     width=width, fc_dim=fc_dim).train().to(memory_format=layout)
    self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum,
                               weight_decay=weight_decay)
    self.loss_fn = nn.CrossEntropyLoss()
    self.x = torch.randn(batch_size, in_channels, image_size, image_size).contiguous(
        memory_format=layout)
    self.y = torch.randint(0, num_classes, (batch_size,))
    self.bf16 = bf16
    self.batch_size = batch_size

  def __call__(self) -> float:
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.bf16):
      loss = self.loss_fn(self.model(self.x), self.y)
    loss.backward()
    self.opt.step()
    return float(loss.detach())  # Synchronous anyway on the CPU.

  def time_steps(self, n: int) -> list[float]:
    """Seconds of each of `n` steps."""
    times = []
    for _ in range(n):
      start = time.perf_counter()
      self()
      times.append(time.perf_counter() - start)
    return times


def num_threads() -> int:
  return torch.get_num_threads()


def version() -> str:
  return torch.__version__


if __name__ == '__main__':
  step = TorchStep(16, 32, 128)
  step()
  times = step.time_steps(5)
  print(f'torch {version()} VGG-16 32 px batch 128: '
        f'{128 / float(np.median(times)):.1f} img/s ({num_threads()} threads)')
