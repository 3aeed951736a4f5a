"""Faults, each with a clear outcome through the real CLI and nothing already written lost:
damaged checkpoints (every kind of file, truncated, flipped or deleted) on resume and on eval,
damaged or stale decoded-image caches, images deleted or corrupted after caching, full and
read-only disks, and evaluations of several splits.

The whole checkpoint table runs with `-m slow`; the default run takes a case of each kind of
outcome.
"""

import errno
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest

from configs import test as test_config
from pcl_jax.configuration import UserError
from pcl_jax.data import sources
from pcl_jax.evaluation import driver
from pcl_jax.run import checkpoint as checkpoint_lib
from pcl_jax.run import files as run_files
from pcl_jax import train
from tests import runs
from tests import test_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every kind of file of a checkpoint (globs under checkpoints/<n>/).
CHECKPOINT_FILES = {
    'meta': 'meta/metadata',
    'array_metadata': 'state/_METADATA',
    'array_index': 'state/manifest.ocdbt',
    'array_data': 'state/ocdbt.process_0/d/*',
    'array_data_index': 'state/ocdbt.process_0/manifest.ocdbt',
    'shardings': 'state/_sharding',
    'orbax_metadata': '_CHECKPOINT_METADATA',
    'checksums': 'checksums.json',
}
DAMAGES = ('truncate', 'flip', 'delete')
# The cases of the default run: each outcome once (the rest with -m slow).
QUICK_EVAL = {('array_data', 'truncate')}
QUICK_RESUME = {('array_data', 'flip')}


