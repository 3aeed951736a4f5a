r"""pcl_jax step for step against the official salesforce/PCL code, on one CPU, under float32.

  python benchmarks/reference_equivalence.py --ref /tmp/pcl_ref [--arch conv4|resnet18|all]
      [--official-dtype auto|float32|float64] [--save-fixture tests/data/reference_equivalence.npz]

DIR (--ref) is an extracted snapshot of github:salesforce/PCL (../shared/reference/README.md);
its `pcl/builder.py` and `main_pcl.py` are imported from there, never copied. The official
`MoCo`, trained by the official `main_pcl.train` loop, with its `adjust_learning_rate`,
`compute_features` and `run_kmeans`, runs beside pcl_jax's `step.train_step`, configured by
`configs/small_images_plain.py` (the reference-compatible settings) shrunk to a tiny run. Both
start from the same weights (the official initialisation, brought into pcl_jax by
`export.torch_names.from_torch`) and the same queue, take the same batches `(im_q, im_k,
index)` and, after each E-step, the same cluster result (the official one).

What one CPU process needs in place of several GPUs, as ../shared/reference/pcl_reference.py:
`.cuda()` is the identity, `concat_all_gather` the identity, `dist.barrier`/`all_reduce` no-ops,
faiss's GPU index a CPU `IndexFlatL2`. Randomness that the two cannot share is handed from
pcl_jax to the official code: the key batch's shuffle permutation (`_batch_shuffle_ddp`) and the
negative prototypes (`pcl.builder.sample`, which checks that each draw is one `random.sample`
could have made: the right number of distinct non-positive prototypes).

The run (`EPOCHS`): a warm-up epoch (InfoNCE only), one level whose every prototype is a column
(k <= B + r), three levels of which the finest samples r negatives (k > B + r), and one level
with unique columns. ProtoNCE runs under `pcl.proto_columns='reference'`: pcl_jax's default
'unique' columns differ by design where two samples of a batch share a prototype (the official
code keeps one column per sample, so the duplicate is a negative equal to the positive); the
last epoch's batches hold no such pair, so there the default columns are compared too.

Each quantity prints as `<arch>/<epoch>/<quantity> max rel diff <x>`, x the largest over the
epoch's steps of max|pcl_jax - official| / max|official| (per tensor, then the largest tensor;
per layer for SGD's momentum buffers; the key encoder's change since the start as one vector).
The exit status is 1 when any x reaches 1e-4. pcl_jax runs in float32; the official code in
float32 for Conv4 and in float64 for ResNet-18 (`OFFICIAL_DTYPE`). docs/fidelity.md has the
figures and what they prove.
`--save-fixture` also writes what the official side computed, for tests/test_reference_
equivalence.py, which replays it against pcl_jax without the official code or torch.
"""

import argparse
import contextlib
import functools
import hashlib
import json
import os
import sys
import types
from typing import Dict, Iterator, List

import numpy as np

if __package__ in (None, ''):  # run as a script: the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

THRESHOLD = 1e-4
ARCHS = ('conv4', 'resnet18')
# The official side's precision. PyTorch's float32 CPU backward of the small-stem ResNet-18 at
# 16 px is itself ~3% from its float64 one in the early layers' gradients (docs/fidelity.md), so
# there the official code runs in float64, the exact computation both approximate; Conv4's
# float32 agree.
OFFICIAL_DTYPE = {'conv4': 'float32', 'resnet18': 'float64'}

# The tiny run both sides train. Larger lr, weight decay and key-encoder step than the published
# ones, so that each term of the update stands well above float32 rounding in the comparison
# (equality holds for any values).
SETTINGS = dict(num_images=48, stored_size=20, image_size=16, batch=8, num_negatives=16, dim=16,
                conv4_width=4, temperature=0.2, moco_m=0.5, lr=0.05, weight_decay=1e-2,
                epochs=4, steps_per_epoch=2, seed=0)
# (name, the levels' cluster counts or None for warm-up, pcl.proto_columns). The finest level of
# the third epoch has k = 40 > B + r = 24: it samples r negatives.
EPOCHS = (('warm-up', None, 'reference'),
          ('one-level', (12,), 'reference'),
          ('three-levels-sampled', (40, 12, 6), 'reference'),
          ('unique-columns', (12,), 'unique'))
# The cluster counts the pcl_jax config's schedule lists; its prototype bank has a slot for each
# level and for the largest k, so one step program serves every epoch.
ALL_CLUSTERS = (40, 12, 6)
METRICS = ('loss_inst', 'acc_inst', 'loss_proto', 'acc_proto', 'lr')
STATE_PARTS = ('query_params', 'query_momentum', 'query_bn_stats', 'key_params', 'key_bn_stats',
               'queue', 'queue_ptr')


# ----------------------------------------------------------------------------------------------
# The inputs: images, batches and views, pure numpy functions of the settings.


