"""The trainer: SGD semantics vs torch, no retracing, exact resume, and a CLI run."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from configs import test as test_config
from pcl_jax import configuration
from pcl_jax.clustering import jax_kmeans
from pcl_jax.run import files as run_files
from pcl_jax import state as state_lib
from pcl_jax import step as step_lib
from pcl_jax import train
from tests import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_optimizer_matches_torch_sgd_with_momentum_and_weight_decay():
  config = test_config.get_config()
  config.optim.lr, config.optim.weight_decay, config.optim.cos = 0.1, 0.01, False
  schedule = state_lib.make_lr_schedule(config.optim, 10, 5)
  tx = state_lib.make_optimizer(config.optim, schedule)
  target = np.array([1.0, -2.0, 3.0], np.float32)
  params = jnp.zeros(3)
  opt_state = tx.init(params)
  torch_params = torch.zeros(3, requires_grad=True)
  torch_opt = torch.optim.SGD([torch_params], lr=0.1, momentum=0.9, weight_decay=0.01)
  for _ in range(5):
    grads = jax.grad(lambda p: jnp.sum((p - target) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    torch_opt.zero_grad()
    torch.sum((torch_params - torch.from_numpy(target)) ** 2).backward()
    torch_opt.step()
  np.testing.assert_allclose(params, torch_params.detach().numpy(), rtol=1e-5)


@pytest.mark.parametrize('cos,per,expected', [
    (True, 'epoch', [0.1, 0.1, 0.1 * 0.5 * (1 + np.cos(np.pi / 4))]),
    (False, 'epoch', [0.1, 0.1, 0.1]),
])
def test_lr_schedule_is_the_reference_adjust_learning_rate(cos, per, expected):
  config = test_config.get_config()
  config.optim.lr, config.optim.cos, config.optim.schedule_per = 0.1, cos, per
  config.optim.schedule = '2,3'
  schedule = state_lib.make_lr_schedule(config.optim, 4, 10)
  np.testing.assert_allclose([schedule(0), schedule(9), schedule(10)], expected, rtol=1e-6)
  if not cos:  # step decay x0.1 at epochs 2 and 3
    np.testing.assert_allclose([schedule(20), schedule(35)], [0.01, 0.001], rtol=1e-5)


def test_cosine_per_step_decays_within_an_epoch():
  config = test_config.get_config()
  config.optim.lr, config.optim.schedule_per = 0.1, 'step'
  schedule = state_lib.make_lr_schedule(config.optim, 2, 10)
  assert float(schedule(5)) < 0.1
  np.testing.assert_allclose(schedule(10), 0.05, rtol=1e-6)


def test_train_step_traces_once_across_epochs_lr_and_cluster_changes(tmp_path, monkeypatch):
  config = test_config.get_config()
  config.train.epochs = 3
  config.optim.schedule_per = 'step'  # lr changes every step
  config.schedule.mode = 'fixed'
  config.schedule.every = 1  # k changes every epoch after warm-up
  # The jax k-means padded to the run's largest k: one program for k = 40, 20 and 10.
  config.clustering.backend, config.clustering.pad_k = 'jax', 'max'
  jax_kmeans._best_of_runs.clear_cache()  # pylint: disable=protected-access
  # The real jitted step (make_train_step), with a trace counter around the Python function.
  monkeypatch.setattr(step_lib, 'train_step', chex.assert_max_traces(step_lib.train_step, n=1))
  trainer = train.Trainer(config, str(tmp_path), configuration.validate(config))
  state = trainer.initial_state()
  records = []
  for epoch in range(config.train.epochs):
    state, record = trainer.run_epoch(state, epoch)
    if record['loss_proto'] is not None:
      trainer.schedule.update(epoch, record)
    records.append(record)
  assert records[0]['loss_proto'] is None and records[1]['loss_proto'] is not None
  assert records[1]['num_clusters'] != records[2]['num_clusters']
  assert len({r['lr'] for r in records}) == 3
  assert trainer.train_step._cache_size() == 1  # pylint: disable=protected-access
  assert [r['kmeans_compilations'] for r in records] == [0, 1, 1]


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def test_resume_equals_uninterrupted_run(reference_run, tmp_path):
  """Stopped after 2 of 3 epochs (checkpoint 2), then resumed: the shared uninterrupted run's
  state and metrics."""
  straight_dir, straight = reference_run
  config = runs.reference_config()
  resumed_dir = str(tmp_path / 'resumed')
  train.train_and_evaluate(config, resumed_dir, stop_after_epochs=2)
  assert sorted(os.listdir(os.path.join(resumed_dir, 'checkpoints'))) == ['2']
  resumed = train.train_and_evaluate(config, resumed_dir)
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  straight_records = run_files.read_metrics(os.path.join(straight_dir, 'metrics.jsonl'))
  resumed_records = run_files.read_metrics(os.path.join(resumed_dir, 'metrics.jsonl'))
  assert [r['epoch'] for r in resumed_records] == [0, 1, 2]
  for a, b in zip(straight_records, resumed_records):
    for key in ('loss_inst', 'acc_inst', 'loss_proto', 'acc_proto', 'lr', 'smoothing'):
      if a[key] is None:
        assert b[key] is None
      else:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)
    assert a['num_clusters'] == b['num_clusters']


def test_validation_knn_is_logged_and_best_checkpoint_kept(tmp_path):
  config = test_config.get_config()
  config.train.epochs = 2
  config.eval.val_every = 1
  train.train_and_evaluate(config, str(tmp_path))
  records = run_files.read_metrics(str(tmp_path / 'metrics.jsonl'))
  assert all(0.0 <= r['val_knn_top1'] <= 100.0 for r in records)
  kept = os.listdir(tmp_path / 'checkpoints_best')
  assert len(kept) == 1
  assert records[int(kept[0]) - 1]['val_knn_top1'] == max(r['val_knn_top1'] for r in records)


def test_cli_run_writes_run_files_and_compiles_the_step_once_as_k_changes(tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'pcl_jax.main', '--config=configs/test.py', f'--workdir={workdir}',
       '--config.train.epochs=4', '--config.train.steps_per_epoch=3',
       '--config.schedule.mode=fixed', '--config.schedule.every=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'epoch 0: loss_inst' in result.stdout
  records = run_files.read_metrics(str(workdir / 'metrics.jsonl'))
  assert len(records) == 4
  for key in ('epoch', 'loss_inst', 'loss_proto', 'acc_inst', 'acc_proto', 'lr', 'smoothing',
              'num_clusters', 'epoch_time_s', 'images_per_s', 'kmeans_compilations'):
    assert all(key in record for record in records), key
  assert records[0]['loss_proto'] is None  # warm-up epoch: no prototypes yet
  assert json.load(open(workdir / 'config.json'))['model']['arch'] == 'conv4'
  assert '4' in os.listdir(workdir / 'checkpoints')
  assert os.listdir(workdir / 'tensorboard')
  windows = [r['num_clusters'] for r in records]
  assert windows[0] is None and windows[1] == [40, 20] and windows[2] == [20, 10]
  assert windows[3] == [10, 5]
  assert [r['smoothing'] for r in records][1:] == sorted(r['smoothing'] for r in records[1:])
  assert 'clusters changed -> [20, 10]' in result.stderr
  assert 'train_step compiled 1 time(s)' in result.stderr


def test_zero_epochs_saves_the_initialisation_as_checkpoint_zero(tmp_path):
  config = test_config.get_config()
  config.train.epochs = 0
  state = train.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path / 'checkpoints') == ['0']
  from pcl_jax.run import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  tree, meta, step = checkpoint_lib.restore_for_eval(str(tmp_path))
  assert step == 0 and meta['epochs_done'] == 0
  np.testing.assert_array_equal(jax.tree_util.tree_leaves(tree['key_params'])[0],
                                jax.tree_util.tree_leaves(state.key_params)[0])


def _write_ohwi_checkpoint(source: str, target: str) -> None:
  """`target`: `source`'s latest checkpoint as checkpoints were written while conv kernels were
  stored [out, kh, kw, in] (OHWI, meta['conv_kernel_layout'] = 'OHWI')."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from pcl_jax.run import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  tree, meta, step = checkpoint_lib.restore_for_eval(source)
  as_ohwi = lambda path, leaf: (np.transpose(leaf, (3, 0, 1, 2))
                                if getattr(path[-1], 'key', None) == 'kernel' and leaf.ndim == 4
                                else leaf)
  tree = jax.tree_util.tree_map_with_path(as_ohwi, tree)
  manager = ocp.CheckpointManager(checkpoint_lib.checkpoint_dir(target),
                                  options=ocp.CheckpointManagerOptions(create=True),
                                  item_names=('state', 'meta'))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(tree),
      meta=ocp.args.JsonSave({**meta, 'conv_kernel_layout': 'OHWI'})))
  manager.wait_until_finished()
  manager.close()


