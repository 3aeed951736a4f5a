"""Tests of pcl_jax.export: an encoder out to PyTorch (safetensors, salesforce/PCL's .pth.tar)
and back in, PyTorch's outputs equal to pcl_jax's features, and the one-line errors."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

from configs import test as test_config
from pcl_jax.configuration import UserError
from pcl_jax.data import device_transforms
from pcl_jax.data import loaders
from pcl_jax.evaluation import driver
from pcl_jax.export import __main__ as export_cli
from pcl_jax.export import encoder as encoder_lib
from pcl_jax.export import from_pcl
from pcl_jax.export import torch_models
from pcl_jax.export import torch_names
from pcl_jax import features as features_lib
from pcl_jax import models
from pcl_jax.run import cli
from pcl_jax.run import checkpoint as checkpoint_lib

ARCHS = [
    # (arch, width, small_stem, mlp, image size)
    ('conv4', 8, False, True, 20),  # a 20 px input leaves a 1x1 map; 36 px a 2x2 one, below
    ('conv4', 8, False, False, 36),
    ('resnet18', 64, True, True, 16),
    ('resnet18', 64, False, False, 32),
]


def trained_like_variables(arch, width, small_stem, mlp, image_size, seed=0):
  """An encoder's variables with BN statistics moved off their initial values, as training
  leaves them, so a wrong running-stat mapping shows."""
  model = models.create_encoder(arch, dim=16, mlp=mlp, small_stem=small_stem, width=width)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(seed), jnp.zeros((1, image_size, image_size, 3)))
  rng = np.random.default_rng(seed)
  perturb = lambda path, x: (x + rng.uniform(0.1, 0.5, x.shape).astype(np.float32)
                             if path[-1].key == 'var' else
                             x + rng.normal(0, 0.1, x.shape).astype(np.float32))
  stats = jax.tree_util.tree_map_with_path(perturb, variables['batch_stats'])
  return model, {'params': variables['params'], 'batch_stats': stats}


@pytest.mark.parametrize('arch, width, small_stem, mlp, image_size', ARCHS)
def test_pytorch_computes_pcl_jax_features_from_the_exported_weights(arch, width, small_stem,
                                                                     mlp, image_size):
  model, variables = trained_like_variables(arch, width, small_stem, mlp, image_size)
  images = np.random.default_rng(1).normal(size=(3, image_size, image_size, 3)).astype(np.float32)
  want = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, images))
  state = torch_names.to_torch(jax.tree_util.tree_map(np.asarray, variables), arch, mlp,
                               image_size)
  module = torch_models.build({'arch': arch, 'width': width, 'small_stem': small_stem,
                               'mlp': mlp, 'dim': 16, 'image_size': image_size})
  module.load_state_dict({name: torch.from_numpy(value) for name, value in state.items()},
                         strict=True)
  with torch.no_grad():
    got = module(torch.from_numpy(images).permute(0, 3, 1, 2))
  got = torch.nn.functional.normalize(got, dim=1).numpy()
  np.testing.assert_allclose(got, want, atol=2e-5)
  back = torch_names.from_torch(state, arch, mlp, image_size)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back,
                         jax.tree_util.tree_map(np.asarray, variables))


def test_resnet_names_are_torchvisions():
  variables = trained_like_variables('resnet18', 64, False, True, 32)[1]
  state = torch_names.to_torch(jax.tree_util.tree_map(np.asarray, variables), 'resnet18', True, 32)
  import torchvision  # pylint: disable=g-import-not-at-top
  reference = torchvision.models.resnet18(num_classes=16).state_dict()
  reference = {name.replace('fc.', 'fc.2.'): value for name, value in reference.items()}
  assert set(state) == set(reference) | {'fc.0.weight', 'fc.0.bias'}
  for name, value in reference.items():
    assert state[name].shape == tuple(value.shape), name


def test_a_resnet_of_another_width_is_refused():
  with pytest.raises(ValueError, match="model.width=32: torchvision's ResNets are 64 wide"):
    torch_names.check_exportable('resnet18', 32)


# ----------------------------------------------------------------------------------------------
# The command, on a trained run.


@pytest.fixture
def run_dir(tiny_run):
  """The suite's shared tiny run (tests/runs.py): checkpoint 1 of configs/test.py. An export
  only reads it."""
  return tiny_run


@pytest.fixture(autouse=True)
def _project_logging_left_alone(monkeypatch):
  """The commands' main() sets up the process's logging for a command line; called in-process
  here, it would take the pcl_jax logger from pytest's capture for the rest of the test run."""
  monkeypatch.setattr(cli, 'setup_logging', lambda verbose: None)


def exported(run_dir, out, *flags):
  export_cli.main([f'--workdir={run_dir}', f'--out={out}', *flags])
  return json.load(open(os.path.join(out, 'encoder.json')))