def make_images(settings=SETTINGS) -> np.ndarray:
  """The data set: uint8 [N, S, S, 3] images, smooth patterns plus noise (so the network's
  features vary), stored larger than the crop so the eval transform resizes."""
  rng = np.random.default_rng(settings['seed'])
  n, side = settings['num_images'], settings['stored_size']
  grid = np.linspace(0, 1, side)
  y, x = np.meshgrid(grid, grid, indexing='ij')
  freq = rng.uniform(0.5, 3.0, (n, 3, 2))
  phase = rng.uniform(0, 2 * np.pi, (n, 3))
  waves = np.sin(2 * np.pi * (freq[..., 0, None, None] * x + freq[..., 1, None, None] * y)
                 + phase[..., None, None])
  images = 127.5 + 100 * waves.transpose(0, 2, 3, 1) + rng.normal(0, 12, (n, side, side, 3))
  return np.clip(np.round(images), 0, 255).astype(np.uint8)


def epoch_batches(epoch: int, im2cluster, settings=SETTINGS) -> List[dict]:
  """The epoch's batches: 'index' [B] and each view's crop (top, left) and horizontal flip.

  With `im2cluster` (the last epoch, unique columns) the B samples of a batch are in B different
  clusters, so no two share a prototype and the default columns equal the official ones.
  """
  rng = np.random.default_rng([settings['seed'], epoch])
  n, batch = settings['num_images'], settings['batch']
  margin = settings['stored_size'] - settings['image_size']
  batches = []
  for _ in range(settings['steps_per_epoch']):
    if im2cluster is None:
      index = rng.choice(n, batch, replace=False)
    else:
      clusters = rng.permutation(np.unique(im2cluster))[:batch]
      index = np.array([rng.choice(np.flatnonzero(im2cluster == c)) for c in clusters])
    batches.append({'index': index.astype(np.int64),
                    'crop': rng.integers(0, margin + 1, (2, batch, 2)),
                    'flip': rng.integers(0, 2, (2, batch)).astype(bool)})
  return batches


def views(images: np.ndarray, batch: dict, settings=SETTINGS):
  """(im_q, im_k): uint8 [B, s, s, 3] crops of the batch's images, flipped where drawn."""
  size = settings['image_size']
  out = []
  for view in range(2):
    crops = []
    for i, sample in enumerate(batch['index']):
      top, left = batch['crop'][view, i]
      crop = images[sample, top:top + size, left:left + size]
      crops.append(crop[:, ::-1] if batch['flip'][view, i] else crop)
    out.append(np.ascontiguousarray(np.stack(crops)))
  return out[0], out[1]


# ----------------------------------------------------------------------------------------------
# pcl_jax's side.


def pcl_jax_config(arch: str, settings=SETTINGS):
  """configs/small_images_plain.py (PCL as published, set like the reference) shrunk to the
  tiny run, with ProtoNCE's columns as the official code's; validated."""
  from configs import small_images_plain
  from pcl_jax import configuration
  config = small_images_plain.get_config()
  config.seed = settings['seed']
  config.data.name = 'fake'  # the images are the comparison's own (`make_images`)
  config.data.image_size = settings['image_size']
  config.data.eval_resize = 'whole'  # the reference's Resize(size) + CenterCrop(size)
  config.model.arch = arch
  config.model.small_stem = arch != 'conv4'
  config.model.width = settings['conv4_width'] if arch == 'conv4' else 64
  config.model.dim = settings['dim']
  config.train.epochs = settings['epochs']
  config.train.batch_size = settings['batch']
  config.optim.lr = settings['lr']
  config.optim.weight_decay = settings['weight_decay']
  config.pcl.num_negatives = settings['num_negatives']
  config.pcl.moco_m = settings['moco_m']
  config.pcl.temperature = settings['temperature']
  config.pcl.warmup_epochs = 1
  config.pcl.proto_columns = 'reference'
  config.schedule.all_clusters = ','.join(str(k) for k in ALL_CLUSTERS)
  config.runtime.conv_impl = 'xla'
  configuration.validate(config)
  return config


