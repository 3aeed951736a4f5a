"""Tests for pcl_jax.plot: reading metrics.jsonl, change markers, the PNG and the CLI errors."""

import json
import os

import pytest

from pcl_jax.study import plot

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _records(num_epochs=8, warmup=2, change_at=(5,), validation=False):
  """Synthetic per-epoch records: no prototypes before `warmup`, a cluster change at each epoch
  of `change_at`."""
  records = []
  clusters = [300, 200, 100]
  for epoch in range(num_epochs):
    if epoch in change_at:
      clusters = clusters[1:] + [clusters[-1] // 2]
    proto = epoch >= warmup
    records.append({
        'epoch': epoch,
        'loss_inst': 5.0 - 0.3 * epoch,
        'loss_proto': 4.0 - 0.2 * epoch if proto else None,
        'acc_inst': 10.0 + 5 * epoch,
        'acc_proto': 5.0 + 4 * epoch if proto else None,
        'lr': 0.03,
        'smoothing': 0.1 if proto else None,
        'num_clusters': list(clusters) if proto else None,
    })
    if validation and epoch % 3 == 0:
      records[-1]['val_knn_top1'] = 20.0 + epoch
  return records


def _write_run(directory, records, extra_lines=()):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, plot.METRICS_FILE), 'w') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')
    for line in extra_lines:
      f.write(line)
  return str(directory)


def _is_png(path):
  with open(path, 'rb') as f:
    return f.read(8) == PNG_SIGNATURE and os.path.getsize(path) > 1000


def test_cluster_change_epochs():
  assert plot.cluster_change_epochs(_records(change_at=(4, 6))) == [4, 6]


def test_cluster_change_epochs_ignores_start_of_clustering_and_gaps():
  records = [
      {'epoch': 0, 'num_clusters': None},
      {'epoch': 1, 'num_clusters': [10, 5]},
      {'epoch': 2, 'num_clusters': [10, 5]},
      {'epoch': 3},  # a record without the field is not a change either
      {'epoch': 4, 'num_clusters': [5, 2]},
  ]
  assert plot.cluster_change_epochs(records) == [4]


def test_load_metrics_sorts_and_keeps_the_last_record_of_an_epoch(tmp_path):
  records = _records(num_epochs=4)
  rerun = dict(records[2], acc_inst=99.0)  # epoch 2 logged again after a resume
  workdir = _write_run(tmp_path / 'run', records + [rerun], extra_lines=['\n'])
  loaded = plot.load_metrics(workdir)
  assert [r['epoch'] for r in loaded] == [0, 1, 2, 3]
  assert loaded[2]['acc_inst'] == 99.0


def test_load_metrics_skips_a_truncated_last_line(tmp_path, capsys):
  workdir = _write_run(tmp_path / 'run', _records(num_epochs=3), extra_lines=['{"epoch": 3, "lo'])
  assert len(plot.load_metrics(workdir)) == 3
  assert 'truncated' in capsys.readouterr().err


def test_load_metrics_errors(tmp_path):
  with pytest.raises(plot.MetricsError, match='not found'):
    plot.load_metrics(str(tmp_path / 'missing'))
  empty = _write_run(tmp_path / 'empty', [], extra_lines=['\n'])
  with pytest.raises(plot.MetricsError, match='no epoch records'):
    plot.load_metrics(empty)
  broken = _write_run(tmp_path / 'broken', [], extra_lines=['not json\n', '{"epoch": 1}\n'])
  with pytest.raises(plot.MetricsError, match='metrics.jsonl:1'):
    plot.load_metrics(broken)
  no_epoch = _write_run(tmp_path / 'no_epoch', [{'acc_inst': 1.0}])
  with pytest.raises(plot.MetricsError, match='integer "epoch"'):
    plot.load_metrics(no_epoch)


@pytest.mark.parametrize('validation', [False, True])
def test_plot_runs_writes_png(tmp_path, validation):
  runs = [('descending', _records(change_at=(4,), validation=validation)),
          ('ascending', _records(num_epochs=6, change_at=(3, 5)))]
  out = tmp_path / 'figures' / 'curves.png'  # the parent directory is created
  plot.plot_runs(runs, str(out))
  assert _is_png(out)


def test_main_two_runs(tmp_path, capsys):
  first = _write_run(tmp_path / 'run_a', _records(change_at=(4,)))
  second = _write_run(tmp_path / 'run_b', _records(change_at=(3, 6), validation=True))
  out = tmp_path / 'both.png'
  assert plot.main([first, second, '--out', str(out)]) == 0
  assert _is_png(out)
  assert str(out) in capsys.readouterr().out


def test_main_default_output_in_first_workdir(tmp_path):
  workdir = _write_run(tmp_path / 'run', _records())
  assert plot.main([workdir]) == 0
  assert _is_png(os.path.join(workdir, 'metrics.png'))


def test_main_missing_file_exits_with_status_2(tmp_path, capsys):
  good = _write_run(tmp_path / 'good', _records())
  with pytest.raises(SystemExit) as exit_info:
    plot.main([good, str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'x.png')])
  assert exit_info.value.code == 2
  assert 'metrics.jsonl not found' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'x.png')


def test_main_empty_file_exits_with_status_2(tmp_path, capsys):
  empty = _write_run(tmp_path / 'empty', [])
  with pytest.raises(SystemExit) as exit_info:
    plot.main([empty])
  assert exit_info.value.code == 2
  assert 'no epoch records' in capsys.readouterr().err


def test_run_labels():
  assert plot.run_labels(['runs/a', 'runs/b/']) == ['a', 'b']
  assert plot.run_labels(['x/work', 'y/work', 'z']) == ['x/work', 'y/work', 'z']