def test_the_export_loads_into_pytorch_and_gives_the_evaluation_features(run_dir, tmp_path):
  spec = exported(run_dir, str(tmp_path / 'out'))
  assert {key: spec[key] for key in ('arch', 'width', 'mlp', 'dim', 'image_size', 'encoder')} == {
      'arch': 'conv4', 'width': 8, 'mlp': False, 'dim': 16, 'image_size': 16, 'encoder': 'key'}
  assert spec['mean'] == [0.485, 0.456, 0.406] and spec['std'] == [0.229, 0.224, 0.225]
  module = torch_models.build(spec)
  module.load_state_dict(safetensors.torch.load_file(str(tmp_path / 'out/encoder.safetensors')),
                         strict=True)
  # The run's own feature pass (--mode=eval's) over its training images.
  config = encoder_lib.read_run_config(run_dir)
  dataset = loaders.build_train_datasets(config).train_eval
  tree, _, _ = checkpoint_lib.restore_for_eval(run_dir)
  variables = {'params': tree['key_params'], 'batch_stats': tree['key_batch_stats']}
  embed = features_lib.make_embed_fn(models.encoder_from_config(config))
  want, _ = features_lib.extract_features(embed, variables, dataset, 32, 0)
  images = dataset.source.images[:40]
  inputs = np.array(device_transforms.eval_transform(jnp.asarray(images), 16,
                                                       spec['eval_transform']['eval_resize']))
  with torch.no_grad():
    got = torch.nn.functional.normalize(module(torch.from_numpy(inputs).permute(0, 3, 1, 2)))
  np.testing.assert_allclose(got.numpy(), np.asarray(want)[:40], atol=2e-5)
  # The notebook call: uint8 images in, the same features out.
  np.testing.assert_allclose(np.asarray(encoder_lib.feature_fn(run_dir)(images)),
                             np.asarray(want)[:40], atol=2e-5)


def test_the_pcl_format_round_trips_through_from_pcl(run_dir, tmp_path):
  out = str(tmp_path / 'out')
  exported(run_dir, out, '--format=pcl', '--encoder=query')
  saved = torch.load(os.path.join(out, 'checkpoint.pth.tar'), weights_only=True)
  assert all(name.startswith('module.encoder_q.') for name in saved['state_dict'])
  config = test_config.get_config()
  config.model.width = 64  # read off the file: the import sets every model field
  imported = str(tmp_path / 'imported')
  settings = from_pcl.import_checkpoint(config, os.path.join(out, 'checkpoint.pth.tar'),
                                        imported)
  assert settings == {'arch': 'conv4', 'width': 8, 'small_stem': False, 'mlp': False, 'dim': 16}
  original, _, _ = checkpoint_lib.restore_for_eval(run_dir)
  again, meta, step = checkpoint_lib.restore_for_eval(imported)
  assert step == saved['epoch'] == 1 and meta['model']['width'] == 8
  for name in ('key_params', 'params'):  # no encoder_k in the file: key = query
    jax.tree_util.tree_map(np.testing.assert_allclose, again[name], original['params'])
  run = encoder_lib.load(imported)  # the imported run's config.json names the model
  assert run.config.model.width == 8
  results = driver.evaluate_checkpoint(run.config, imported)  # what --mode=eval does
  assert results['checkpoint_step'] == 1 and 0 <= results['knn_top1'] <= 100


def test_the_official_resnet50_layout_is_read():
  """salesforce/PCL's released checkpoints: MoCo's builder around torchvision's ResNet-50, the
  MLP head as fc.0 / fc.2, under module.encoder_q and module.encoder_k."""
  import torchvision  # pylint: disable=g-import-not-at-top
  encoder = torchvision.models.resnet50(num_classes=128)
  encoder.fc = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), encoder.fc)
  state = {f'module.encoder_{which}.{name}': value.numpy()
           for which in 'qk' for name, value in encoder.state_dict().items()}
  state['module.queue'] = np.zeros((128, 16), np.float32)
  query, key = from_pcl.split_encoders(state, 'pcl.pth.tar')
  assert key is not None and 'module.queue' not in query and 'queue' not in query
  settings = from_pcl.model_settings(query, 'pcl.pth.tar')
  assert settings == {'arch': 'resnet50', 'width': 64, 'small_stem': False, 'mlp': True,
                      'dim': 128}
  variables = torch_names.from_torch(query, 'resnet50', True, 224)
  back = torch_names.to_torch(variables, 'resnet50', True, 224)
  assert set(back) == set(query)
  for name, value in back.items():
    np.testing.assert_array_equal(value, query[name])


def test_errors_are_one_line_and_leave_no_half_written_out(run_dir, tmp_path, capsys,
                                                           monkeypatch):
  out = str(tmp_path / 'out')
  exported(run_dir, out)
  with pytest.raises(SystemExit) as exit_info:
    export_cli.main([f'--workdir={run_dir}', f'--out={out}'])
  assert exit_info.value.code == 2
  assert 'exists; pass --overwrite' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    export_cli.main([f'--workdir={tmp_path}', f'--out={tmp_path / "other"}'])
  assert 'holds no config.json and no checkpoint' in capsys.readouterr().err
  # A failure mid-write: the old export stays whole, no staging folder is left.
  before = sorted(os.listdir(out))
  monkeypatch.setattr(export_cli, 'write_pcl_checkpoint',
                      lambda *args: (_ for _ in ()).throw(OSError(28, 'No space left')))
  with pytest.raises(SystemExit):
    export_cli.main([f'--workdir={run_dir}', f'--out={out}', '--overwrite', '--format=pcl'])
  assert sorted(os.listdir(out)) == before
  assert sorted(os.listdir(tmp_path)) == ['out']


def test_from_pcl_refuses_what_is_not_a_pcl_state_dict(tmp_path):
  config = test_config.get_config()
  pickled = str(tmp_path / 'pickled.pth.tar')
  torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}, 'args': argparse_namespace()},
             pickled)
  with pytest.raises(UserError, match='cannot be read as tensors only'):
    from_pcl.import_checkpoint(config, pickled, str(tmp_path / 'a'))
  other = str(tmp_path / 'other.pth')
  torch.save({'weight': torch.zeros(3)}, other)
  with pytest.raises(UserError, match='is not a PCL/MoCo state dict'):
    from_pcl.import_checkpoint(config, other, str(tmp_path / 'b'))


def argparse_namespace():
  """What salesforce/PCL's main_pcl.py does not save, but many training scripts do: a pickled
  object beside the tensors."""
  import argparse  # pylint: disable=g-import-not-at-top
  return argparse.Namespace(lr=0.03)