class PclJax:
  """pcl_jax's training state and step for the comparison, started from official weights.

  Everything runs jitted (the step, the draws, the bank, the feature pass, the concentration):
  a few programs rather than a compilation per eager op keep tests/test_reference_equivalence.py
  short.
  """

  def __init__(self, arch: str, query_state: Dict[str, np.ndarray], queue: np.ndarray,
               settings=SETTINGS):
    import jax
    import jax.numpy as jnp
    from pcl_jax import clustering
    from pcl_jax import features
    from pcl_jax import models
    from pcl_jax import state as state_lib
    from pcl_jax import step as step_lib
    from pcl_jax.clustering import bank as bank_lib
    from pcl_jax.data import device_transforms
    from pcl_jax.export import torch_names
    from pcl_jax.run import parallel
    self.arch, self.settings = arch, settings
    self.config = config = pcl_jax_config(arch, settings)
    self.model = models.encoder_from_config(config, bn_groups=config.train.shuffle_bn_groups)
    lr_schedule = state_lib.make_lr_schedule(config.optim, config.train.epochs,
                                             settings['steps_per_epoch'])
    tx = state_lib.make_optimizer(config.optim, lr_schedule)
    variables = torch_names.from_torch(query_state, arch, config.model.mlp,
                                       config.data.image_size)
    # Own device buffers for each encoder (the step donates the state). MoCo copies f_q's
    # parameters into f_k; the BN statistics start at their defaults on both.
    on_device = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)
    params = on_device(variables['params'])
    mesh = parallel.data_mesh()
    # Placed as the step returns it (replicated), so its first call's program serves the rest.
    self.state = jax.device_put(state_lib.PCLState(
        step=jnp.asarray(np.int32(0)), params=params,
        batch_stats=on_device(variables['batch_stats']),
        key_params=on_device(variables['params']),
        key_batch_stats=on_device(variables['batch_stats']),
        opt_state=jax.jit(tx.init)(params), queue=jnp.asarray(queue.T),
        queue_ptr=jnp.asarray(np.int32(0)),
        queue_index=jnp.asarray(np.full(len(queue.T), -1, np.int32)),
        rng=jax.random.PRNGKey(config.seed)), parallel.replicated(mesh))
    self._steps = {}
    self._hparams = step_lib.step_hparams(0.0, config.train.epochs, settings['steps_per_epoch'])
    for columns in ('reference', 'unique'):  # compiled at a first call
      column_config = config.copy_and_resolve_references()
      column_config.pcl.proto_columns = columns
      self._steps[columns] = step_lib.make_train_step(column_config, self.model)
    self._draws = jax.jit(functools.partial(_draws, num_negatives=config.pcl.num_negatives))
    self._eval_transform = device_transforms.jitted_eval_transform(
        config.data.image_size, config.data.eval_resize, mesh)
    self._embed = features.make_embed_fn(self.model, mesh=mesh)
    self._bank = jax.jit(bank_lib.prototype_bank, static_argnums=(1, 2))
    self._empty_bank = jax.jit(bank_lib.empty_prototype_bank, static_argnums=(0, 1, 2, 3))
    self._concentration = jax.jit(clustering.concentration, static_argnums=(2,))

  def draws(self, index: np.ndarray, bank: dict):
    """What this step of pcl_jax will draw (`_draws`): the key batch's permutation and, per
    active level, the negative prototypes; the official side is handed these."""
    permutation, columns, column_valid = self._draws(self.state, bank,
                                                     np.asarray(index, np.int32))
    batch = len(index)
    negatives = [np.asarray(columns[level, batch:])[np.asarray(column_valid[level, batch:])]
                 for level in np.flatnonzero(np.asarray(bank['active']))]
    return np.asarray(permutation), negatives

  def step(self, im_q, im_k, index, bank, columns: str) -> dict:
    """One `step.train_step` (jitted once per column choice); returns its metrics."""
    import jax.numpy as jnp
    batch = {'im_q': jnp.asarray(im_q), 'im_k': jnp.asarray(im_k),
             'index': jnp.asarray(np.asarray(index, np.int32))}
    self.state, metrics = self._steps[columns](self.state, batch, bank, self._hparams)
    return {name: float(metrics[name]) for name in METRICS}

  def snapshot(self) -> dict:
    """The state in the official layout: torch state dicts, the queue [dim, r], the pointer."""
    return state_parts(self.state, self.arch, self.config)

  def eval_features(self, images: np.ndarray) -> np.ndarray:
    """The E-step's feature pass: the eval transform on the device, then the key encoder in eval
    mode (`features.make_embed_fn`), in index order."""
    variables = {'params': self.state.key_params, 'batch_stats': self.state.key_batch_stats}
    return np.asarray(self._embed(variables, self._eval_transform(images)))

  def bank(self, levels: List[dict]) -> dict:
    """The prototype bank of the official cluster result (`clustering.bank`), padded to the
    run's level slots (`ALL_CLUSTERS`)."""
    num_levels, max_k = len(ALL_CLUSTERS), max(ALL_CLUSTERS)
    if not levels:
      return self._empty_bank(num_levels, max_k, self.settings['dim'],
                              self.settings['num_images'])
    return self._bank([{'centroids': level['centroids'], 'im2cluster': level['im2cluster'],
                        'concentration': level['density']} for level in levels],
                      num_levels, max_k)

  def concentration(self, levels: List[dict]) -> List[np.ndarray]:
    """pcl_jax's concentration (`clustering.concentration`) of each official level, from the
    official squared distances and assignments."""
    return [np.asarray(self._concentration(level['sq_dist'], level['im2cluster'],
                                           len(level['density']), self.settings['temperature']))
            for level in levels]


