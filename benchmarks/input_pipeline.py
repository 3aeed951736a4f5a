r"""Input-pipeline benchmark: is the training step ever waiting for data?

Prints (1) images/s of the loader alone for each worker count, with images per CPU-second of
loader work ("per core"), and the loader with views ending in uint8 (what it ships: the step
normalises on the device) against views ending in host-normalised float32; (2) images/s of
the real jitted PCL training step fed from a resident synthetic batch; (3) the same step fed by
the loader; and the ratio fed / synthetic (target >= 0.90). An "image" is one training sample,
i.e. one (im_q, im_k) pair of augmented views. It also compares the loader running the recipe
in its PIL workers against `data.augment_on_device` (the workers only draw the random choices;
the jitted step augments), and times that device augmentation alone.

  python benchmarks/input_pipeline.py                    # Conv4, 84 px, batch 64, JPEG folder
  python benchmarks/input_pipeline.py --data=fake --workers=0,1,2,4 --fed_workers=2
  python benchmarks/input_pipeline.py --aug_plus=0 --loader_only   # MoCo v1, the loader alone

--data=jpeg writes --num_images 84x84 JPEGs (mini-ImageNet's size; 10 classes) into a temp dir and
reads them as data.name=mini_imagenet (folder layout), so the one-time decode into the memory-mapped
cache runs too (its time is printed); --data=fake uses torchvision FakeData. The step is built with
the trainer's own functions (models, train, state), warm-up epochs (no prototypes), as in the
trainer. Timings on shared machines are noisy: measurements alternate and the median is reported.
"""

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from PIL import Image
from torchvision import transforms

from configs import default
from pcl_jax.clustering import bank as bank_lib
from pcl_jax.data import device_augment
from pcl_jax.data import loaders
from pcl_jax.data import transforms as data_transforms
from pcl_jax import models
from pcl_jax import state as state_lib
from pcl_jax import step as step_lib
# pylint: enable=g-import-not-at-top,wrong-import-position


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', choices=('jpeg', 'fake'), default='jpeg')
  parser.add_argument('--num_images', type=int, default=640)
  parser.add_argument('--image_size', type=int, default=84)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--arch', default='conv4')
  parser.add_argument('--aug_plus', type=int, default=1, help='1: MoCo v2 recipe, 0: MoCo v1')
  parser.add_argument('--workers', default='0,1,2', help='worker counts of the loader-alone test')
  parser.add_argument('--fed_workers', default='2', help='worker counts feeding the step')
  parser.add_argument('--repeats', type=int, default=2, help='alternating repeats of each test')
  parser.add_argument('--loader_only', action='store_true', help='skip the training-step tests')
  return parser.parse_args()


def _make_jpeg_folder(root: str, num_images: int, size: int) -> None:
  """mini-ImageNet-like folder layout of smooth random JPEGs (realistic file sizes)."""
  rng = np.random.default_rng(0)
  for index in range(num_images):
    class_dir = os.path.join(root, 'train', f'n{index % 10:08d}')
    os.makedirs(class_dir, exist_ok=True)
    coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(
        os.path.join(class_dir, f'{index:06d}.jpg'), quality=90)


def _config(args, root):
  config = default.get_config()
  config.data.image_size = args.image_size
  config.data.aug_plus = bool(args.aug_plus)
  if args.data == 'jpeg':
    config.data.name, config.data.root = 'mini_imagenet', root
  else:
    config.data.name, config.data.fake_size = 'fake', args.num_images
  config.model.arch = args.arch
  config.train.batch_size = args.batch_size
  config.pcl.num_negatives = 10 * args.batch_size
  return config


def _children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def loader_alone(dataset, batch_size: int, num_workers: int, epoch: int):
  """One full epoch of the loader: (images/s, images per CPU-second of loader work)."""
  wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu_s()
  images = 0
  loader = loaders.train_loader(dataset, batch_size, seed=0, epoch=epoch,
                                       num_workers=num_workers)
  for batch in loaders.numpy_batches(loader):
    images += batch['index'].shape[0]
  del loader  # workers are joined at the end of the epoch; their CPU time is now counted
  wall = time.perf_counter() - wall
  cpu = time.process_time() - cpu + _children_cpu_s() - children
  return images / wall, images / cpu


