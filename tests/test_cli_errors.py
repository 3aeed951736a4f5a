"""Every user mistake through the real CLI: one `error:` line naming the setting, status 2.

Table-driven: each case is a command line (plus the files it needs) and a phrase the message
must contain. All cases run once, from a module fixture, each as `python -m pcl_jax.main ARGS`
runs (cwd = the repository root) in a child of tests/cli_forkserver.py, which imported JAX once
for all of them; each case is then its own test. Most fail at start-up; the checkpoint cases
start from a copy of the shared short training run (`tiny_run`, tests/conftest.py).
`test_verbose_shows_the_traceback` runs a fresh interpreter.
"""

import dataclasses
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Callable, Optional, Tuple

import jax
import numpy as np
from PIL import Image
import pytest

from tests import cli_forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = '--config=configs/test.py'
TIMEOUT_S = 240
# Small real-image datasets: 2 classes x 4 images; settings that fit 8 images.
SMALL_DATA = ('--config.train.batch_size=4', '--config.pcl.num_negatives=8',
              '--config.schedule.all_clusters=4,2', '--config.schedule.num_levels=1')


@dataclasses.dataclass
class Case:
  """A command line that must fail with `expected` in its one error line."""
  name: str
  args: Tuple[str, ...]
  expected: str
  # Builds what the case needs under its own directory; returns extra args (e.g. paths).
  setup: Optional[Callable] = None
  status: int = 2
  workdir: bool = True  # pass --workdir=<case dir>/run unless the args give one
  quiet: bool = True  # nothing on stderr but the error (else progress bars and logs may precede)
  skip: str = ''


def _write_jpeg(path, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, quality=90)


def _folder_data(root, corrupt=False):
  for class_index, class_name in enumerate(('n01', 'n02')):
    os.makedirs(os.path.join(root, 'train', class_name))
    for number in range(4):
      _write_jpeg(os.path.join(root, 'train', class_name, f'{class_name}_{number}.jpg'),
                  seed=10 * class_index + number)
  if corrupt:
    with open(os.path.join(root, 'train', 'n02', 'n02_3.jpg'), 'wb') as handle:
      handle.write(b'this is not a JPEG')


def _csv_data(root):
  os.makedirs(os.path.join(root, 'images'))
  rows = ['filename,label']
  for class_index, class_name in enumerate(('n01', 'n02')):
    for number in range(4):
      name = f'{class_name}{number:08d}.jpg'
      rows.append(f'{name},{class_name}')
      if name != 'n0200000003.jpg':  # listed but absent
        _write_jpeg(os.path.join(root, 'images', name), seed=10 * class_index + number)
  for split in ('train', 'val', 'test'):
    with open(os.path.join(root, f'{split}.csv'), 'w') as handle:
      handle.write('\n'.join(rows) + '\n')


def _config_file(text):
  def setup(case_dir, trained):
    del trained
    path = os.path.join(case_dir, 'my_config.py')
    with open(path, 'w') as handle:
      handle.write(text)
    return (f'--config={path}',)
  return setup


def _data(kind):
  def setup(case_dir, trained):
    del trained
    root = os.path.join(case_dir, 'data')
    if kind == 'csv':
      _csv_data(root)
      return ('--config.data.name=mini_imagenet', f'--config.data.root={root}', *SMALL_DATA)
    _folder_data(root, corrupt=True)
    return ('--config.data.name=image_folder', f'--config.data.root={root}', *SMALL_DATA)
  return setup


def _unlabelled(kind):
  """A folder of image files without class folders: `empty`, `undecodable` (3 files, none an
  image), `small` (3 images: fewer than a batch of 4), `mixed` (loose images beside a folder)
  or `ok` (8 images, for the settings that refuse unlabelled images)."""
  def setup(case_dir, trained):
    del trained
    root = os.path.join(case_dir, 'photos')
    os.makedirs(root)
    count = {'empty': 0, 'undecodable': 3, 'small': 3, 'mixed': 3, 'ok': 8}[kind]
    for number in range(count):
      path = os.path.join(root, f'photo_{number}.jpg')
      if kind == 'undecodable':
        with open(path, 'wb') as handle:
          handle.write(b'this is not a JPEG')
      else:
        _write_jpeg(path, seed=number)
    if kind == 'mixed':
      os.makedirs(os.path.join(root, '2026-12-01'))
    return ('--config.data.name=image_folder', f'--config.data.root={root}', *SMALL_DATA)
  return setup