def _draws(state, bank, index, *, num_negatives):
  """The step's draws, derived as `step.train_step` and `losses.mean_proto_nce` derive them:
  the shuffle-BN permutation, and each level slot's ProtoNCE columns under
  `losses.reference_prototype_columns` ([levels, B + r] columns and their validity)."""
  import jax
  from pcl_jax import losses
  from pcl_jax import step as step_lib
  shuffle_rng, proto_rng = step_lib.step_rngs(state)
  permutation = jax.random.permutation(shuffle_rng, index.shape[0])
  level_rngs = jax.random.split(proto_rng, bank['active'].shape[0])
  columns = jax.vmap(functools.partial(losses.reference_prototype_columns,
                                       num_negatives=num_negatives))
  selection, column_valid, _ = columns(bank['im2cluster'][:, index].astype('int32'),
                                       bank['valid'], level_rngs)
  return permutation, selection, column_valid


def state_parts(state, arch: str, config) -> dict:
  """A PCLState's encoders as torch state dicts (split into parameters and BN statistics), its
  queue transposed to the official [dim, r], its pointer."""
  import optax
  from pcl_jax.export import torch_names
  parts = {}
  for side, params, stats in (('query', state.params, state.batch_stats),
                              ('key', state.key_params, state.key_batch_stats)):
    tensors = torch_names.to_torch({'params': params, 'batch_stats': stats}, arch,
                                   config.model.mlp, config.data.image_size)
    parts.update(split_state_dict(tensors, side))
  # SGD's momentum buffers (the decayed gradients' running sum) in the same names.
  trace = optax.tree_utils.tree_get(state.opt_state, 'trace')
  tensors = torch_names.to_torch({'params': trace, 'batch_stats': state.batch_stats}, arch,
                                 config.model.mlp, config.data.image_size)
  parts['query_momentum'] = split_state_dict(tensors, 'query')['query_params']
  parts['queue'] = {'queue': np.asarray(state.queue).T}
  parts['queue_ptr'] = {'queue_ptr': np.asarray(state.queue_ptr, np.float64)}
  return parts


def split_state_dict(tensors: Dict[str, np.ndarray], side: str) -> dict:
  """{'<side>_params': weights and biases, '<side>_bn_stats': running means and variances};
  num_batches_tracked is dropped (pcl_jax's momentum BN never reads it)."""
  params, stats = {}, {}
  for name, value in tensors.items():
    if name.endswith('num_batches_tracked'):
      continue
    target = stats if name.endswith(('running_mean', 'running_var')) else params
    target[name] = np.asarray(value, np.float32)
  return {f'{side}_params': params, f'{side}_bn_stats': stats}


# ----------------------------------------------------------------------------------------------
# The official side.


@contextlib.contextmanager
def _quiet():
  """Silences the C++ and Python prints of the official E-step (faiss's verbose k-means)."""
  sys.stdout.flush()
  saved = os.dup(1), os.dup(2)
  with open(os.devnull, 'w') as devnull:
    os.dup2(devnull.fileno(), 1)
    os.dup2(devnull.fileno(), 2)
    try:
      yield
    finally:
      sys.stdout.flush()
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      os.close(saved[0])
      os.close(saved[1])


class _SizedLoader:
  """An iterable with a length, as `main_pcl.train` takes a DataLoader."""

  def __init__(self, batches: Iterator, length: int):
    self.batches, self.length = batches, length

  def __iter__(self):
    return iter(self.batches)

  def __len__(self):
    return self.length