def _damage(path: str, how: str) -> None:
  if how == 'truncate':
    with open(path, 'r+b') as handle:
      handle.truncate(os.path.getsize(path) // 2)
  elif how == 'flip':
    with open(path, 'r+b') as handle:
      data = bytearray(handle.read())
      data[len(data) // 2] ^= 0xFF
      handle.seek(0)
      handle.write(data)
  else:
    os.remove(path)


def _cli(workdir, *args, timeout=300):
  return subprocess.run([sys.executable, '-m', 'pcl_jax.main', '--config=configs/test.py',
                         f'--workdir={workdir}', '--config.eval.fewshot_episodes=10', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _errors(result):
  return [line for line in result.stderr.splitlines() if line.startswith('error:')]


def _table(quick):
  # Without its checksums.json a checkpoint is not damaged, only unverified: it restores (see
  # test_a_checkpoint_without_checksums_is_judged_by_restoring_it).
  return [pytest.param(kind, how, marks=() if (kind, how) in quick else pytest.mark.slow)
          for kind in CHECKPOINT_FILES for how in DAMAGES if (kind, how) != ('checksums', 'delete')]


@pytest.fixture(name='trained')
def fixture_trained(two_epoch_run):
  """The shared 2-epoch run with checkpoints 1 and 2 (sealed: each has its checksums.json);
  every test works on a copy."""
  return two_epoch_run


def _copy(trained, tmp_path, name='run'):
  return runs.copy_run(trained, tmp_path, name)


def _damage_checkpoint(workdir, kind, how, step=2):
  [target] = sorted(glob.glob(os.path.join(workdir, 'checkpoints', str(step),
                                           CHECKPOINT_FILES[kind])))[:1]
  _damage(target, how)
  return os.path.relpath(target, os.path.join(workdir, 'checkpoints', str(step)))


@pytest.mark.parametrize('kind,how', _table(QUICK_EVAL))
def test_eval_of_a_damaged_checkpoint_is_one_error_line(trained, tmp_path, kind, how):
  workdir = _copy(trained, tmp_path)
  damaged = _damage_checkpoint(workdir, kind, how)
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints', '2')))
  result = _cli(workdir, '--mode=eval')
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines() == _errors(result), result.stderr[-3000:]
  [line] = _errors(result)
  assert f'checkpoint {os.path.join(workdir, "checkpoints", "2")} is damaged' in line
  assert damaged.split('/')[0] in line  # names the file (checksums: 'checksums.json')
  if kind != 'checksums':
    assert damaged in line
  assert '--step=N (available: [1])' in line
  # Evaluation moves and deletes nothing.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', '2'))) == before
  assert not os.path.exists(os.path.join(workdir, 'eval'))


@pytest.mark.slow
def test_eval_names_the_older_step_and_it_evaluates(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  _damage_checkpoint(workdir, 'array_data', 'flip')
  assert _cli(workdir, '--mode=eval').returncode == 2
  result = _cli(workdir, '--mode=eval', '--step=1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.load(open(os.path.join(workdir, 'eval', 'results.json')))['checkpoint_step'] == 1


@pytest.mark.parametrize('kind,how', _table(QUICK_RESUME))
def test_resume_sets_a_damaged_checkpoint_aside_and_goes_on(trained, tmp_path, kind, how):
  workdir = _copy(trained, tmp_path)
  damaged = _damage_checkpoint(workdir, kind, how)
  result = _cli(workdir)  # train.epochs=2: resumed from checkpoint 1, epoch 1 runs again
  assert result.returncode == 0, result.stderr[-3000:]
  set_aside = os.path.join(workdir, 'checkpoints_damaged', '2')
  [warning] = [line for line in result.stderr.splitlines() if 'is damaged' in line]
  assert f'{os.path.join(workdir, "checkpoints", "2")} is damaged' in warning
  assert set_aside in warning and damaged.split('/')[0] in warning
  # Renamed, never deleted: the damaged checkpoint keeps every file it had.
  assert os.path.isdir(set_aside)
  assert os.path.exists(os.path.join(set_aside, damaged)) == (how != 'delete')
  # Resumed from checkpoint 1; the metrics have each epoch once.
  epochs = [r['epoch'] for r in run_files.read_metrics(os.path.join(workdir, 'metrics.jsonl'))]
  assert epochs == [0, 1]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2']


def test_resume_without_an_intact_checkpoint_is_one_error_line_also_when_rerun(trained,
                                                                               tmp_path):
  workdir = _copy(trained, tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '1'))
  _damage_checkpoint(workdir, 'array_index', 'truncate')
  for _ in range(2):  # the rerun does not start over silently either
    result = _cli(workdir, '--config.train.epochs=3')
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = _errors(result)
    assert f'no intact checkpoint in {os.path.join(workdir, "checkpoints")}' in line
    assert os.path.join(workdir, 'checkpoints_damaged') in line
  assert os.listdir(os.path.join(workdir, 'checkpoints_damaged')) == ['2']
  assert len(run_files.read_metrics(os.path.join(workdir, 'metrics.jsonl'))) == 2  # kept


def test_a_checkpoint_without_checksums_is_judged_by_restoring_it(trained, tmp_path):
  """As written before checkpoints carried checksums, or by a run killed before sealing."""
  workdir = _copy(trained, tmp_path)
  for path in glob.glob(os.path.join(workdir, 'checkpoints', '*', 'checksums.json')):
    os.remove(path)
  _damage_checkpoint(workdir, 'array_index', 'truncate')
  with pytest.raises(UserError, match=r'checkpoints/2 is damaged: state.*--step=N'):
    checkpoint_lib.restore_for_eval(workdir)
  config = test_config.get_config()
  config.train.epochs = 3
  train.train_and_evaluate(config, workdir)
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_damaged', '2'))
  epochs = [r['epoch'] for r in run_files.read_metrics(os.path.join(workdir, 'metrics.jsonl'))]
  assert epochs == [0, 1, 2]


def test_checksums_name_each_kind_of_damage(tmp_path):
  directory = tmp_path / 'checkpoint'
  (directory / 'state').mkdir(parents=True)
  (directory / 'state' / 'data').write_bytes(b'0123456789')
  (directory / 'meta').write_text('{}')
  checkpoint_lib.seal(str(directory))
  assert checkpoint_lib.damage(str(directory)) is None
  (directory / 'state' / 'data').write_bytes(b'0123456780')
  assert checkpoint_lib.damage(str(directory)) == (
      'state/data has changed since it was written (checksum)')
  (directory / 'state' / 'data').write_bytes(b'01234')
  assert checkpoint_lib.damage(str(directory)) == 'state/data has 5 of its 10 bytes'
  (directory / 'state' / 'data').unlink()
  assert checkpoint_lib.damage(str(directory)) == 'state/data is missing'
  (directory / 'checksums.json').write_text('{"files": ')
  assert checkpoint_lib.damage(str(directory)) == 'checksums.json is unreadable'


# ----------------------------------------------------------------------------------------------
# The decoded-image cache and the images behind it.


def _cache_files(root):
  [npy_path] = sorted(glob.glob(str(root / '.cache' / '*.npy')))
  return npy_path, npy_path[:-4] + '.json'


@pytest.mark.parametrize('damage', ['array_bytes', 'manifest_garbage', 'manifest_edited'])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
  root = test_data.make_csv_layout(tmp_path / 'data')
  data = test_data.make_config(root).data
  first = np.array(sources.load_source(data, 'val').images)  # a copy: the cache is mapped
  npy_path, manifest_path = _cache_files(root)
  if damage == 'array_bytes':  # the same size, other pixels: only the checksum can tell
    _damage(npy_path, 'flip')
  elif damage == 'manifest_garbage':
    with open(manifest_path, 'w') as handle:
      handle.write('{"format": 2, "num_im')
  else:
    manifest = json.load(open(manifest_path))
    manifest['npy_sha256'] = '0' * 64
    json.dump(manifest, open(manifest_path, 'w'))
  with caplog.at_level(logging.WARNING):
    rebuilt = np.asarray(sources.load_source(data, 'val').images)
  [warning] = [r.getMessage() for r in caplog.records if 'cannot be used' in r.getMessage()]
  assert npy_path in warning and 'rebuilding it' in warning
  np.testing.assert_array_equal(rebuilt, first)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    sources.load_source(data, 'val')  # trusted again, silently
  assert not [r for r in caplog.records if 'cannot be used' in r.getMessage()]


def test_a_cache_of_changed_images_is_rebuilt_and_says_which(tmp_path, caplog):
  root = test_data.make_folder_layout(tmp_path / 'data')
  data = test_data.make_config(root).data
  sources.load_source(data, 'train')
  changed = root / 'train' / 'n01' / test_data._file_name('n01', 2)  # pylint: disable=W0212
  test_data._write_jpeg(changed, seed=7)  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    sources.load_source(data, 'train')
  [warning] = [r.getMessage() for r in caplog.records if 'cannot be used' in r.getMessage()]
  assert 'rewritten or resized' in warning and 'n0100000002.jpg' in warning


@pytest.mark.parametrize('change', ['deleted', 'corrupted'])
def test_an_image_gone_bad_after_caching_is_named(tmp_path, change):
  root = test_data.make_folder_layout(tmp_path / 'data')
  data = test_data.make_config(root).data
  sources.load_source(data, 'train')
  npy_path, _ = _cache_files(root)
  built = open(npy_path, 'rb').read()
  bad = root / 'train' / 'n02' / test_data._file_name('n02', 3)  # pylint: disable=W0212
  if change == 'deleted':
    bad.unlink()
  else:
    bad.write_bytes(b'\0' * bad.stat().st_size)  # the same size, no longer an image
  expected = 'is gone now' if change == 'deleted' else r'cannot decode 1 image\(s\)'
  with pytest.raises(UserError, match=expected) as raised:
    sources.load_source(data, 'train')
  assert str(bad) in str(raised.value)
  if change == 'deleted':  # the cache it was built into is kept as it was
    assert open(npy_path, 'rb').read() == built


@pytest.mark.slow
@pytest.mark.parametrize('change', ['deleted', 'corrupted'])
def test_an_image_gone_bad_after_caching_is_one_error_line(tmp_path, change):
  root = test_data.make_folder_layout(tmp_path / 'data')
  args = ('--config.data.name=image_folder', f'--config.data.root={root}',
          '--config.data.train_split=train', '--config.data.eval_split=test',
          '--config.train.batch_size=8', '--config.pcl.num_negatives=16',
          '--config.train.shuffle_bn_groups=2', '--config.schedule.all_clusters=4,2',
          '--config.train.epochs=1', '--config.train.steps_per_epoch=1')
  first = _cli(tmp_path / 'run', *args)
  assert first.returncode == 0, first.stderr[-3000:]
  npy_path, _ = _cache_files(root)
  built = open(npy_path, 'rb').read()
  bad = root / 'train' / 'n02' / test_data._file_name('n02', 3)  # pylint: disable=protected-access
  if change == 'deleted':
    bad.unlink()
  else:
    bad.write_bytes(b'\0' * bad.stat().st_size)  # the same size, no longer an image
  result = _cli(tmp_path / 'run', *args, '--config.train.epochs=2')
  assert result.returncode == 2, result.stderr[-3000:]
  [line] = _errors(result)
  assert str(bad) in line
  assert ('is gone now' if change == 'deleted' else 'cannot decode 1 image(s)') in line
  if change == 'deleted':  # the cache it was built into is kept as it was
    assert open(npy_path, 'rb').read() == built


# ----------------------------------------------------------------------------------------------
# Full and read-only disks.


@pytest.fixture
def small_disk(tmp_path):
  """A 3 MiB tmpfs (root only; skipped where mounting is not allowed)."""
  mount_point = tmp_path / f'disk-{uuid.uuid4().hex[:6]}'
  mount_point.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(mount_point)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f'cannot mount a small tmpfs here: {mounted.stderr.strip()}')
  try:
    yield mount_point
  finally:
    subprocess.run(['umount', '-l', str(mount_point)], capture_output=True)


def _fill(directory, leave_bytes):
  free = shutil.disk_usage(directory).free
  with open(os.path.join(directory, 'filler'), 'wb') as handle:
    handle.write(b'\0' * max(free - leave_bytes, 0))


# The disk-full case of the results files stays in the default run.
@pytest.mark.slow
def test_disk_full_while_saving_a_checkpoint(small_disk, trained):
  workdir = small_disk / 'run'
  shutil.copytree(trained, workdir)  # checkpoints 1 and 2
  _fill(small_disk, 40 * 1024)  # room for config.json and a metrics line, not a checkpoint
  result = _cli(workdir, '--config.train.epochs=3')
  assert result.returncode == 2, result.stderr[-3000:]
  [line] = _errors(result)
  assert 'No space left on device' in line and 'free space' in line
  assert 'Traceback' not in result.stderr
  # What was written is intact: checkpoint 2 restores, metrics.jsonl has whole lines.
  assert checkpoint_lib.restore_for_eval(str(workdir))[2] == 2
  with open(workdir / 'metrics.jsonl') as handle:
    assert all(json.loads(line) for line in handle)
  os.remove(small_disk / 'filler')
  config = test_config.get_config()
  config.train.epochs = 3
  train.train_and_evaluate(config, str(workdir))  # resumes from checkpoint 2
  epochs = [r['epoch'] for r in run_files.read_metrics(str(workdir / 'metrics.jsonl'))]
  assert epochs == [0, 1, 2]


def test_disk_full_or_read_only_while_writing_results(small_disk, trained):
  workdir = str(small_disk / 'run')
  shutil.copytree(trained, workdir)
  config = test_config.get_config()
  config.eval.fewshot_episodes = 10
  driver.evaluate_checkpoint(config, workdir)
  written = {name: open(os.path.join(workdir, 'eval', name)).read()
             for name in ('results.json', 'results_test.json', 'assignments_test.csv')}
  _fill(small_disk, 0)
  with pytest.raises(OSError) as full:
    driver.evaluate_checkpoint(config, workdir, overwrite=True)
  assert run_files.storage_failure(full.value)[0] == errno.ENOSPC
  # The first file written (the assignments; results.json comes last) is named.
  assert full.value.filename == os.path.join(workdir, 'eval', 'assignments_test.csv')
  os.remove(small_disk / 'filler')
  subprocess.run(['mount', '-o', 'remount,ro', str(small_disk)], check=True)
  with pytest.raises(OSError) as read_only:
    driver.evaluate_checkpoint(config, workdir, overwrite=True)
  assert run_files.storage_failure(read_only.value)[0] == errno.EROFS
  training = _cli(workdir, '--config.train.epochs=3')  # refused at start-up, in one line
  assert training.returncode == 2 and 'not writable' in _errors(training)[0]
  for name, text in written.items():  # intact
    assert open(os.path.join(workdir, 'eval', name)).read() == text


def test_a_metrics_line_cut_short_by_a_full_disk_is_removed(tmp_path, monkeypatch):
  log = run_files.MetricsLog(str(tmp_path), tensorboard=False)
  log.append({'epoch': 0, 'loss': 1.0})
  before = open(tmp_path / 'metrics.jsonl').read()
  real_write = os.write
  monkeypatch.setattr(os, 'write', lambda fd, data: real_write(fd, data[:5]))  # a full disk
  with pytest.raises(OSError, match='No space left'):
    log.append({'epoch': 1, 'loss': 2.0})
  monkeypatch.undo()
  assert open(tmp_path / 'metrics.jsonl').read() == before  # no torn line left


# ----------------------------------------------------------------------------------------------
# Several evaluated splits.


def test_each_evaluated_split_keeps_its_results(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  config = test_config.get_config()
  config.eval.fewshot_episodes = 10
  on_test = driver.evaluate_checkpoint(config, workdir)
  config.data.eval_split = 'val'
  on_val = driver.evaluate_checkpoint(config, workdir)
  eval_dir = os.path.join(workdir, 'eval')
  assert json.load(open(os.path.join(eval_dir, 'results_test.json'))) == json.loads(
      json.dumps(on_test))
  assert json.load(open(os.path.join(eval_dir, 'results_val.json')))['split'] == 'val'
  assert json.load(open(os.path.join(eval_dir, 'results.json')))['split'] == 'val'  # the last
  assert on_val['split'] == 'val'
  with pytest.raises(UserError, match=r'results_val.json exists .*--overwrite'):
    driver.evaluate_checkpoint(config, workdir)
  driver.evaluate_checkpoint(config, workdir, overwrite=True)


def test_a_results_json_without_its_split_file_is_kept(trained, tmp_path):
  """Run directories evaluated before results_<split>.json existed keep their result."""
  workdir = _copy(trained, tmp_path)
  os.makedirs(os.path.join(workdir, 'eval'))
  earlier = {'split': 'val', 'knn_top1': 12.5, 'checkpoint_step': 1}
  json.dump(earlier, open(os.path.join(workdir, 'eval', 'results.json'), 'w'))
  config = test_config.get_config()
  config.eval.fewshot_episodes = 10
  driver.evaluate_checkpoint(config, workdir)  # split test
  assert json.load(open(os.path.join(workdir, 'eval', 'results_val.json'))) == earlier
  assert json.load(open(os.path.join(workdir, 'eval', 'results.json')))['split'] == 'test'
