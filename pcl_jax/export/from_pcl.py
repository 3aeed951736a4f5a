r"""An official PCL (or MoCo) checkpoint as a pcl_jax run directory, for pcl_jax's evaluation.

  python -m pcl_jax.export.from_pcl --checkpoint=pcl_r50.pth.tar --workdir=DIR \
      --config=configs/mini_imagenet.py [--config.data.root=...]
  python -m pcl_jax.main --config=configs/mini_imagenet.py --workdir=DIR --mode=eval \
      --config.model.arch=resnet50 ...   # the model settings this command prints

The file is read with `torch.load(weights_only=True)`: tensors only, never a full unpickle. Its
`state_dict` (salesforce/PCL's and MoCo's layout: `module.encoder_q.*`, `module.encoder_k.*`;
a bare torchvision-named state dict also works) gives the architecture (`model.arch`,
`mlp`, `dim`, `small_stem`, `width` are read off the tensors), and both encoders' weights
(`torch_names.from_torch`; without `encoder_k` the key encoder is a copy of the query one). The
config (--config and its overrides: the data and evaluation settings) gets those model settings,
and DIR gets config.json and checkpoint `epoch` (the file's, else 0) in pcl_jax's Orbax format,
which `--mode=eval` restores. Bad input gets one `error:` line (exit status 2): a file that is
not a PCL/MoCo state dict, one with pickled objects, an existing checkpoint in DIR.
"""

import os
import re
from typing import Dict, Tuple

from absl import app
from absl import flags
from ml_collections import config_flags

from pcl_jax.configuration import UserError
from pcl_jax.run import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'The config to evaluate with (data, eval).',
                                lock_config=False)
flags.DEFINE_string('checkpoint', None, 'The official .pth.tar (or .pth) file.')
flags.DEFINE_string('workdir', None, 'The run directory to create.')
flags.DEFINE_bool('verbose', False, 'Show the Python traceback of user errors.')
flags.mark_flags_as_required(['config', 'checkpoint', 'workdir'])

_PREFIXES = ('encoder_q.', 'encoder_k.')


def read_state_dict(path: str) -> Tuple[Dict[str, 'np.ndarray'], int]:
  """(the tensors as numpy arrays, the checkpoint's epoch or 0) of a .pth.tar, read with
  weights_only=True.

  Raises:
    UserError: not readable as tensors only (pickled objects), or holds no state dict.
  """
  import torch  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise UserError(f'--checkpoint={path} does not exist')
  try:
    saved = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as error:  # pylint: disable=broad-except
    # weights_only refuses a pickled object (pickle.UnpicklingError); a file that is no torch
    # file at all fails otherwise (RuntimeError, EOFError, ...): either way, not tensors alone.
    reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ''
    raise UserError(f'--checkpoint={path} cannot be read as tensors only (torch.load with '
                    f'weights_only=True: {type(error).__name__} {reason}); it holds pickled '
                    'objects or is not a PyTorch file. Save its state_dict alone and pass that')
  epoch = 0
  if isinstance(saved, dict) and isinstance(saved.get('state_dict'), dict):
    epoch = int(saved.get('epoch', 0) or 0)
    saved = saved['state_dict']
  if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
    raise UserError(f'--checkpoint={path} is not a PCL/MoCo state dict (a dict of tensors, or '
                    "{'state_dict': ...})")
  return {name: value.detach().cpu().numpy() for name, value in saved.items()}, epoch


def split_encoders(state: Dict[str, 'np.ndarray'], path: str):
  """(query encoder's tensors, key encoder's or None) without their prefixes.

  Raises:
    UserError: no encoder_q.* tensors nor a bare encoder (conv1.weight or blocks.0.conv.weight).
  """
  stripped = {re.sub(r'^module\.', '', name): value for name, value in state.items()}
  encoders = [{name[len(prefix):]: value for name, value in stripped.items()
               if name.startswith(prefix)} for prefix in _PREFIXES]
  if not encoders[0] and any(name in stripped for name in ('conv1.weight',
                                                           'blocks.0.conv.weight')):
    encoders[0] = stripped  # a bare encoder
  if not encoders[0]:
    raise UserError(f'--checkpoint={path} is not a PCL/MoCo state dict: it has no '
                    'module.encoder_q.* tensors and no bare encoder (conv1.weight)')
  return encoders[0], encoders[1] or None