class OfficialCode:
  """The official MoCo and loop (imported from `ref`), adapted to one CPU process only where it
  needs several GPUs. Its initial weights and queue come from torch's seeded initialisation."""

  def __init__(self, ref: str, arch: str, dtype: str = 'float32', settings=SETTINGS):
    import torch
    from torch import nn
    import torchvision
    from pcl_jax.export import torch_models
    if not os.path.isfile(os.path.join(ref, 'pcl', 'builder.py')):
      raise SystemExit(f'error: --ref={ref} holds no pcl/builder.py; extract a snapshot of '
                       'github:salesforce/PCL there (../shared/reference/README.md)')
    sys.path.insert(0, ref)
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    import faiss
    import main_pcl
    import pcl.builder
    self.torch, self.settings, self.arch = torch, settings, arch
    pcl.builder.concat_all_gather = lambda tensor: tensor
    pcl.builder.sample = self._sample
    pcl.builder.MoCo._batch_shuffle_ddp = OfficialCode._shuffle
    pcl.builder.MoCo._batch_unshuffle_ddp = lambda model, x, unshuffle: x[unshuffle]
    self._indexes = []
    main_pcl.faiss = types.SimpleNamespace(
        Clustering=faiss.Clustering, vector_to_array=faiss.vector_to_array,
        StandardGpuResources=lambda: None, GpuIndexFlatConfig=types.SimpleNamespace,
        GpuIndexFlatL2=self._cpu_index)
    main_pcl.dist = types.SimpleNamespace(barrier=lambda: None,
                                          all_reduce=lambda tensor, op=None: None,
                                          ReduceOp=types.SimpleNamespace(SUM=None))
    main_pcl.tqdm = lambda loader: loader
    main_pcl.print = lambda *args, **kwargs: None
    main_pcl.accuracy = self._recording(main_pcl.accuracy, 'accuracy')
    self.main = main_pcl
    # The official code makes its tensors in the default dtype (MoCo's queue, compute_features'
    # buffer, run_kmeans' results).
    self.dtype = getattr(torch, dtype)
    torch.set_default_dtype(self.dtype)
    torch.manual_seed(settings['seed'])
    size = settings['image_size']
    if arch == 'conv4':
      side = size // 16
      encoder = lambda num_classes: torch_models.Conv4(settings['conv4_width'], num_classes,
                                                       False, side)
    else:
      def encoder(num_classes):
        model = torchvision.models.resnet18(num_classes=num_classes)
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return model
    self.model = pcl.builder.MoCo(encoder, settings['dim'], settings['num_negatives'],
                                  settings['moco_m'], settings['temperature'], mlp=True)
    self.optimizer = torch.optim.SGD(self.model.parameters(), settings['lr'], momentum=0.9,
                                     weight_decay=settings['weight_decay'])
    self.args = argparse.Namespace(
        lr=settings['lr'], cos=True, schedule=[], epochs=settings['epochs'], gpu=None,
        print_freq=10**9, temperature=settings['temperature'], low_dim=settings['dim'],
        num_cluster=[])
    self.criterion = self._recording(nn.CrossEntropyLoss(), 'criterion')
    self._records = {'criterion': [], 'accuracy': [], 'topk_differs': 0}
    self.negatives = []
    norm = torchvision.transforms.Normalize(mean=[0.485, 0.456, 0.406],
                                            std=[0.229, 0.224, 0.225])
    self._to_tensor = torchvision.transforms.Compose([torchvision.transforms.ToTensor(), norm])
    # pcl_reference.py's eval transform (main_pcl's Resize(256) + CenterCrop(224), scaled).
    self._eval = torchvision.transforms.Compose([torchvision.transforms.Resize(size),
                                                 torchvision.transforms.CenterCrop(size),
                                                 self._to_tensor])

  # The adaptations ------------------------------------------------------------------------------

  @staticmethod
  def _shuffle(model, x):
    """`_batch_shuffle_ddp` on one process, with pcl_jax's permutation (`model.permutation`)."""
    import torch
    permutation = torch.tensor(model.permutation, dtype=torch.long)
    return x[permutation], torch.argsort(permutation)

  def _sample(self, population, count):
    """`random.sample(neg_proto_id, r)` as this step of pcl_jax draws it; min(r, n) as
    pcl_reference.py (the official code fails with fewer than r non-positive prototypes)."""
    draw = [int(c) for c in self.negatives.pop(0)]
    if len(set(draw)) != len(draw) or not set(draw) <= set(population) or \
        len(draw) != min(count, len(population)):
      raise AssertionError(f'pcl_jax drew negatives {draw} that random.sample({count}) of '
                           f'{sorted(population)} cannot give')
    return draw

  def _cpu_index(self, resources, dim, config):
    del resources, config
    import faiss
    self._indexes.append(faiss.IndexFlatL2(dim))
    return self._indexes[-1]

  def _recording(self, function, name):
    """`function`, its values kept as floats when computed (train() adds ProtoNCE into
    InfoNCE's loss tensor in place). accuracy's value is a list of [1] tensors."""
    def recorded(*args, **kwargs):
      out = function(*args, **kwargs)
      if name == 'accuracy':
        logits, target = args
        # torch.topk breaks ties (duplicate columns) in no specified order; torch.argmax, as
        # jnp.argmax, to the first maximal column.
        first = 100.0 * float((logits.argmax(1) == target).float().mean())
        self._records['accuracy'].append(first)
        self._records['topk_differs'] += float(out[0][0]) != first
      else:
        self._records[name].append(float(out.detach()))
      return out
    return recorded

  # The interface the comparison drives --------------------------------------------------------

  def initial(self):
    """(query encoder's state dict, queue [dim, r]) as numpy."""
    return ({name: value.numpy().copy()  # not the live tensors
             for name, value in self.model.encoder_q.state_dict().items()},
            self.model.queue.numpy().astype(np.float32))

  def eval_features(self, images: np.ndarray) -> np.ndarray:
    """The official `compute_features` over the images under the eval transform."""
    from PIL import Image
    dataset = [(self._eval(Image.fromarray(image)).to(self.dtype), i)
               for i, image in enumerate(images)]
    loader = self.torch.utils.data.DataLoader(dataset, batch_size=self.settings['batch'] * 5,
                                              shuffle=False)
    features = self.main.compute_features(loader, self.model, self.args)
    self.model.train()
    return features.numpy()

  def cluster(self, features: np.ndarray, ks) -> List[dict]:
    """The official `run_kmeans`, and each level's squared distances as it searched them."""
    self.args.num_cluster = [str(k) for k in ks]
    self._indexes = []
    features = features.astype(np.float32)  # what faiss takes
    with _quiet():
      result = self.main.run_kmeans(features, self.args)
    levels = []
    for level, index in enumerate(self._indexes):
      sq_dist, assigned = index.search(features, 1)
      im2cluster = result['im2cluster'][level].numpy()
      assert np.array_equal(assigned[:, 0], im2cluster)
      levels.append({'im2cluster': im2cluster, 'centroids': result['centroids'][level].numpy(),
                     'density': result['density'][level].numpy(), 'sq_dist': sq_dist[:, 0]})
    return levels

  def train_epoch(self, epoch: int, steps: Iterator, num_steps: int,
                  levels: List[dict]) -> List[dict]:
    """The official `main_pcl.train` for one epoch over `steps`, which yields per step
    (permutation, negatives, im_q, im_k, index) and runs pcl_jax's step before yielding.
    Returns each step's metrics and state."""
    torch = self.torch
    self.main.adjust_learning_rate(self.optimizer, epoch, self.args)
    cluster_result = None
    if levels:
      cluster_result = {
          'im2cluster': [torch.as_tensor(level['im2cluster']) for level in levels],
          'centroids': [torch.as_tensor(level['centroids'], dtype=self.dtype) for level in levels],
          'density': [torch.as_tensor(level['density'], dtype=self.dtype) for level in levels]}
    records = []

    def loader():
      for permutation, negatives, im_q, im_k, index in steps:
        self.model.permutation, self.negatives = permutation, list(negatives)
        self._records = {'criterion': [], 'accuracy': [], 'topk_differs': 0}
        yield ([torch.stack([self._to_tensor(image) for image in im_q]).to(self.dtype),
                torch.stack([self._to_tensor(image) for image in im_k]).to(self.dtype)],
               torch.as_tensor(index))
        records.append(self._step_record(len(levels)))

    self.main.train(_SizedLoader(loader(), num_steps), self.model, self.criterion,
                    self.optimizer, epoch, self.args, cluster_result)
    return records

  def _step_record(self, num_levels: int) -> dict:
    """The step's metrics, as `main_pcl.train` computed them, and the state after it."""
    losses, accuracies = self._records['criterion'], self._records['accuracy']
    # train() calls: InfoNCE's criterion, then per level its criterion and accuracy, then
    # InfoNCE's accuracy; loss_proto is the levels' sum over their number.
    record = {'loss_inst': losses[0], 'acc_inst': accuracies[-1],
              'loss_proto': float(np.mean(losses[1:])) if num_levels else 0.0,
              'acc_proto': float(np.mean(accuracies[:-1])) if num_levels else 0.0,
              'lr': float(self.optimizer.param_groups[0]['lr']),
              'topk_differs': self._records['topk_differs']}
    model = self.model
    for side, encoder in (('query', model.encoder_q), ('key', model.encoder_k)):
      record.update(split_state_dict({name: value.numpy().copy()  # not the live tensors
                                      for name, value in encoder.state_dict().items()}, side))
    buffers = {name: self.optimizer.state[param]['momentum_buffer'].numpy().copy()
               for name, param in model.encoder_q.named_parameters()}
    record['query_momentum'] = buffers
    record['queue'] = {'queue': model.queue.numpy().copy()}
    record['queue_ptr'] = {'queue_ptr': np.float64(model.queue_ptr[0])}
    return record


