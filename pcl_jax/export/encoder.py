"""A run directory's trained encoder, outside training: its variables, its description, and a
jitted function from images to features.

This module owns reading an encoder out of a run (`load`: the run's config.json and an Orbax
checkpoint, restored raw as `--mode=eval` does), the description an export writes beside the
weights (`describe`: encoder.json's architecture settings, image size, eval transform and
normalisation), and `feature_fn`, the one call a notebook needs: uint8 images in, the features
`--mode=eval` would compute out, with no config to write.
"""

import dataclasses
import json
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pcl_jax import configuration
from pcl_jax.configuration import UserError
from pcl_jax.data import device_transforms
from pcl_jax.data import recipes
from pcl_jax.data import sources
from pcl_jax.evaluation import driver
from pcl_jax import models
from pcl_jax.run import checkpoint as checkpoint_lib

ENCODERS = ('key', 'query')


@dataclasses.dataclass
class RunEncoder:
  """One encoder of one checkpoint of a run."""
  config: ml_collections.ConfigDict  # the run's settings (config.json)
  variables: dict  # {'params', 'batch_stats'} as numpy/jax arrays
  step: int  # the checkpoint: epochs done
  encoder: str  # 'key' (the momentum encoder) or 'query'


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The settings a run directory was trained with (its config.json, in today's names).

  Raises:
    UserError: no config.json there (not a run directory).
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'--workdir={workdir} holds no config.json and no checkpoint; pass the '
                    'directory of a training run')
  with open(path) as handle:
    return ml_collections.ConfigDict(configuration.upgrade_saved_config(json.load(handle)))


def load(workdir: str, step: Optional[int] = None, best: bool = False,
         encoder: Optional[str] = None) -> RunEncoder:
  """The encoder of a run's checkpoint: `step` (epochs done; default the latest) or with `best`
  the best-by-validation one; `encoder` 'key' or 'query' (default the run's `eval.encoder`, the
  one evaluation uses).

  Raises:
    UserError: not a run directory, no (such) checkpoint, a damaged one, an unknown encoder.
  """
  config = read_run_config(workdir)
  encoder = encoder or config.eval.encoder
  if encoder not in ENCODERS:
    raise UserError(f'--encoder={encoder!r} is unknown; use key or query')
  try:
    tree, meta, epochs_done = checkpoint_lib.restore_for_eval(workdir, step, best=best)
  except FileNotFoundError as error:
    raise UserError(str(error)) from error
  checkpoint_lib.check_model_matches(
      config, meta, checkpoint_lib.step_dir(workdir, epochs_done, best))
  return RunEncoder(config, driver.encoder_variables(tree, encoder), int(epochs_done), encoder)


def eval_resize(data_config, stored_size: Optional[int] = None) -> str:
  """The run's eval transform resize, 'whole' or 'center': resolved for its dataset when that is
  at hand, else for images of `stored_size` (`recipes.resolve_eval_resize`)."""
  if data_config.eval_resize != 'auto' or stored_size is not None:
    return recipes.resolve_eval_resize(data_config.eval_resize, int(data_config.image_size),
                                       stored_size)
  try:
    return sources.resolved_eval_resize(data_config)
  except (OSError, ValueError, UserError):  # the data is not on this machine
    return recipes.resolve_eval_resize('auto', int(data_config.image_size), None)


def describe(run: RunEncoder) -> dict:
  """encoder.json: what a user needs to rebuild and feed the exported encoder."""
  model, data = run.config.model, run.config.data
  resize = eval_resize(data)
  return {
      'arch': model.arch, 'width': int(model.width), 'small_stem': bool(model.small_stem),
      'mlp': bool(model.mlp), 'dim': int(model.dim),
      'image_size': int(data.image_size),
      'eval_transform': {
          'resize_short_side': recipes.eval_resize_size(int(data.image_size), resize),
          'center_crop': int(data.image_size), 'interpolation': 'bilinear',
          'eval_resize': resize},
      'mean': list(recipes.MEAN), 'std': list(recipes.STD),
      'output': 'the head output; pcl_jax L2-normalises it (its evaluation features)',
      'encoder': run.encoder, 'checkpoint_step': run.step,
  }


def feature_fn(workdir: str, step: Optional[int] = None, best: bool = False,
               encoder: Optional[str] = None,
               feature_layer: Optional[str] = None) -> Callable[[np.ndarray], jax.Array]:
  """A jitted function of a run's encoder: uint8 images [B, S, S, 3] (RGB, square, any S) ->
  float32 features [B, D], L2-normalised, as `--mode=eval` computes them (the run's eval
  transform on the device, then the encoder in eval mode). `feature_layer` 'head' or
  'backbone' (default the run's `eval.feature_layer`).

  Raises:
    UserError: as `load`.
  """
  run = load(workdir, step, best, encoder)
  model_config = run.config.model
  network = models.create_encoder(model_config.arch, dim=model_config.dim, mlp=model_config.mlp,
                                  small_stem=model_config.small_stem, width=model_config.width)
  layer = feature_layer or run.config.eval.feature_layer
  variables = jax.device_put(run.variables)
  image_size = int(run.config.data.image_size)

  @jax.jit
  def embed(images):
    resize = eval_resize(run.config.data, stored_size=images.shape[1])
    inputs = device_transforms.eval_transform(images, image_size, resize)
    embedding, backbone = network.apply(variables, inputs, train=False, return_backbone=True)
    return models.l2_normalize(backbone) if layer == 'backbone' else embedding

  return lambda images: embed(jnp.asarray(images, jnp.uint8))