def model_settings(encoder: Dict[str, 'np.ndarray'], path: str) -> dict:
  """`model.*` (arch, width, small_stem, mlp, dim) read off an encoder's tensors.

  Raises:
    UserError: a layout of no architecture pcl_jax has.
  """
  from pcl_jax.export import torch_names  # pylint: disable=g-import-not-at-top
  mlp = 'fc.0.weight' in encoder
  head = encoder.get('fc.2.weight' if mlp else 'fc.weight')
  if head is None:
    raise UserError(f'--checkpoint={path}: the encoder has no fc (or fc.0/fc.2) head')
  settings = {'mlp': mlp, 'dim': int(head.shape[0])}
  if 'blocks.0.conv.weight' in encoder:
    return dict(settings, arch='conv4', width=int(encoder['blocks.0.conv.weight'].shape[0]),
                small_stem=False)
  if 'conv1.weight' not in encoder:
    raise UserError(f'--checkpoint={path}: the encoder is neither a ResNet nor a Conv4')
  blocks = tuple(len({name.split('.')[1] for name in encoder
                      if name.startswith(f'layer{stage}.')}) for stage in range(1, 5))
  bottleneck = 'layer1.0.conv3.weight' in encoder
  arch = next((name for name, stages in torch_names.RESNET_STAGES.items()
               if stages == blocks and (name == 'resnet50') == bottleneck), None)
  if arch is None:
    raise UserError(f'--checkpoint={path}: a ResNet with {blocks} blocks per stage'
                    f'{" (bottleneck)" if bottleneck else ""} is none of '
                    f'{", ".join(torch_names.RESNET_STAGES)}')
  return dict(settings, arch=arch, width=int(encoder['conv1.weight'].shape[0]),
              small_stem=int(encoder['conv1.weight'].shape[-1]) == 3)


def import_checkpoint(config, checkpoint_path: str, workdir: str) -> dict:
  """Writes `workdir` (config.json and an Orbax checkpoint) from an official checkpoint; returns
  the model settings it read.

  Raises:
    UserError: as `read_state_dict`, `split_encoders`, `model_settings`; `workdir` already
      holds a checkpoint; tensors whose shapes the model does not have.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from pcl_jax import configuration
  from pcl_jax.export import torch_names
  from pcl_jax import models
  from pcl_jax.run import checkpoint as checkpoint_lib
  from pcl_jax.run import resume
  from pcl_jax import state as state_lib
  # pylint: enable=g-import-not-at-top
  checkpoints = checkpoint_lib.checkpoint_dir(workdir)
  if os.path.isdir(checkpoints) and checkpoint_lib.saved_steps(checkpoints):
    raise UserError(f'--workdir={workdir} already holds a checkpoint; pass a new --workdir')
  state_dict, epoch = read_state_dict(checkpoint_path)
  query, key = split_encoders(state_dict, checkpoint_path)
  settings = model_settings(query, checkpoint_path)
  for field, value in settings.items():
    config.model[field] = value
  schedule = configuration.validate(config)
  image_size = config.data.image_size

  def variables(encoder):
    try:
      return torch_names.from_torch(encoder, settings['arch'], settings['mlp'], image_size)
    except KeyError as missing:
      raise UserError(f'--checkpoint={checkpoint_path}: the {settings["arch"]} encoder lacks '
                      f'tensor {missing.args[0]}') from None
  query_variables = variables(query)
  key_variables = variables(key) if key is not None else query_variables
  model = models.encoder_from_config(config)
  tx = state_lib.make_optimizer(config.optim, state_lib.make_lr_schedule(config.optim, 1, 1))
  template = state_lib.create_state(jax.random.PRNGKey(config.seed), model, tx, image_size,
                                    config.pcl.num_negatives)
  for name, tree in (('params', query_variables['params']),
                     ('batch_stats', query_variables['batch_stats'])):
    want = jax.tree_util.tree_map(np.shape, getattr(template, name))
    got = jax.tree_util.tree_map(np.shape, tree)
    if want != got:
      raise UserError(f'--checkpoint={checkpoint_path}: its {name} do not have the shapes of a '
                      f'{settings["arch"]} at data.image_size={image_size} (a Conv4 head depends '
                      'on the image size); set --config.data.image_size to the one it was '
                      'trained at')
  state = template.replace(params=query_variables['params'],
                           batch_stats=query_variables['batch_stats'],
                           key_params=key_variables['params'],
                           key_batch_stats=key_variables['batch_stats'])
  os.makedirs(workdir, exist_ok=True)
  resume.write_config(workdir, config, resumed=False)
  meta = {'epochs_done': epoch, 'schedule': schedule.state_dict(),
          'model': {field: config.model[field] for field in models.IDENTITY_FIELDS},
          'image_size': image_size, 'num_negatives': config.pcl.num_negatives,
          'imported_from': os.path.abspath(checkpoint_path)}
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  try:
    checkpointer.save(epoch, jax.device_put(state), meta)
    checkpointer.wait()
  finally:
    checkpointer.close()
  return settings


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}')
  cli.setup_logging(FLAGS.verbose)

  def run():
    settings = import_checkpoint(FLAGS.config, FLAGS.checkpoint, FLAGS.workdir)
    overrides = ' '.join(f'--config.model.{field}={value}' for field, value in settings.items())
    print(f'wrote {FLAGS.workdir}; evaluate it with: python -m pcl_jax.main --config=CONFIG '
          f'--workdir={FLAGS.workdir} --mode=eval {overrides}')
  cli.run_reporting_errors(run, FLAGS.verbose)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