# ----------------------------------------------------------------------------------------------
# The comparison.


def rel_diff(ours, official) -> float:
  """max|ours - official| / max|official| (the absolute difference when official is all 0)."""
  ours, official = np.asarray(ours, np.float64), np.asarray(official, np.float64)
  if ours.shape != official.shape:
    return float('inf')
  scale = np.max(np.abs(official)) if official.size else 0.0
  diff = np.max(np.abs(ours - official)) if official.size else 0.0
  return float(diff / scale if scale > 0 else diff)


def tree_rel_diff(ours: dict, official: dict, per_layer: bool = False) -> float:
  """The largest `rel_diff` over the tensors of two torch-named name -> array dicts, or over
  their layers (a layer's weight and bias as one array); inf on a name one side lacks."""
  if set(ours) != set(official):
    return float('inf')
  group = (lambda name: name.rsplit('.', 1)[0]) if per_layer else (lambda name: name)
  groups = {}
  for name in sorted(official):
    groups.setdefault(group(name), []).append(name)
  flat = lambda tree, names: np.concatenate([np.ravel(tree[name]) for name in names])
  return max(rel_diff(flat(ours, names), flat(official, names)) for names in groups.values())


def compare(official, arch: str, settings=SETTINGS):
  """Runs pcl_jax beside `official` (`OfficialCode`, or a recording of it) over `EPOCHS`.

  Returns:
    ({'<arch>/<epoch>/<quantity>': max rel diff}, notes: lines that say what was not compared).
  """
  images = make_images(settings)
  query_state, queue = official.initial()
  ours = PclJax(arch, query_state, queue, settings)
  results = {}

  def record(epoch_name, quantity, value):
    key = f'{arch}/{epoch_name}/{quantity}'
    results[key] = max(results.get(key, 0.0), value)

  levels, topk_ties, global_step = [], 0, 0
  ours_start = ours.snapshot()['key_params']
  official_start = split_state_dict(query_state, 'key')['key_params']  # f_k starts as f_q
  for epoch, (name, ks, columns) in enumerate(EPOCHS):
    if ks:  # the E-step: both feature passes; the official k-means for both sides
      official_features = official.eval_features(images)
      record(name, 'features', rel_diff(ours.eval_features(images), official_features))
      levels = official.cluster(official_features, ks)
      for level, phi in zip(levels, ours.concentration(levels)):
        record(name, 'concentration', rel_diff(phi, level['density']))
    bank = ours.bank(levels)
    batches = epoch_batches(epoch, levels[0]['im2cluster'] if columns == 'unique' else None,
                            settings)
    ours_records = []

    def steps():
      for batch in batches:
        im_q, im_k = views(images, batch, settings)
        permutation, negatives = ours.draws(batch['index'], bank)
        metrics = ours.step(im_q, im_k, batch['index'], bank, columns)
        ours_records.append(dict(metrics, **ours.snapshot()))
        yield permutation, negatives, im_q, im_k, batch['index']

    official_records = official.train_epoch(epoch, steps(), len(batches), levels)
    if len(official_records) != len(batches):
      raise RuntimeError(f'the official loop ran {len(official_records)} of {len(batches)} steps')
    for mine, theirs in zip(ours_records, official_records):
      for metric in METRICS:
        if ks or not metric.endswith('_proto'):
          record(name, metric, rel_diff(mine[metric], theirs[metric]))
      for part in STATE_PARTS:
        # The momentum buffers per layer: a Conv4 conv bias's gradient is 0 in exact arithmetic
        # (BN subtracts the batch mean), so its buffer is weight decay plus float32 noise.
        record(name, part, tree_rel_diff(mine[part], theirs[part],
                                         per_layer=part == 'query_momentum'))
      # The key encoder's change since the start, at its own scale (its parameters' would hide
      # it), over the whole encoder; none after the first step, where f_k = f_q.
      if global_step:
        record(name, 'key_update', rel_diff(_change(mine['key_params'], ours_start),
                                            _change(theirs['key_params'], official_start)))
      global_step += 1
      topk_ties += int(theirs.get('topk_differs', 0))
  notes = [f'{arch}: acc_* count a tie (a duplicate column) as the first maximal column on both '
           f'sides (torch.argmax, jnp.argmax); the official torch.topk broke {topk_ties} '
           'accuracies otherwise (its order is unspecified).']
  return results, notes


