"""Subprocess body of test_parallel.py: runs with a given fake device count (set before JAX).

  python tests/parallel_worker.py OUT.npz DEVICES [--process-id P --num-processes N --port X]
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument('out')
parser.add_argument('devices', type=int)
parser.add_argument('--process-id', type=int, default=0)
parser.add_argument('--num-processes', type=int, default=1)
parser.add_argument('--port', type=int, default=0)
args = parser.parse_args()
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import test as test_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from pcl_jax import clustering  # pylint: disable=g-import-not-at-top,wrong-import-position
from pcl_jax.clustering import jax_kmeans
from pcl_jax import configuration  # pylint: disable=g-import-not-at-top,wrong-import-position
from pcl_jax.data import resident  # pylint: disable=g-import-not-at-top,wrong-import-position
from pcl_jax.run import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from pcl_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

if args.num_processes > 1:
  parallel.initialize_distributed(f'localhost:{args.port}', args.num_processes, args.process_id)

config = test_config.get_config()
config.train.shuffle_bn_groups = 4
config.train.steps_per_epoch = 2
config.clustering.backend = 'jax'
config.schedule.all_clusters = '20,10'
trainer = train.Trainer(config, '/tmp/unused', configuration.validate(config))
assert jax.device_count() == args.devices * args.num_processes, jax.devices()
state = trainer.initial_state()
# Epoch 0 is warm-up (InfoNCE); epoch 1 runs the E-step and ProtoNCE: 2 steps each.
records = []
for epoch in range(2):
  state, record = trainer.run_epoch(state, epoch)
  records.append(record)
variables = {'params': state.key_params, 'batch_stats': state.key_batch_stats}
features, _ = trainer._embed_dataset(variables, trainer.datasets.train_eval)  # pylint: disable=protected-access
sharded_features = features
features = parallel.to_host(features)
centroids, im2cluster, _ = clustering.kmeans(features, 10, backend='jax', niter=5, nredo=1,
                                             seed=0)
# The jax backend on the array sharded over every device of every process equals it on the host
# copy (what the E-step does in multi-host runs).
assert len(sharded_features.sharding.device_set) == args.devices * args.num_processes
sharded_centroids, sharded_im2cluster, _ = clustering.kmeans(
    sharded_features, 10, backend='jax', niter=5, nredo=1, seed=0)
np.testing.assert_allclose(parallel.to_host(sharded_centroids), np.asarray(centroids), atol=1e-5)
assert np.mean(parallel.to_host(sharded_im2cluster) == np.asarray(im2cluster)) > 0.99
# So does it padded as a run pads on an accelerator (`clustering.pad_k`): the padded centroids
# are cut off from the global array on every process.
padded_centroids, padded_im2cluster, _ = clustering.kmeans(
    sharded_features, 10, backend='jax', niter=5, nredo=1, seed=0,
    padding=jax_kmeans.Padding(centroids=64, points=features.shape[0]))
assert padded_centroids.shape == (10, features.shape[1])
np.testing.assert_allclose(parallel.to_host(padded_centroids), np.asarray(centroids), atol=1e-5)
assert np.mean(parallel.to_host(padded_im2cluster) == np.asarray(im2cluster)) > 0.99
# The E-step's clustering on the features as the trainer holds them (sharded over every device
# of every process) with each backend: faiss gathers them once, then clusters on the host.
levels = {}
for backend in ('jax', 'faiss', 'auto'):
  for level in clustering.cluster_levels(
      sharded_features, [20, 10], backend=backend, niter=5, nredo=1, seed=0, spherical=True,
      levels='flat', temperature=0.2, use_float16=False, max_points_factor=5 / 3,
      min_points_factor=1 / 3):
    for name in ('centroids', 'im2cluster', 'concentration'):
      levels[f'{backend}_k{level["k"]}_{name}'] = parallel.to_host(level[name])
# data.device_resident split over every device when one copy per device would not fit: the
# gathered batches and the feature pass's batches are the host's rows.
if jax.device_count() > 1:
  images = np.random.default_rng(0).integers(0, 256, (50, 12, 12, 3), dtype=np.uint8)
  resident.device_memory_bytes = lambda device: images.nbytes  # a copy takes over half of it
  placed = resident.place_images(images, trainer.mesh)
  assert placed.sharding == parallel.batch_sharding(trainer.mesh)
  assert placed.shape[0] % jax.device_count() == 0
  order = np.random.default_rng(1).permutation(50)
  batch = resident.make_batch_fn(trainer.mesh, True)(placed, order[:16], 0, 1, 2)
  np.testing.assert_array_equal(parallel.to_host(batch['image']), images[order[:16]])
  eval_rows = np.concatenate([parallel.to_host(b) for b in resident.eval_batches(
      placed, 50, 16, trainer.mesh)])
  np.testing.assert_array_equal(eval_rows[:50], images)
leaves = [parallel.to_host(x) for x in jax.tree_util.tree_leaves(
    (state.params, state.batch_stats, state.key_params, state.queue))]
if parallel.is_main_process():
  np.savez(args.out, *leaves, **levels, features=features, im2cluster=np.asarray(im2cluster),
           metrics=np.array([[r[k] for k in ('loss_inst', 'acc_inst')] for r in records]
                            + [[records[1]['loss_proto'], records[1]['acc_proto']]]))
print('ok', jax.device_count())
