r"""One full PCL epoch of configs/mini_imagenet.py: step, input pipeline, E-step by part, epoch.

  python benchmarks/epoch.py                                  # FakeData at 84 px (CPU: capped)
  python benchmarks/epoch.py --num-images 38400 --torch-reference   # the whole mini-ImageNet size
  python benchmarks/epoch.py --data-root /data/mini-imagenet        # the real data
  python benchmarks/epoch.py --batch 256 --dtype bfloat16 --torch-reference   # the GPU table
  python benchmarks/epoch.py --batch 256 --input augment     # augmentation in the jitted step
  python benchmarks/epoch.py --batch 256 --input resident    # no host loader at all

Reports images/s of the jitted step alone (resident batch), of the input pipeline alone, of
the feature pass's input and of the whole feature pass (uint8 cache rows + the on-device eval
transform, against the torch loader's workers running the PIL transform, with the ratios), the
E-step seconds by part (features, clustering) and the epoch seconds (E-step + M-steps fed by the
loader), and with --torch-reference the equivalent eager PyTorch MoCo/PCL step (same arch,
batch, precision; NCHW and channels-last, AMP/bf16 when --dtype=bfloat16) in a process of its
own (`torch_reference.TorchStepProcess`), with the JAX/PyTorch ratio, and then the median ratio
of --interleaved-rounds alternating rounds of JAX and PyTorch channels-last steps, the two
processes taking turns (the figure to quote on a machine whose speed drifts). Each figure prints
as soon as it is measured, the step comparison first, so a run cut short keeps what it measured.
With the pure-JAX k-means (`--backend jax`, or `auto` on a GPU without faiss-gpu) one E-step
runs before the feature passes and the timed epoch and is reported apart: it compiles the
k-means for each cluster count, which a training run pays once per count. --step-only stops
after the step and its comparison. `--input` picks how the M-steps get their batches: the host
loader's PIL workers (`loader`), the loader's draws with the augmentation in the step
(`augment`: data.augment_on_device), or nothing from the host (`resident`: data.device_resident,
the set on the device). The last lines project `--project-epochs` epochs from the measured epoch
(the E-step and the full set of M-steps at the measured rate) beside the step-bound limit (the
M-steps alone at the resident-batch step rate).
"""

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# First, as pcl_jax.main does: malloc tuned before jax starts its threads (host_memory).
from pcl_jax.kernels import host_memory  # pylint: disable=g-import-not-at-top
host_memory.tune_malloc()
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import mini_imagenet  # pylint: disable=g-import-not-at-top,wrong-import-position
from pcl_jax import clustering  # pylint: disable=g-import-not-at-top,wrong-import-position
from pcl_jax.clustering import bank as bank_lib
from pcl_jax import configuration  # pylint: disable=g-import-not-at-top,wrong-import-position
from pcl_jax.data import loaders
from pcl_jax import features as features_lib
from pcl_jax.kernels import host_threads  # pylint: disable=g-import-not-at-top,wrong-import-position
from pcl_jax.run import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from pcl_jax import step as step_lib
from pcl_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position