def _change(after: dict, before: dict) -> np.ndarray:
  """after - before of two name -> array dicts, as one vector."""
  return np.concatenate([(np.asarray(after[name], np.float64) - before[name]).ravel()
                         for name in sorted(before)])


def report(results: Dict[str, float], notes: List[str]) -> bool:
  """Prints one line per quantity, then the notes; True when every difference is below
  THRESHOLD."""
  print("ProtoNCE compared under pcl.proto_columns='reference' (the official columns, one per "
        "sample): pcl_jax's default 'unique' columns differ by design where two samples share a "
        "prototype; the unique-columns epoch's batches share none, so it compares the default.")
  ok = True
  for quantity, value in results.items():
    flag = '' if value < THRESHOLD else f'   <-- reaches {THRESHOLD:g}'
    ok = ok and value < THRESHOLD
    print(f'{quantity} max rel diff {value:.3g}{flag}')
  for note in notes:
    print(note)
  return ok


# ----------------------------------------------------------------------------------------------
# The fixture: the official side recorded, and replayed without the official code.


class Recorder:
  """Wraps `OfficialCode`, keeping everything it hands the comparison (for `--save-fixture`)."""

  def __init__(self, official):
    self.official, self.calls = official, []

  def __getattr__(self, method):
    target = getattr(self.official, method)

    def recorded(*args):
      out = target(*args)
      self.calls.append((method, out))
      return out
    return recorded


def _flatten(prefix: str, value, out: dict):
  if isinstance(value, dict):
    for name, item in value.items():
      _flatten(f'{prefix}/{name}', item, out)
  elif isinstance(value, (list, tuple)):
    out[f'{prefix}/#len'] = np.asarray(len(value))
    for i, item in enumerate(value):
      _flatten(f'{prefix}/{i}', item, out)
  else:
    out[prefix] = np.asarray(value)