# The committed OHWI run (tests/test_runtime_settings.py's legacy run) covers this by default.
@pytest.mark.slow
def test_checkpoints_with_ohwi_kernels_still_evaluate_and_resume(tmp_path):
  """Checkpoints from while kernels were stored OHWI: both restores upgrade them to HWIO, and
  the resumed run trains as the run it was copied from."""
  from pcl_jax.run import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.train.epochs = 1
  current, legacy = str(tmp_path / 'current'), str(tmp_path / 'legacy')
  train.train_and_evaluate(config, current)
  _write_ohwi_checkpoint(current, legacy)
  saved = checkpoint_lib.restore_for_eval(legacy)[0]
  assert np.shape(saved['key_params']['backbone']['Conv_0']['kernel'])[-1] == config.model.width
  chex.assert_trees_all_equal(saved, checkpoint_lib.restore_for_eval(current)[0])
  config.train.epochs = 2
  train.train_and_evaluate(config, current)
  train.train_and_evaluate(config, legacy)
  resumed = [run_files.read_metrics(os.path.join(d, 'metrics.jsonl'))[-1]
             for d in (current, legacy)]
  assert resumed[0]['epoch'] == resumed[1]['epoch'] == 1
  for key in ('loss_inst', 'acc_inst', 'loss_proto', 'acc_proto'):
    assert resumed[0][key] == resumed[1][key], key


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_a_protonce_epoch_runs_on_the_gpu(tmp_path, dtype):
  """The warm-up epoch, then the first E-step (the jax k-means) and a ProtoNCE epoch: the whole
  path a GPU run takes, not only up to the E-step."""
  config = test_config.get_config()
  config.train.dtype = dtype
  config.clustering.backend = 'jax'
  trainer = train.Trainer(config, str(tmp_path), configuration.validate(config))
  state = trainer.initial_state()
  records = []
  for epoch in range(2):
    state, record = trainer.run_epoch(state, epoch)
    records.append(record)
  assert {device.platform for device in state.queue.devices()} == {'gpu'}
  assert records[0]['loss_proto'] is None
  for key in ('loss_inst', 'loss_proto'):
    assert np.isfinite(records[1][key]), key
  assert 0 <= records[1]['acc_proto'] <= 100
  assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree_util.tree_leaves(state.params))
