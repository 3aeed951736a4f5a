"""An equivalent PyTorch MoCo/PCL step, the reference the JAX step is timed against.

Same work per step as `pcl_jax.train.train_step` during warm-up: momentum update of the key
encoder, shuffled key forward (train-mode BN), query forward + backward, InfoNCE against a queue,
SGD (momentum, weight decay), enqueue. Eager PyTorch as its users run it: NCHW or channels-last,
optional bf16 autocast (CPU) / AMP (GPU).

`TorchStepProcess` runs it in a process of its own, which is how the benchmarks time it next to
the JAX step (see its docstring for why not in the JAX process).
"""

import multiprocessing
import statistics
import time
import traceback

import torch
from torch import nn
import torchvision


class TorchConv4(nn.Module):
  """Conv4 as pcl_jax.models.Conv4Backbone, with a linear head."""

  def __init__(self, width, dim, image_size):
    super().__init__()
    layers, channels = [], 3
    for _ in range(4):
      layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                 nn.MaxPool2d(2)]
      channels = width
    self.features = nn.Sequential(*layers)
    side = image_size
    for _ in range(4):
      side //= 2
    self.fc = nn.Linear(width * side * side, dim)

  def forward(self, x):
    return self.fc(torch.flatten(self.features(x), 1))


def torch_encoder(arch, width, dim, image_size, small_stem):
  if arch == 'conv4':
    return TorchConv4(width, dim, image_size)
  net = getattr(torchvision.models, arch)(num_classes=dim)
  if small_stem:
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
  return net


def make_torch_step(arch, image_size, batch, width, small_stem, num_negatives, channels_last,
                    bf16, device='cpu'):
  """(one_step, synchronize): the eager PyTorch MoCo step on resident random batches."""
  torch.manual_seed(0)
  if device == 'cuda':
    # As the reference's main_pcl.py: cuDNN times its algorithms once per shape, then reuses the
    # fastest (the warm-up steps pay for it).
    torch.backends.cudnn.benchmark = True
  dim = 128
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  encoder_q = torch_encoder(arch, width, dim, image_size, small_stem).to(
      device, memory_format=memory_format)
  encoder_k = torch_encoder(arch, width, dim, image_size, small_stem).to(
      device, memory_format=memory_format)
  encoder_k.load_state_dict(encoder_q.state_dict())
  for p in encoder_k.parameters():
    p.requires_grad = False
  queue = nn.functional.normalize(torch.randn(num_negatives, dim, device=device), dim=1)
  optimizer = torch.optim.SGD(encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
  im_q = torch.randn(batch, 3, image_size, image_size).to(device, memory_format=memory_format)
  im_k = torch.randn(batch, 3, image_size, image_size).to(device, memory_format=memory_format)
  target = torch.zeros(batch, dtype=torch.long, device=device)
  ptr = 0

  def one_step():
    nonlocal ptr
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      with torch.no_grad():
        for pk, pq in zip(encoder_k.parameters(), encoder_q.parameters()):
          pk.mul_(0.999).add_(pq.detach(), alpha=0.001)
        permutation = torch.randperm(batch, device=device)
        k = nn.functional.normalize(encoder_k(im_k[permutation]).float(), dim=1)
        k = k[torch.argsort(permutation)]
      q = nn.functional.normalize(encoder_q(im_q).float(), dim=1)
      l_pos = (q * k).sum(1, keepdim=True)
      l_neg = q @ queue.t()
      logits = torch.cat([l_pos, l_neg], 1) / 0.2
      loss = nn.functional.cross_entropy(logits, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    queue[ptr:ptr + batch] = k
    ptr = (ptr + batch) % num_negatives

  def synchronize():
    if device == 'cuda':
      torch.cuda.synchronize()

  encoder_q.train()
  encoder_k.train()
  return one_step, synchronize


def torch_step_runner(arch, image_size, batch, width, small_stem, num_negatives, channels_last,
                      bf16, device='cpu', warmup=5):
  """run(steps) -> images/s of the eager PyTorch MoCo step (`device` 'cpu' or 'cuda'), after
  `warmup` untimed steps."""
  one_step, synchronize = make_torch_step(arch, image_size, batch, width, small_stem,
                                          num_negatives, channels_last, bf16, device)

  def run(steps):
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
      one_step()
    synchronize()
    return batch * steps / (time.perf_counter() - start)
  run(warmup)
  return run


class TorchStepProcess:
  """`torch_step_runner(**kwargs)` in a spawned process of its own: call it with a step count
  for images/s, as the runner; `close()` ends the process.

  Why a process: in the JAX process PyTorch already serves the convolutions from XLA's thread
  with one OpenMP team. A PyTorch step on the main thread would add a second team, and libgomp
  then throttles its spin-waiting (more threads than cores), which slowed the JAX step ~10% in
  the same process (`pcl_jax.kernels.host_threads`). A PyTorch user's process has one team; so does
  this one. The two processes take turns: the idle one sleeps in a pipe read.
  """

  def __init__(self, **kwargs):
    context = multiprocessing.get_context('spawn')  # no fork: the parent runs XLA's threads
    self._connection, child_end = context.Pipe()
    self._process = context.Process(target=_serve_steps, args=(child_end, kwargs), daemon=True)
    self._process.start()
    child_end.close()
    self._receive()  # built and warmed up

  def __call__(self, steps: int) -> float:
    self._connection.send(steps)
    return self._receive()

  def _receive(self):
    try:
      kind, value = self._connection.recv()
    except EOFError:
      raise RuntimeError('the PyTorch reference process died (out of memory?)') from None
    if kind == 'error':
      raise RuntimeError(f'the PyTorch reference process failed:\n{value}')
    return value

  def close(self):
    if self._process.is_alive():
      self._connection.send(None)
      self._process.join(timeout=30)
    self._connection.close()

  def __enter__(self):
    return self

  def __exit__(self, *unused_exception):
    self.close()


def _serve_steps(connection, kwargs):
  """The child's loop: build and warm up the runner, then answer each step count with images/s
  until None arrives."""
  from pcl_jax.kernels import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.tune_malloc()  # before torch starts threads, as in the parent
  try:
    run = torch_step_runner(**kwargs)
    connection.send(('ready', None))
    for steps in iter(connection.recv, None):
      connection.send(('rate', run(steps)))
  except Exception:  # pylint: disable=broad-except
    connection.send(('error', traceback.format_exc()))
  finally:
    connection.close()


def torch_step_images_per_s(steps, **kwargs):
  """Images/s of `steps` steps of a fresh `torch_step_runner(**kwargs)`."""
  return torch_step_runner(**kwargs)(steps)


def interleaved_rates(runners, rounds: int, steps: int):
  """([median images/s of each runner], median over rounds of runners[0] / runners[1]) for
  `rounds` alternating rounds of `steps` steps of each `run(steps) -> images/s`.

  On a shared machine whose speed drifts, neighbouring rounds see the same machine, so this
  paired ratio is steadier than two separately timed rates."""
  rates = [[] for _ in runners]
  for _ in range(rounds):
    for rate, run in zip(rates, runners):
      rate.append(run(steps))
  ratios = [a / b for a, b in zip(rates[0], rates[1])]
  return [statistics.median(r) for r in rates], statistics.median(ratios)