def _compare_augment_on_device(datasets, batch_size: int, workers: int, args) -> None:
  """Loader images/s and per-core work with the recipe in PIL workers against
  data.augment_on_device, then the jitted device augmentation's own time per batch of pairs."""
  on_device = loaders.DrawsOnlyDataset(
      datasets.train.source,
      data_transforms.AugmentationDraws(args.image_size, bool(args.aug_plus)))
  runs = {'pil': [], 'device': []}
  for epoch in range(args.repeats):  # alternate, so load changes hit both alike
    runs['pil'].append(loader_alone(datasets.train, batch_size, workers, epoch))
    runs['device'].append(loader_alone(on_device, batch_size, workers, epoch))
  (pil_rate, pil_core), (device_rate, device_core) = (
      [statistics.median(r[i] for r in runs[name]) for i in (0, 1)] for name in ('pil', 'device'))
  print(f'\naugmentation, num_workers={workers}: in the PIL workers {pil_rate:7.0f} images/s '
        f'({pil_core:.0f} per core); on the device (data.augment_on_device) {device_rate:7.0f} '
        f'images/s ({device_core:.0f} per core): {device_core / pil_core:.1f}x less loader work '
        'per pair')
  batch = next(loaders.numpy_batches(loaders.train_loader(
      on_device, batch_size, seed=0, epoch=0, num_workers=0)))
  images, draws = jax.device_put((batch['image'], batch['augment_q']))
  augment = jax.jit(device_augment.augment, static_argnums=(2, 3))
  recipe = (args.image_size, bool(args.aug_plus))
  jax.block_until_ready(augment(images, draws, *recipe))  # compile
  repeats = 10
  start = time.perf_counter()
  for _ in range(repeats):
    views = augment(images, draws, *recipe)
  jax.block_until_ready(views)
  seconds = 2 * (time.perf_counter() - start) / repeats  # two views a pair
  print(f'device augmentation alone ({jax.default_backend()}): {1e3 * seconds:.1f} ms per batch '
        f'of {batch_size} pairs ({batch_size / seconds:.0f} pairs/s)')


