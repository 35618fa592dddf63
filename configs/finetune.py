"""Fine-tunes an ImageNet VGG-16 on a folder of images, with a new head.

  python -m vgg_flax.convert --from=torchvision --input=vgg16-397923af.pth --output=weights/vgg16
  python -m vgg_flax.train --config=configs/finetune.py --workdir=runs/finetune \
      --config.init_from=weights/vgg16 --config.data_dir=/path/to/images

`/path/to/images` holds `train/<class>/*.jpg` and `test/<class>/*.jpg`. Two heads:

  configs/finetune.py      (or :fc)  the classic head: fc1 and fc2 load from
                                     ImageNet, `predictions` is new; 224 px only.
  configs/finetune.py:gap            global average pooling, dropout, a small
                                     dense layer and `predictions`, all new; any size.

Blocks 1-4 are frozen: only block 5 and the head train. For Keras weights add
`--config.input.preset=caffe` (BGR mean subtraction, what they were trained with).
"""

from vgg_flax.config import get_base_config


def get_config(head: str = 'fc'):
  if head not in ('fc', 'gap'):
    raise ValueError(f"configs/finetune.py:{head}: expected 'fc' or 'gap'.")
  config = get_base_config()
  config.model.depth = 16
  config.model.head = head
  if head == 'gap':
    config.model.gap_hidden_dim = 256
    config.model.dropout_rate = 0.3
    config.dont_load = ('gap_hidden', 'predictions')  # New layers; fc1 and fc2 go unused.
  else:
    config.dont_load = ('predictions',)  # Another number of classes.
  config.freeze = ('block[1-4]_',)
  config.init_from = ''  # Set it: a `vgg_flax.convert` folder or a weights file.

  config.dataset = 'image_folder'
  config.image_size = 224
  config.input.preset = 'torchvision'  # The preprocessing of torchvision's weights.
  config.input.train_crop = 'random_resized'
  config.input.area_min = 0.35
  config.input.eval_resize = 256
  config.input.shuffle_buffer = 2048

  config.batch_size = 32
  config.num_epochs = 10
  config.optimizer = 'adamw'
  config.learning_rate = 1e-4
  config.weight_decay = 1e-4
  config.schedule.name = 'cosine'
  config.schedule.warmup_epochs = 0.5
  config.log_every_steps = 10
  config.checkpoint.keep = 1
  return config