def _config(args):
  config = mini_imagenet.get_config()
  if args.data_root:
    config.data.root = args.data_root
  else:
    config.data.name = 'fake'
    config.data.fake_size = args.num_images
    config.data.fake_classes = 64
  config.train.batch_size = args.batch
  config.train.dtype = args.dtype
  config.train.epochs = 1
  config.pcl.warmup_epochs = 0  # the measured epoch runs the E-step
  config.pcl.num_negatives = max(args.batch, config.pcl.num_negatives // args.batch * args.batch)
  config.data.num_workers = args.workers
  config.clustering.backend = args.backend
  config.runtime.conv_impl = args.conv_impl
  config.data.augment_on_device = args.input == 'augment'
  config.data.device_resident = args.input == 'resident'
  config.clustering.pad_k = args.pad_k
  if args.image_size:
    config.data.image_size = args.image_size
  config.model.arch = args.arch
  num_images = args.num_images
  # The notes' list (3200, 2400, 1600, ...), never more clusters than images.
  config.schedule.all_clusters = ','.join(
      k for k in config.schedule.all_clusters.split(',') if int(k) <= num_images)
  return config


def _feature_input_images_per_s(trainer, batches, on_device):
  """Images/s delivered to the feature pass's network as device arrays: uint8 cache rows plus
  the on-device eval transform (what the E-step runs), or the torch loader's workers applying
  the PIL transform (the reference's way). The first batch (compilation, worker start) is not
  timed."""
  batch_size = trainer.config.train.batch_size
  images = features_lib.feature_pass_batches(trainer.datasets.train_eval, batch_size,
                                             trainer.config.data.num_workers, trainer.mesh,
                                             on_device)
  start = None
  for count, batch in enumerate(images):
    jax.block_until_ready(batch)
    if count == 0:
      start = time.perf_counter()
    if count == batches:
      break
  return batch_size * count / (time.perf_counter() - start)


def _feature_pass_images_per_s(trainer, state, on_device, resident=None):
  """Images/s of the whole feature pass (input + key encoder) over the training split (from the
  resident copy when given)."""
  variables = {'params': state.key_params, 'batch_stats': state.key_batch_stats}
  dataset = trainer.datasets.train_eval
  start = time.perf_counter()
  features, _ = features_lib.extract_features(trainer.embed, variables, dataset,
                                              trainer.config.train.batch_size,
                                              trainer.config.data.num_workers, mesh=trainer.mesh,
                                              transform_on_device=on_device, resident=resident)
  jax.block_until_ready(features)
  return len(dataset) / (time.perf_counter() - start)


def _embed_images_per_s(trainer, state, images, batches):
  """Images/s of the key encoder alone on a resident batch (compiled first): what the feature
  pass would reach if its input cost nothing."""
  variables = {'params': state.key_params, 'batch_stats': state.key_batch_stats}
  jax.block_until_ready(trainer.embed(variables, images))
  start = time.perf_counter()
  for _ in range(batches):
    features = trainer.embed(variables, images)
  jax.block_until_ready(features)
  return images.shape[0] * batches / (time.perf_counter() - start)


def _loader_images_per_s(trainer, steps):
  loader = loaders.train_loader(trainer.datasets.train, trainer.config.train.batch_size,
                                       seed=0, epoch=0,
                                       num_workers=trainer.config.data.num_workers)
  batches = loaders.numpy_batches(loader)
  next(batches)  # worker start-up
  start = time.perf_counter()
  count = 0
  for count, _ in enumerate(batches, 1):
    if count >= steps:
      break
  return count * trainer.config.train.batch_size / (time.perf_counter() - start)


def _resident_step(trainer, state):
  """run(steps) -> images/s of the jitted step on a resident batch, the state carried along
  (run.state); compiled and warmed up here."""
  batch = trainer.config.train.batch_size
  size = trainer.config.data.image_size
  rng = np.random.default_rng(0)
  sharding = parallel.batch_sharding(trainer.mesh)
  # uint8 views, as the loader delivers them: the step normalises on the device, and the timed
  # epoch below reuses this compilation. With data.augment_on_device, a loader batch: cached
  # images and the views' draws, which the step then applies.
  if trainer.config.data.device_resident:
    views = None
    resident = next(trainer._train_batches(0))  # pylint: disable=protected-access
  elif trainer.config.data.augment_on_device:
    views = next(loaders.numpy_batches(loaders.train_loader(
        trainer.datasets.train, batch, seed=0, epoch=0, num_workers=0)))
  else:
    views = {'im_q': rng.integers(0, 256, (batch, size, size, 3), np.uint8),
             'im_k': rng.integers(0, 256, (batch, size, size, 3), np.uint8),
             'index': np.arange(batch)}
  if views is not None:
    resident = parallel.global_batch(views, sharding)
  bank = bank_lib.empty_prototype_bank(trainer.config.schedule.num_levels, trainer.max_k,
                                       trainer.config.model.dim, trainer.datasets.num_train)
  hparams = step_lib.step_hparams(0.1, trainer.config.train.epochs, trainer.steps_per_epoch)
  bank, hparams = jax.device_put((bank, hparams), parallel.replicated(trainer.mesh))

  def run(steps):
    start = time.perf_counter()
    for _ in range(steps):
      run.state, metrics = trainer.train_step(run.state, resident, bank, hparams)
    jax.block_until_ready(metrics)
    return batch * steps / (time.perf_counter() - start)
  run.state = state
  run(5)  # compile, and let the heap reach its steady state (host_memory)
  return run


def _first_e_step_s(trainer, state):
  """Seconds of one E-step run before the timed feature passes and epoch when the pure-JAX
  k-means clusters, or None (faiss compiles nothing). That k-means compiles once per (padded,
  on an accelerator) cluster count, which the first E-step meeting a count pays; the timed epoch
  then measures the E-step of every later epoch with the same counts."""
  if clustering.resolve_backend(trainer.config.clustering.backend) != 'jax':
    return None
  start = time.perf_counter()
  jax.block_until_ready(trainer.e_step(state, 0)[0])
  return time.perf_counter() - start


def _torch_step(config, channels_last):
  """run(steps) -> images/s of the equivalent eager PyTorch step (torch_reference), warmed up,
  in a process of its own (`TorchStepProcess`: why); close() ends it."""
  return torch_reference.TorchStepProcess(
      arch=config.model.arch, image_size=config.data.image_size,
      batch=config.train.batch_size, width=config.model.width,
      small_stem=config.model.small_stem, num_negatives=config.pcl.num_negatives,
      channels_last=channels_last, bf16=config.train.dtype == 'bfloat16',
      device='cuda' if jax.default_backend() == 'gpu' else 'cpu')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num-images', type=int, default=3840,
                      help='FakeData size (38400 = mini-ImageNet train)')
  parser.add_argument('--data-root', default='', help='real mini-ImageNet root instead of fake')
  parser.add_argument('--batch', type=int, default=96)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1))
  parser.add_argument('--backend', default='auto', choices=['auto', 'faiss', 'jax'])
  parser.add_argument('--steps', type=int, default=10, help='steps for the step/loader rates')
  parser.add_argument('--epoch-steps', type=int, default=0,
                      help='cap on M-steps in the timed epoch (0: the full epoch)')
  parser.add_argument('--conv-impl', default='auto', choices=list(configuration.CONV_IMPLS),
                      help='runtime.conv_impl (auto: oneDNN custom calls, else PyTorch kernels, on '
                      'one CPU device)')
  parser.add_argument('--input', default='loader', choices=['loader', 'augment', 'resident'],
                      help="the M-steps' batches: the host loader's PIL workers; augment: "
                      'data.augment_on_device (the loader draws, the step augments); resident: '
                      'data.device_resident (the set on the device, no host loader)')
  parser.add_argument('--augment-on-device', dest='input', action='store_const', const='augment',
                      help='the same as --input augment (older commands in RESULTS.md)')
  parser.add_argument('--pad-k', default='auto', choices=list(configuration.PAD_K),
                      help='clustering.pad_k (the jax k-means: one program for every k)')
  parser.add_argument('--arch', default='resnet18', choices=list(configuration.ARCHS),
                      help='model.arch (mini-ImageNet: resnet18; conv4 for quick dry runs)')
  parser.add_argument('--image-size', type=int, default=0,
                      help='data.image_size (0: mini-ImageNet\'s 84; small for dry runs)')
  parser.add_argument('--project-epochs', type=int, default=200,
                      help='epochs to project a run\'s time for from the measured epoch')
  parser.add_argument('--torch-reference', action='store_true')
  parser.add_argument('--step-only', action='store_true',
                      help='stop after the step (and with --torch-reference its comparison)')
  parser.add_argument('--interleaved-rounds', type=int, default=7,
                      help='with --torch-reference: alternating rounds of JAX and PyTorch '
                      'channels-last steps, for a paired ratio')
  parser.add_argument('--round-steps', type=int, default=0,
                      help='steps per interleaved round (0: 3 on a CPU, 30 on an accelerator, '
                      'where 3 steps are too short to outweigh the turn-taking)')
  args = parser.parse_args()
  # The E-step's log line gives each level's clustering seconds (compilation included, the first
  # time a cluster count is met).
  logging.basicConfig(format='%(message)s')
  logging.getLogger('pcl_jax.train').setLevel(logging.INFO)
  config = _config(args)
  # Before JAX starts its CPU client, as pcl_jax.main does (host_threads).
  host_threads.limit_xla_threads(config.runtime.conv_impl, config.model.arch,
                                 config.runtime.xla_cpu_threads)
  config.train.steps_per_epoch = args.epoch_steps
  trainer = train.Trainer(config, '/tmp/pcl_epoch_benchmark', configuration.validate(config))
  state = trainer.initial_state()
  print(f'jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; '
        f'{config.model.arch} {config.data.image_size}px batch {config.train.batch_size} '
        f'{config.train.dtype}; N={trainer.datasets.num_train} ({config.data.name}); '
        f'levels {trainer.schedule.active}; workers {config.data.num_workers}; conv '
        f'{trainer.model.backbone.kernels.name}; input {args.input}; '
        f'pad_k {config.clustering.pad_k}', flush=True)
  jax_step = _resident_step(trainer, state)
  step_rate = jax_step(args.steps)
  _report('step (resident batch) img/s', step_rate)
  # The step comparison first: it is the headline, and a run cut short by a time limit keeps it.
  if args.torch_reference:
    _compare_with_torch(config, jax_step, step_rate, args)
  if args.step_only:
    return
  state = jax_step.state
  if args.input != 'resident':
    _report('input pipeline img/s', _loader_images_per_s(trainer, args.steps))
  # First, so that the feature passes timed below find everything compiled and the cache read
  # once, as every E-step after the first does.
  first_e_step = _first_e_step_s(trainer, state)
  if first_e_step is not None:
    _report('first E-step s (compiles k-means)', first_e_step)
  feature_input = [_feature_input_images_per_s(trainer, args.steps, on_device)
                   for on_device in (True, False)]
  _report('feature-pass input, on device img/s', feature_input[0])
  _report('feature-pass input, loader img/s', feature_input[1])
  _report('feature-pass input, device / loader', feature_input[0] / feature_input[1])
  # Compiles the feature pass's network before the passes are timed, as every epoch after the
  # first finds it compiled.
  size = config.data.image_size
  warm_images = parallel.global_batch(
      {'image': np.zeros((config.train.batch_size, size, size, 3), np.float32)},
      parallel.batch_sharding(trainer.mesh))['image']
  _report('feature pass, network alone img/s',
          _embed_images_per_s(trainer, state, warm_images, args.steps))
  feature_pass = [_feature_pass_images_per_s(trainer, state, on_device)
                  for on_device in (True, False)]
  _report('feature pass, on device img/s', feature_pass[0])
  _report('feature pass, loader img/s', feature_pass[1])
  _report('feature pass, device / loader', feature_pass[0] / feature_pass[1])
  if trainer.resident_images is not None:
    _report('feature pass, resident img/s',
            _feature_pass_images_per_s(trainer, state, True, trainer.resident_images))
  state, record = trainer.run_epoch(state, 0)
  epoch_share = 100 * record['estep_s'] / record['epoch_time_s']
  for name, value in ((f'epoch M-steps ({args.input}) img/s', record['images_per_s']),
                      ('E-step features s', record['estep_features_s']),
                      ('E-step clustering s', record['estep_clustering_s']),
                      ('E-step total s', record['estep_s']),
                      ('epoch s', record['epoch_time_s']),
                      ('E-step share of epoch %', epoch_share)):
    _report(name, value)
  if args.epoch_steps:
    full_epoch_s = (record['estep_s'] + trainer.datasets.num_train
                    / record['images_per_s'])
    _report('full epoch s (extrapolated)', full_epoch_s)
    _report('E-step share of full epoch %', 100 * record['estep_s'] / full_epoch_s)
  full_epoch_s = record['estep_s'] + trainer.datasets.num_train / record['images_per_s']
  _report(f'projected {args.project_epochs} epochs min', args.project_epochs * full_epoch_s / 60)
  _report(f'step-bound limit {args.project_epochs} epochs min',
          args.project_epochs * trainer.datasets.num_train / step_rate / 60)
  _report('k-means programs compiled', record['kmeans_compilations'])


def _compare_with_torch(config, jax_step, step_rate, args):
  """Times the PyTorch reference step (NCHW, then channels-last) in a process of its own, then
  alternates rounds of it with the JAX step (`jax_step`, which carries its state along)."""
  with _torch_step(config, channels_last=False) as nchw_step:
    nchw = nchw_step(args.steps)
  _report('torch step NCHW img/s', nchw)
  with _torch_step(config, channels_last=True) as channels_last_step:
    channels_last = channels_last_step(args.steps)
    _report('torch step channels-last img/s', channels_last)
    _report('JAX / best torch step', step_rate / max(nchw, channels_last))
    round_steps = args.round_steps or (3 if jax.default_backend() == 'cpu' else 30)
    (jax_median, torch_median), ratio = torch_reference.interleaved_rates(
        [jax_step, channels_last_step], args.interleaved_rounds, round_steps)
  _report(f'interleaved x{args.interleaved_rounds}: JAX step img/s', jax_median)
  _report(f'interleaved x{args.interleaved_rounds}: torch CL img/s', torch_median)
  _report('interleaved: median JAX / torch CL', ratio)


def _report(name, value):
  print(f'{name:<38}{value:>12.2f}', flush=True)


if __name__ == '__main__':
  main()