def _unflatten(arrays: dict, prefix: str):
  if f'{prefix}/#len' in arrays:
    return [_unflatten(arrays, f'{prefix}/{i}') for i in range(int(arrays[f'{prefix}/#len']))]
  if prefix in arrays:
    return arrays[prefix]
  names = {key[len(prefix) + 1:].split('/')[0] for key in arrays if key.startswith(prefix + '/')}
  return {name: _unflatten(arrays, f'{prefix}/{name}') for name in names}


def inputs_digest(settings=SETTINGS) -> str:
  """sha256 of the images and of the batches drawn without a cluster result: what the fixture
  assumes numpy's generators still give."""
  digest = hashlib.sha256(make_images(settings).tobytes())
  for epoch in range(len(EPOCHS)):
    for batch in epoch_batches(epoch, None, settings):
      for name in sorted(batch):
        digest.update(np.ascontiguousarray(batch[name]).tobytes())
  return digest.hexdigest()


def save_fixture(path: str, recordings: Dict[str, Recorder], command: str):
  """Writes each architecture's recorded official calls (name and output, in order): one array
  per dtype, all values concatenated, and a JSON index of names, shapes and offsets (a zip entry
  per tensor would cost more than the tensors)."""
  arrays, index = {}, {'command': command, 'inputs_sha256': inputs_digest(), 'entries': []}
  for arch, recorder in recordings.items():
    index[f'{arch}/#calls'] = [method for method, _ in recorder.calls]
    for i, (_, out) in enumerate(recorder.calls):
      _flatten(f'{arch}/{i}', out, arrays)
  blobs = {}
  for name, value in arrays.items():
    parts = blobs.setdefault(value.dtype.str, [])
    offset = sum(part.size for part in parts)
    index['entries'].append([name, value.dtype.str, list(value.shape), offset])
    parts.append(value.ravel())
  np.savez_compressed(path, index=np.asarray(json.dumps(index)),
                      **{f'blob{dtype}': np.concatenate(parts) for dtype, parts in blobs.items()})


def load_fixture(path: str):
  """(index, name -> array) of a `save_fixture` file."""
  with np.load(path) as data:
    index = json.loads(str(data['index']))
    blobs = {key[len('blob'):]: data[key] for key in data.files if key.startswith('blob')}
  arrays = {}
  for name, dtype, shape, offset in index['entries']:
    size = int(np.prod(shape))
    arrays[name] = blobs[dtype][offset:offset + size].reshape(shape)
  return index, arrays


class RecordedOfficial:
  """The official side replayed from a fixture: the same answers, in the same order; each call
  checks it is the one the recording made next."""

  def __init__(self, path: str, arch: str):
    index, arrays = load_fixture(path)
    self.command, self.inputs_sha256 = index['command'], index['inputs_sha256']
    self.methods = list(index[f'{arch}/#calls'])
    self.answers = [_unflatten(arrays, f'{arch}/{i}') for i in range(len(self.methods))]
    for i, method in enumerate(self.methods):
      if method == 'initial':
        self.answers[i] = tuple(self.answers[i])

  def _next(self, method):
    expected = self.methods.pop(0)
    if expected != method:
      raise RuntimeError(f'the comparison called {method}, the recording {expected}')
    return self.answers.pop(0)

  def initial(self):
    return self._next('initial')

  def eval_features(self, images):
    del images
    return self._next('eval_features')

  def cluster(self, features, ks):
    del features, ks
    return self._next('cluster')

  def train_epoch(self, epoch, steps, num_steps, levels):
    del epoch, num_steps, levels
    for _ in steps:  # pcl_jax steps as the official loop pulls the batches
      pass
    return self._next('train_epoch')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--ref', required=True, help='extracted snapshot of salesforce/PCL')
  parser.add_argument('--arch', default='all', choices=ARCHS + ('all',))
  parser.add_argument('--official-dtype', default='auto', choices=('auto', 'float32', 'float64'),
                      help='auto: float32 for Conv4, float64 for ResNet-18 (OFFICIAL_DTYPE)')
  parser.add_argument('--save-fixture', default='', help='write the official side here (.npz)')
  args = parser.parse_args(argv)
  archs = ARCHS if args.arch == 'all' else (args.arch,)
  results, notes, recordings = {}, [], {}
  for arch in archs:
    dtype = OFFICIAL_DTYPE[arch] if args.official_dtype == 'auto' else args.official_dtype
    print(f'{arch}: pcl_jax in float32 against the official code in {dtype}', flush=True)
    official = OfficialCode(args.ref, arch, dtype)
    if args.save_fixture:
      official = recordings[arch] = Recorder(official)
    arch_results, arch_notes = compare(official, arch)
    results.update(arch_results)
    notes += arch_notes
  ok = report(results, notes)
  if args.save_fixture:
    command = 'python benchmarks/reference_equivalence.py ' + ' '.join(
        a if a != args.ref else '<salesforce/PCL snapshot>' for a in (argv or sys.argv[1:]))
    save_fixture(args.save_fixture, recordings, command)
    print(f'wrote {args.save_fixture} ({json.dumps(command)})')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
