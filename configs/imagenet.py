"""The paper's ImageNet recipe (Simonyan & Zisserman 2015, section 3.1) at any depth and stage.

  python -m vgg_flax.train --config=configs/imagenet.py:16,s256 --workdir=runs/vgg16_s256 \
      --config.data_dir=/path/to/tensorflow_datasets

configs/vgg11.py, vgg13.py, vgg16.py and vgg19.py are this file at their depth,
with the command of every stage in their docstrings. The argument is
`DEPTH[,STAGE]`, the stage one of the paper's training scales (section 3.1,
"Training image size"):

  (none)      S jittered in [256, 512], trained from scratch at lr 1e-2: the one
              command. The paper did not train it so: it fine-tuned the
              multi-scale nets from S=384 ('multiscale').
  s256        fixed S=256 from scratch, lr 1e-2.
  s384        fixed S=384 initialised from the S=256 run (runs/vggDD_s256), lr 1e-3.
  multiscale  S jittered in [256, 512], fine-tuned from the S=384 run
              (runs/vggDD_s384), lr 1e-3 (the paper does not give it; 1e-3 as for S=384).

Every stage: SGD with momentum 0.9, batch 256, L2 weight decay 5e-4, dropout 0.5
on fc1 and fc2, the rate divided by 10 when the validation accuracy has not
improved for 3 epochs (`schedule.name='plateau'`; at most three times, as in the
paper), 74 epochs, 224 px crops with flips and AlexNet's colour shift (sigma
0.1). The fine-tuned stages stop dividing at 1e-5, the paper's last rate; the
paper gives no epoch count for them, so 74 is an upper bound (lower
--config.num_epochs to stop sooner). Evaluation during training is the centre
crop at Q = S (fixed S) or 384 (jittered), and the final state is evaluated
densely at that Q, as in Table 3 (`final_eval_*`). For Table 4's multi-scale
test, run `python -m vgg_flax.evaluate --workdir=... --config.eval.scales=paper`.
The data is tfds 'imagenet2012', which needs its manual download prepared first.
"""

from vgg_flax.config import get_base_config

STAGES = ('', 's256', 's384', 'multiscale')
# Stage: (S_min, S_max, learning rate, the stage it starts from).
_SCALES = {'': (256, 512, 1e-2, ''), 's256': (256, 256, 1e-2, ''),
           's384': (384, 384, 1e-3, 's256'), 'multiscale': (256, 512, 1e-3, 's384')}


def workdir(depth: int, stage: str) -> str:
  """The --workdir of a stage in the docstrings' commands; the next stage starts from it."""
  return f'runs/vgg{depth}' + (f'_{stage}' if stage else '')


def for_depth(depth: int, stage: str):
  """The config of configs/vgg{depth}.py:{stage}; a bad stage is named with that file."""
  if stage not in STAGES:
    raise ValueError(f'configs/vgg{depth}.py:{stage}: expected one of '
                     + ', '.join(repr(s) for s in STAGES[1:]) + ' (or none).')
  return get_config(f'{depth},{stage}')


def get_config(arg: str = '16'):
  depth, _, stage = arg.partition(',')
  if not depth.isdigit() or stage not in STAGES:
    raise ValueError(f'configs/imagenet.py:{arg}: expected DEPTH[,STAGE] with STAGE one of '
                     + ', '.join(repr(s) for s in STAGES[1:]) + ' (or none).')
  config = get_base_config()  # The defaults are the paper's recipe.
  config.model.depth = int(depth)
  scale_min, scale_max, config.learning_rate, parent = _SCALES[stage]
  config.input.scale_min, config.input.scale_max = scale_min, scale_max
  config.input.color_shift = 0.1  # AlexNet's, which the paper keeps.
  if parent:  # Fine-tuning the previous stage's net (all layers, a fresh optimiser).
    config.init_from = workdir(int(depth), parent)
    config.schedule.min_scale = 1e-2  # 1e-3 x 1e-2: never below the paper's last rate, 1e-5.
  config.eval.mode = 'dense'  # Table 3: dense evaluation at Q = S, or 384 for jittered S.
  config.eval.at_end = True
  return config