def _copy_trained(extra=(), damage=False, results=False):
  """The shared trained run (`tiny_run`), copied (training reruns take the workdir's lock)."""
  def setup(case_dir, trained):
    workdir = os.path.join(case_dir, 'run')
    shutil.copytree(trained, workdir)
    if damage:  # the newest checkpoint loses its array data
      state_dir = os.path.join(workdir, 'checkpoints', '1', 'state')
      for name in os.listdir(state_dir):
        if name not in ('_METADATA', 'commit_success.txt'):
          path = os.path.join(state_dir, name)
          shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if results:
      os.makedirs(os.path.join(workdir, 'eval'))
      with open(os.path.join(workdir, 'eval', 'results.json'), 'w') as handle:
        handle.write('{}')
    return (f'--workdir={workdir}', *extra)
  return setup


def _workdir_is_file(case_dir, trained):
  del trained
  path = os.path.join(case_dir, 'not_a_dir')
  with open(path, 'w') as handle:
    handle.write('x')
  return (f'--workdir={path}',)


NOT_WRITABLE = '/sys/pcl_jax_cli_test'
_LOCKS = []


def _workdir_in_use(case_dir, trained):
  del trained
  workdir = os.path.join(case_dir, 'busy')
  os.makedirs(workdir)
  fd = os.open(os.path.join(workdir, '.lock'), os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running trainer holds it
  os.write(fd, str(os.getpid()).encode())
  _LOCKS.append(fd)
  return (f'--workdir={workdir}',)


def _not_writable_skip():
  try:
    os.makedirs(NOT_WRITABLE)
  except OSError:
    return ''
  os.rmdir(NOT_WRITABLE)
  return f'{NOT_WRITABLE} is writable here'


CASES = [
    # --- Command line and config file.
    Case('unknown_field', ('--config.optim.lrr=0.1',), "no field 'lrr' (did you mean --config.optim.lr?)"),
    Case('unknown_section', ('--config.optimizer.lr=0.1',), "no field 'optimizer'"),
    Case('moved_field', ('--config.model.conv_impl=xla',),
         "no field 'conv_impl' (it is now --config.runtime.conv_impl)"),
    Case('wrong_type_float', ('--config.optim.lr=abc',), '--config.optim.lr=abc'),
    Case('wrong_type_int', ('--config.train.batch_size=3.5',), '--config.train.batch_size=3.5'),
    Case('wrong_type_bool', ('--config.clustering.spherical=maybe',), 'not a boolean'),
    Case('negative_xla_threads', ('--config.runtime.xla_cpu_threads=-1',),
         'runtime.xla_cpu_threads=-1 must be a whole number >= 0'),
    Case('unknown_flag', ('--workdirr=/tmp/x',), "Unknown command line flag 'workdirr'"),
    Case('unknown_mode', ('--mode=predict',), '--mode=predict'),
    Case('positional_argument', ('train',), 'unexpected arguments'),
    Case('missing_workdir', (), '--workdir are required', workdir=False),
    Case('missing_config_file', ('--config=configs/no_such_config.py',), 'no such file'),
    Case('config_is_directory', ('--config=configs',), 'is a directory'),
    Case('config_without_get_config', (), 'defines no get_config()',
         setup=_config_file('SEED = 0\n')),
    Case('config_returns_none', (), 'get_config() returned None',
         setup=_config_file('def get_config():\n  pass\n')),
    Case('config_syntax_error', (), 'SyntaxError',
         setup=_config_file('def get_config(:\n  pass\n')),
    Case('config_raises', (), 'ModuleNotFoundError',
         setup=_config_file('import no_such_module\ndef get_config():\n  pass\n')),
    Case('config_missing_field', (), 'no field eval.knn_k',
         setup=_config_file('from configs import test\n\ndef get_config():\n'
                            '  config = test.get_config().to_dict()\n'
                            '  del config["eval"]["knn_k"]\n'
                            '  import ml_collections\n'
                            '  return ml_collections.ConfigDict(config)\n')),
    Case('config_misspelled_field', (), 'unknown field optim.learning_rate',
         setup=_config_file('from configs import test\n\ndef get_config():\n'
                            '  config = test.get_config()\n'
                            '  config.optim.learning_rate = 0.1\n  return config\n')),
    Case('config_wrong_type', (), "optim.lr='fast' is a str, expected a float",
         setup=_config_file('import ml_collections\nfrom configs import test\n\n'
                            'def get_config():\n'
                            '  config = test.get_config().to_dict()\n'
                            '  config["optim"]["lr"] = "fast"\n'
                            '  return ml_collections.ConfigDict(config)\n')),
    # --- Values.
    Case('negative_lr', ('--config.optim.lr=-0.1',), 'optim.lr=-0.1 must be positive'),
    Case('zero_temperature', ('--config.pcl.temperature=0',), 'pcl.temperature=0.0 must be > 0'),
    Case('momentum_above_one', ('--config.optim.momentum=1.5',), 'optim.momentum=1.5'),
    Case('negative_epochs', ('--config.train.epochs=-1',), 'train.epochs=-1'),
    Case('image_size_too_small', ('--config.data.image_size=4',), 'data.image_size=4'),
    Case('queue_shorter_than_batch', ('--config.pcl.num_negatives=16',),
         'pcl.num_negatives=16 is smaller than train.batch_size=32'),
    Case('bn_groups_do_not_divide_batch', ('--config.train.shuffle_bn_groups=5',),
         'train.shuffle_bn_groups=5'),
    Case('bad_lr_milestones', ('--config.optim.cos=false', '--config.optim.schedule=10,x'),
         'optim.schedule'),
    Case('clusters_unsorted', ('--config.schedule.all_clusters=40,10,20,5',), 'not monotone'),
    Case('clusters_duplicate', ('--config.schedule.all_clusters=40,20,20,5',),
         'duplicate entry 20'),
    Case('clusters_not_integers', ('--config.schedule.all_clusters=40,twenty,5',),
         "entry 'twenty'"),
    Case('clusters_k_larger_than_n', ('--config.schedule.all_clusters=5000,40,20',),
         'k=5000 > N=1074'),
    Case('too_many_levels', ('--config.schedule.num_levels=9',), 'schedule.num_levels=9'),
    Case('unknown_arch', ('--config.model.arch=vgg16',), "model.arch='vgg16' is unknown"),
    Case('unknown_backend', ('--config.clustering.backend=sklearn',),
         "clustering.backend='sklearn' is unknown"),
    Case('unknown_dataset', ('--config.data.name=cifar10',), "data.name='cifar10' is unknown"),
    Case('unknown_dtype', ('--config.train.dtype=float16',), "train.dtype='float16' is unknown"),
    Case('unknown_schedule_mode', ('--config.schedule.mode=linear',),
         "schedule.mode='linear' is unknown"),
    Case('unknown_schedule_metric', ('--config.schedule.metric=accuracy',),
         "schedule.metric='accuracy' is unknown"),
    Case('val_metric_without_validation', ('--config.schedule.metric=val_knn_top1',),
         'eval.val_every=1'),
    Case('faiss_gpu_without_gpu', ('--config.clustering.backend=faiss-gpu',),
         "clustering.backend='faiss-gpu' needs JAX on a GPU",
         skip='a GPU is present' if jax.default_backend() == 'gpu' else ''),
    # --- Data.
    Case('batch_larger_than_dataset',
         ('--config.train.batch_size=2048', '--config.pcl.num_negatives=2048'),
         'fewer than one batch of train.batch_size=2048'),
    Case('unknown_split', ('--config.data.train_split=training',), "split 'training'"),
    Case('missing_data_root', ('--config.data.name=image_folder',), 'needs data.root'),
    Case('absent_data_root',
         ('--config.data.name=image_folder', '--config.data.root=/nonexistent/pcl_data'),
         'data.root=/nonexistent/pcl_data does not exist'),
    Case('csv_names_absent_files', (), 'absent from', setup=_data('csv')),
    Case('corrupt_jpeg', (), 'cannot decode 1 image(s)', setup=_data('folder'), quiet=False),
    Case('unlabelled_empty_folder', (), 'is empty; put the dataset there',
         setup=_unlabelled('empty')),
    Case('unlabelled_no_decodable_image', (), 'cannot decode 3 image(s)',
         setup=_unlabelled('undecodable'), quiet=False),
    Case('unlabelled_fewer_than_a_batch', (), 'has 3 images, fewer than one batch',
         setup=_unlabelled('small'), quiet=False),
    Case('unlabelled_beside_folders', (), 'set data.labels=False to read every image',
         setup=_unlabelled('mixed')),
    Case('unlabelled_validation_knn', ('--config.eval.val_every=1',),
         'eval.val_every=1 scores a kNN against labels', setup=_unlabelled('ok'), quiet=False),
    Case('labels_false_on_digits', ('--config.data.labels=False',),
         'data.labels=False reads unlabelled image files'),
    # --- Run directory and checkpoints.
    Case('workdir_is_a_file', (), 'is a file, not a directory', setup=_workdir_is_file),
    Case('workdir_not_writable', (f'--workdir={NOT_WRITABLE}',), 'is not writable',
         skip=_not_writable_skip()),
    Case('workdir_in_use', (), 'in use by another training process', setup=_workdir_in_use),
    Case('eval_without_checkpoint', ('--mode=eval',), 'no checkpoint'),
    Case('eval_missing_step', ('--mode=eval', '--step=99'), 'no checkpoint 99',
         setup=_copy_trained()),
    Case('eval_results_exist', ('--mode=eval',), 'pass --overwrite',
         setup=_copy_trained(results=True)),
    # Not quiet: a ResNet's XLA thread choice (host_threads) is logged before the checkpoint
    # is read.
    Case('eval_checkpoint_other_arch', ('--mode=eval', '--config.model.arch=resnet18'),
         "model.arch='conv4'", setup=_copy_trained(), quiet=False),
    Case('resume_checkpoint_other_arch', ('--config.model.arch=resnet18',),
         "trained with model.arch='conv4'", setup=_copy_trained(), quiet=False),
    Case('resume_other_image_size', ('--config.data.image_size=24',),
         'trained with data.image_size=16', setup=_copy_trained()),
    Case('resume_other_queue_length', ('--config.pcl.num_negatives=128',),
         'trained with pcl.num_negatives=64', setup=_copy_trained()),
    Case('resume_other_cluster_list', ('--config.schedule.all_clusters=40,20,10',),
         'resume with the same schedule settings', setup=_copy_trained()),
    Case('resume_damaged_checkpoint', (), 'no intact checkpoint in',
         setup=_copy_trained(damage=True)),
    # --- Divergence: its own status (3), same one-line form.
    Case('diverging_lr', ('--config.optim.lr=1e30', '--config.train.steps_per_epoch=3',
                          '--config.train.log_every_steps=1'), 'non-finite', status=3),
]


def _args(case, case_dir, trained):
  """The case's command line after `python -m pcl_jax.main`."""
  extra = case.setup(case_dir, trained) if case.setup else ()
  args = (*case.args, *extra)
  config = () if any(a.startswith('--config=') for a in args) else (TEST_CONFIG,)
  workdir = ()
  if case.workdir and not any(a.startswith('--workdir') for a in args):
    workdir = (f'--workdir={os.path.join(case_dir, "run")}',)
  return [*config, *workdir, *args]


def _run(command, env):
  start = time.monotonic()
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env)
  result.seconds = time.monotonic() - start
  return result