def main():
  args = _parse_args()
  print(f'JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), '
        f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start '
        '(shared machine: numbers are noisy)')
  root = tempfile.mkdtemp(prefix='pcl_bench_')
  try:
    if args.data == 'jpeg':
      _make_jpeg_folder(root, args.num_images, args.image_size)
    config = _config(args, root)
    start = time.perf_counter()
    datasets = loaders.build_train_datasets(config)
    print(f'data: {args.data}, {datasets.num_train} images at {args.image_size} px, '
          f'aug_plus={bool(args.aug_plus)}; source ready in {time.perf_counter() - start:.1f}s '
          f'(jpeg: includes the one-time decode into the cache)')
    batch_size = args.batch_size
    steps = datasets.num_train // batch_size - 1  # the first batch of an epoch warms up

    # Step 1: the loader alone.
    print('\nloader alone (one epoch each; image = one im_q/im_k pair):')
    for workers in [int(w) for w in args.workers.split(',')]:
      runs = [loader_alone(datasets.train, batch_size, workers, epoch)
              for epoch in range(args.repeats)]
      rate = statistics.median(r[0] for r in runs)
      per_core = statistics.median(r[1] for r in runs)
      print(f'  num_workers={workers}: {rate:7.0f} images/s  ({per_core:.0f} images per '
            f'CPU-second of loader work = per core; {2 * per_core:.0f} augmented views)')

    # Step 1b: what ending the augmentations in uint8 (normalised later on the device) saves
    # against ending them in host-normalised float32, as torchvision's ToTensor + Normalize do.
    float_views = loaders.TwoCropDataset(datasets.train.source, transforms.Compose(
        datasets.train.transform.transforms[:-1] + [data_transforms.ToNormalizedHWC()]))
    workers = max(int(w) for w in args.workers.split(','))
    rates = {'uint8': [], 'float32': []}
    for epoch in range(args.repeats):  # alternate, so load changes hit both alike
      rates['uint8'].append(loader_alone(datasets.train, batch_size, workers, epoch)[0])
      rates['float32'].append(loader_alone(float_views, batch_size, workers, epoch)[0])
    uint8_rate, float_rate = (statistics.median(rates[k]) for k in ('uint8', 'float32'))
    print(f'\nloader output, num_workers={workers}: uint8 {uint8_rate:7.0f} images/s, host-'
          f'normalised float32 {float_rate:7.0f} images/s, ratio {uint8_rate / float_rate:.2f} '
          f'(bytes per pair {2 * 3 * args.image_size ** 2} vs {8 * 3 * args.image_size ** 2})')

    _compare_augment_on_device(datasets, batch_size, workers, args)

    if args.loader_only:
      return

    # Step 2: the training step, as the trainer builds it.
    model = models.encoder_from_config(config, bn_groups=config.train.shuffle_bn_groups)
    lr_schedule = state_lib.make_lr_schedule(config.optim, config.train.epochs, steps + 1)
    tx = state_lib.make_optimizer(config.optim, lr_schedule)
    step_fn = step_lib.make_train_step(config, model)
    bank = bank_lib.empty_prototype_bank(config.schedule.num_levels, 64, config.model.dim,
                                         datasets.num_train)
    hparams = step_lib.step_hparams(0.0, config.train.epochs, steps + 1)
    state = state_lib.create_state(jax.random.PRNGKey(0), model, tx, args.image_size,
                                   config.pcl.num_negatives)
    first = next(loaders.numpy_batches(loaders.train_loader(
        datasets.train, batch_size, seed=0, epoch=0, num_workers=0)))
    resident = jax.device_put(first)
    state, metrics = step_fn(state, resident, bank, hparams)  # compile
    jax.block_until_ready(metrics)

    def synthetic():
      nonlocal state
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = step_fn(state, resident, bank, hparams)
      jax.block_until_ready(metrics)
      return steps * batch_size / (time.perf_counter() - start)

    def fed(workers, epoch):
      nonlocal state
      loader = loaders.train_loader(datasets.train, batch_size, seed=0, epoch=epoch,
                                           num_workers=workers)
      batches = loaders.numpy_batches(loader)
      state, metrics = step_fn(state, next(batches), bank, hparams)
      jax.block_until_ready(metrics)  # workers are up and their queues full: steady state
      start = time.perf_counter()
      count = 0
      for batch in batches:
        state, metrics = step_fn(state, batch, bank, hparams)
        count += 1
      jax.block_until_ready(metrics)
      return count * batch_size / (time.perf_counter() - start)

    fed_workers = [int(w) for w in args.fed_workers.split(',')]
    results = {'synthetic': []}
    results.update({workers: [] for workers in fed_workers})
    for repeat in range(args.repeats):  # alternate, so load changes hit both alike
      results['synthetic'].append(synthetic())
      for workers in fed_workers:
        results[workers].append(fed(workers, epoch=100 + repeat))
    base = statistics.median(results['synthetic'])
    print(f'\ntraining step ({args.arch}, {args.image_size} px, batch {batch_size}, {steps} steps '
          f'a run, {args.repeats} runs, median):')
    print(f'  resident synthetic batch: {base:7.1f} images/s  '
          f'(runs: {", ".join(f"{r:.1f}" for r in results["synthetic"])})')
    for workers in fed_workers:
      rate = statistics.median(results[workers])
      print(f'  fed by the loader, num_workers={workers}: {rate:7.1f} images/s  ratio '
            f'{rate / base:.3f} (target >= 0.90; runs: '
            f'{", ".join(f"{r:.1f}" for r in results[workers])})')
    print(f'load average {os.getloadavg()[0]:.1f} at end')
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