@pytest.fixture(scope='module')
def outcomes(tmp_path_factory, tiny_run):
  """Runs every case once; {case name: CompletedProcess}.

  Each case runs in a child of tests/cli_forkserver.py (the program as `python -m` runs it,
  without importing JAX anew per case); those that need a checkpoint start from a copy of the
  shared 1-epoch run (`tiny_run`, configs/test.py for 2 steps). The children share the test
  run's compilation cache (JAX_COMPILATION_CACHE_DIR, tests/conftest.py).
  """
  base = tmp_path_factory.mktemp('cli_errors')

  named_args = {}
  for case in CASES:
    if not case.skip:
      case_dir = str(base / case.name)
      os.makedirs(case_dir)
      named_args[case.name] = _args(case, case_dir, tiny_run)
  try:
    results = cli_forkserver.run_commands(named_args, base)
    print('seconds per case:', {name: round(r.seconds, 1) for name, r in results.items()})
  finally:
    while _LOCKS:
      os.close(_LOCKS.pop())
  return results


# Lines other than the error a failing run may print: progress bars and timestamped log lines.
_NOISE = re.compile(r"^(\s*|.*\d+%\|.*\|.*|\d\d:\d\d:\d\d .*)$")


def test_at_least_thirty_distinct_mistakes():
  assert len({case.name for case in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize('case', CASES, ids=[case.name for case in CASES])
def test_bad_input_gives_one_clear_line(case, outcomes):
  if case.skip:
    pytest.skip(case.skip)
  result = outcomes[case.name]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert result.returncode == case.status, (result.returncode, result.stderr[-3000:])
  segments = [s for s in re.split(r'[\r\n]', result.stderr) if s.strip()]
  errors = [s for s in segments if s.startswith('error: ')]
  assert len(errors) == 1, segments
  assert case.expected in errors[0], errors[0]
  assert all(_NOISE.match(s) for s in segments if s is not errors[0]), segments
  if case.quiet and case.status == 2:
    assert segments == errors, segments  # start-up errors print nothing else


def test_verbose_shows_the_traceback(tmp_path):
  result = _run([sys.executable, '-m', 'pcl_jax.main', TEST_CONFIG, f'--workdir={tmp_path}',
                 '--config.optim.lr=-1', '--verbose'], dict(os.environ))
  assert result.returncode != 0
  assert 'Traceback' in result.stderr and 'optim.lr=-1.0 must be positive' in result.stderr
