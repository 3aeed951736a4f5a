"""Studies: the statistics against scipy's own tests, the metrics of hand-written cells, the report's
shape, every bad study file as one error line, and a tiny real study run in slices (2 variants x 2
seeds on configs/test.py) through the command line."""

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from pcl_jax.configuration import UserError
from pcl_jax.run import files as run_files
from pcl_jax.study import cells as study_cells
from pcl_jax.study import report as study_report
from pcl_jax.study import runner as study_runner
from pcl_jax.study import spec as study_spec
from tests import cli_forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize('values', [[1.0, 2.0, 3.0], [50.2, 48.9], [3.0, 7.5, 1.25, 9.0, 4.0]])
def test_mean_ci_is_the_student_t_interval(values):
  entry = study_report.mean_ci(values)
  low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                               scale=stats.sem(values))
  np.testing.assert_allclose(entry['mean'], np.mean(values), rtol=1e-12)
  np.testing.assert_allclose(entry['ci95'], (high - low) / 2, rtol=1e-10)
  assert entry['n'] == len(values)


def test_mean_ci_by_hand_and_with_missing_values():
  # With 2 degrees of freedom t(q) = (2q - 1) / sqrt(2q(1 - q)) in closed form; sd([1, 2, 3]) = 1.
  entry = study_report.mean_ci([1.0, None, 2.0, 3.0])
  t_975 = 0.95 / np.sqrt(2 * 0.975 * 0.025)
  np.testing.assert_allclose(entry['ci95'], t_975 / np.sqrt(3), rtol=1e-12)
  assert entry['n'] == 3
  assert study_report.mean_ci([4.0, None]) == {'mean': 4.0, 'ci95': None, 'n': 1}
  assert study_report.mean_ci([None]) == {'mean': None, 'ci95': None, 'n': 0}


def test_paired_difference_is_scipys_paired_t_test():
  rng = np.random.default_rng(0)
  baseline = rng.normal(50, 3, 6)
  variant = baseline + rng.normal(1.0, 0.8, 6)
  entry = study_report.paired_difference(list(variant), list(baseline))
  reference = stats.ttest_rel(variant, baseline)
  interval = reference.confidence_interval(0.95)
  np.testing.assert_allclose(entry['diff'], np.mean(variant - baseline), rtol=1e-12)
  np.testing.assert_allclose(entry['p'], reference.pvalue, rtol=1e-10)
  np.testing.assert_allclose(entry['ci95'], (interval.high - interval.low) / 2, rtol=1e-10)
  assert entry['n'] == 6


def test_paired_difference_pairs_by_seed_and_has_no_nan():
  # Seeds 2 and 3 lack one side: the pairs are seeds 0, 1, 4.
  variant, baseline = [3.0, 5.0, None, 9.0, 4.0], [1.0, 2.0, 7.0, None, 1.5]
  entry = study_report.paired_difference(variant, baseline)
  reference = stats.ttest_rel([3.0, 5.0, 4.0], [1.0, 2.0, 1.5])
  np.testing.assert_allclose(entry['p'], reference.pvalue, rtol=1e-10)
  assert entry['n'] == 3
  assert study_report.paired_difference([2.0], [1.0]) == {'diff': 1.0, 'ci95': None, 'p': None,
                                                          'n': 1}
  assert study_report.paired_difference([2.0, 3.0], [2.0, 3.0])['p'] == 1.0  # scipy: NaN
  constant = study_report.paired_difference([2.0, 3.0], [1.0, 2.0])
  assert constant['ci95'] == 0.0 and constant['p'] == 0.0
  assert study_report.significant(constant)
  assert not study_report.significant({'diff': 1.0, 'ci95': 2.0, 'p': 0.3})
  assert not study_report.significant({'diff': 1.0, 'ci95': None, 'p': None})


# ------------------------------------------------------------------------------------------
# One cell's metrics, from hand-written files


def _write_cell(directory, results, records):
  os.makedirs(os.path.join(directory, 'eval'), exist_ok=True)
  if results is not None:
    with open(os.path.join(directory, 'eval', 'results.json'), 'w') as handle:
      json.dump(results, handle)
  with open(os.path.join(directory, 'metrics.jsonl'), 'w') as handle:
    for record in records:
      handle.write(json.dumps(record) + '\n')


def _read_cell(directory):
  results = None
  if os.path.exists(os.path.join(directory, 'eval', 'results.json')):
    with open(os.path.join(directory, 'eval', 'results.json')) as handle:
      results = json.load(handle)
  return results, run_files.read_metrics(os.path.join(directory, 'metrics.jsonl'))


RESULTS = {'knn_top1': 91.5, 'linear_top1': 90.25,
           'fewshot': {'5way1shot': {'mean': 70.0, 'ci95': 1.0},
                       '5way5shot': {'mean': None, 'ci95': None, 'skipped': 'too few images'}},
           'clustering': {'k': 10, 'nmi': 0.61}, 'split': 'test', 'checkpoint_step': 4}


def test_cell_metrics_from_hand_written_files(tmp_path):
  records = [
      {'epoch': 0, 'acc_inst': 10.0, 'acc_proto': None, 'val_knn_top1': 40.0},
      {'epoch': 1, 'acc_inst': 20.0, 'acc_proto': 5.0},
      {'epoch': 2, 'acc_inst': 30.0, 'acc_proto': 8.0, 'val_knn_top1': 55.0},
      {'epoch': 3, 'acc_inst': 35.0, 'acc_proto': 9.0, 'val_knn_top1': 55.0},
      {'epoch': 4, 'acc_inst': 99.0, 'acc_proto': 99.0, 'val_knn_top1': 99.0},
      {'epoch': 4, 'acc_inst': 38.0, 'acc_proto': 9.5, 'val_knn_top1': 51.5},  # later wins
  ]
  _write_cell(str(tmp_path), RESULTS, records)
  with open(tmp_path / 'metrics.jsonl', 'a') as handle:
    handle.write('{"epoch": 5, "acc_in')  # a torn last line is skipped
  metrics = study_report.cell_metrics(*_read_cell(str(tmp_path)))
  assert metrics == {'knn_top1': 91.5, 'linear_top1': 90.25, 'fewshot_5w1s': 70.0,
                     'fewshot_5w5s': None, 'nmi': 0.61, 'final_acc_inst': 38.0,
                     'final_acc_proto': 9.5, 'best_val_knn': 55.0, 'best_val_epoch': 2.0,
                     'overfit_gap': 3.5}
  assert set(metrics) == set(study_report.METRIC_NAMES)


def test_cell_metrics_without_validation_results_or_prototypes(tmp_path):
  _write_cell(str(tmp_path), None, [{'epoch': 0, 'acc_inst': 12.5, 'acc_proto': None}])
  metrics = study_report.cell_metrics(*_read_cell(str(tmp_path)))
  assert metrics['final_acc_inst'] == 12.5
  assert all(metrics[name] is None for name in metrics if name != 'final_acc_inst')
  assert all(value is None for value in study_report.cell_metrics(None, []).values())


# ------------------------------------------------------------------------------------------
# The report


def _hand_report():
  seeds = [0, 1, 2]
  cells = {}
  for offset, variant in enumerate(('base', 'wide', 'deep')):
    for seed in seeds:
      if (variant, seed) == ('deep', 2):
        continue  # not finished
      metrics = dict.fromkeys(study_report.METRIC_NAMES, None)
      metrics.update(knn_top1=80.0 + 2.0 * offset + seed + 0.1 * offset * seed, nmi=0.5)
      cells[(variant, seed)] = metrics
  curves = {('base', 0): [(0, 40.0), (1, 50.0)], ('base', 1): [(0, 42.0), (1, 54.0)]}
  study = {'name': 'hand', 'file': 'hand.py', 'config': 'configs/test.py', 'overrides': {},
           'variants': {'base': {}, 'wide': {'model.width': 16}, 'deep': {}},
           'command': 'python -m pcl_jax.study --study=hand.py --workdir=DIR'}
  return study_report.build_report(study, 'base', ['base', 'wide', 'deep'], seeds, cells,
                                   curves, diverged={'deep/seed2': 'non-finite loss_inst'})


def test_report_json_has_the_pinned_shape(tmp_path):
  report = _hand_report()
  json.dumps(report, allow_nan=False)
  assert report['baseline'] == 'base' and report['seeds'] == [0, 1, 2]
  assert list(report['variants']) == ['base', 'wide', 'deep']
  for variant in report['variants'].values():
    assert set(variant) == set(study_report.METRIC_NAMES)
    for entry in variant.values():
      assert {'mean', 'ci95', 'values'} <= set(entry)
  assert set(report['paired']) == {'wide', 'deep'}  # not the baseline against itself
  for variant in report['paired'].values():
    for entry in variant.values():
      assert {'diff', 'ci95', 'p'} <= set(entry)
  assert report['variants']['deep']['knn_top1']['values'] == [84.0, 85.2, None]  # seed order
  assert report['variants']['base']['fewshot_5w1s'] == {'mean': None, 'ci95': None, 'n': 0,
                                                         'values': [None, None, None]}
  assert report['paired']['deep']['knn_top1']['n'] == 2
  assert report['missing'] == []  # the unfinished cell diverged: listed there instead
  assert report['diverged'] == {'deep/seed2': 'non-finite loss_inst'}
  assert report['curves']['base'] == {'epochs': [0, 1], 'mean': [41.0, 52.0], 'n': [2, 2]}
  assert report['curves']['wide']['epochs'] == []
  paths = study_report.write_report(str(tmp_path), report)
  assert [os.path.basename(p) for p in paths] == ['report.json', 'report.md', 'report.png']
  assert list(json.load(open(paths[0]))['variants']) == ['base', 'wide', 'deep']
  with open(paths[2], 'rb') as handle:
    assert handle.read(8) == PNG_SIGNATURE
  markdown = open(paths[1]).read()
  # wide - base = 2.0 + 0.1 * seed: significant; mean ± t half-width over 3 seeds.
  assert '| `wide` | 83.10 ± ' in markdown and '**+2.10 ± ' in markdown
  assert '8 of 9 cells finished.' in markdown
  assert 'python -m pcl_jax.study --study=hand.py' in markdown
  assert 'deep/seed2' in markdown


def test_report_of_an_unfinished_study_names_the_missing_cells():
  cells = {('a', 0): dict.fromkeys(study_report.METRIC_NAMES, 1.0)}
  report = study_report.build_report({'name': 's'}, 'a', ['a', 'b'], [0], cells)
  assert report['missing'] == ['b/seed0']
  assert report['paired']['b']['knn_top1'] == {'diff': None, 'ci95': None, 'p': None, 'n': 0}
  assert '1 of 2 cells finished. Missing' in study_report.format_markdown(report)


# ------------------------------------------------------------------------------------------
# Study files, cells, slices


def _study_text(**changes):
  spec = {'config': 'configs/test.py',
          'overrides': {'train.steps_per_epoch': 3, 'eval.fewshot_episodes': 10,
                        'eval.val_every': 1, 'clustering.nredo': 1},
          # pcl.warmup_epochs changes no compiled program: the cells share every one.
          'variants': {'base': {}, 'early': {'pcl.warmup_epochs': 0}},
          'baseline': 'base', 'seeds': [0, 1]}
  spec.update(changes)
  return f'def get_study():\n  return {spec!r}\n'


def _write(path, text):
  with open(path, 'w') as handle:
    handle.write(text)
  return str(path)


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
  monkeypatch.chdir(ROOT)  # study files name configs relative to the current directory


BAD_STUDIES = [
    ('missing', None, 'no such file'),
    ('syntax', 'def get_study(:\n', 'failed to load: SyntaxError'),
    ('no_function', 'STUDY = {}\n', 'defines no get_study()'),
    ('raises', 'def get_study():\n  raise RuntimeError("boom")\n', 'get_study() failed: '
     'RuntimeError: boom'),
    ('not_dict', 'def get_study():\n  return [1]\n', 'returned list, not a dict'),
    ('unknown_key', _study_text(seed=[0]), "unknown key 'seed' (did you mean 'seeds'?)"),
    ('lacks_key', 'def get_study():\n  return {"config": "configs/test.py"}\n',
     "lacks 'variants', 'baseline', 'seeds'"),
    ('config_missing', _study_text(config='configs/nope.py'), "config 'configs/nope.py': no "
     'such file'),
    ('overrides_type', _study_text(overrides=['optim.lr']), "'overrides' must be a dict"),
    ('override_key', _study_text(overrides={'optim lr': 1}), "'optim lr' is not a dotted"),
    ('seed_override', _study_text(variants={'a': {'seed': 3}}, baseline='a'),
     "'seed' is set per cell"),
    ('no_variants', _study_text(variants={}), "'variants' must be a non-empty dict"),
    ('variant_name', _study_text(variants={'base': {}, 'a/b': {}}), "variant name 'a/b'"),
    ('variant_type', _study_text(variants={'base': 0.1}), "variant 'base' must be a dict"),
    ('variant_report', _study_text(variants={'base': {}, 'report.md': {}}),
     "variant name 'report.md' is the name of a report file"),
    ('baseline', _study_text(baseline='nope'), "baseline 'nope' is not a variant; use one of "
     'base, early'),
    ('empty_seeds', _study_text(seeds=[]), "'seeds' must be a non-empty list"),
    ('duplicate_seeds', _study_text(seeds=[0, 1, 0]), 'seeds [0] are listed more than once'),
    ('bool_seed', _study_text(seeds=[True]), 'seed True is not an integer'),
    ('negative_seed', _study_text(seeds=[-1]), 'seed -1 is not an integer >= 0'),
]


@pytest.mark.parametrize('name,text,expected', BAD_STUDIES, ids=[c[0] for c in BAD_STUDIES])
def test_bad_study_files_name_the_problem(tmp_path, name, text, expected):
  path = str(tmp_path / f'{name}.py') if text is None else _write(tmp_path / f'{name}.py', text)
  with pytest.raises(UserError, match='^--study=') as error:
    study_spec.load_study(path)
  assert expected in str(error.value)


@pytest.mark.parametrize('changes,expected', [
    ({'overrides': {'optim.lrr': 0.1}},
     "'overrides': the config has an unknown field optim.lrr; did you mean optim.lr?"),
    ({'variants': {'base': {}, 'x': {'optimm.lr': 0.1}}},
     "variant 'x': the config has an unknown field optimm"),
    ({'variants': {'base': {}, 'x': {'optim.lr.y': 0.1}}}, 'optim.lr is a field, not a section'),
    ({'variants': {'base': {}, 'x': {'train.epochs': 'many'}}},
     "variant 'x': train.epochs='many' does not fit the field"),
])
def test_unknown_fields_and_wrong_types_name_the_study_entry(tmp_path, changes, expected):
  study = study_spec.load_study(_write(tmp_path / 's.py', _study_text(**changes)))
  with pytest.raises(UserError) as error:
    study_cells.cell_configs(study)
  assert expected in str(error.value)


def test_cell_configs_apply_study_variant_seed_then_command_line(tmp_path):
  study = study_spec.load_study(_write(tmp_path / 's.py', _study_text(
      overrides={'optim.lr': 0.2, 'train.epochs': 3},
      variants={'base': {}, 'lr': {'optim.lr': 0.1}})))
  cells = study_cells.cell_configs(study, {'train.epochs': 1})
  assert [cell.name for cell in cells] == ['base/seed0', 'base/seed1', 'lr/seed0', 'lr/seed1']
  assert [cell.config.optim.lr for cell in cells] == [0.2, 0.2, 0.1, 0.1]
  assert [cell.config.seed for cell in cells] == [0, 1, 0, 1]
  assert {cell.config.train.epochs for cell in cells} == {1}  # the command line wins
  assert cells[2].workdir('D') == os.path.join('D', 'lr', 'seed0')
  cells[0].config.optim.lr = 5.0
  assert cells[1].config.optim.lr == 0.2  # independent configs
  study_cells.validate_cells(cells[1:])
  cells[0].config.pcl.num_negatives = 4
  with pytest.raises(UserError, match='^cell base/seed0: pcl.num_negatives=4 is smaller'):
    study_cells.validate_cells(cells)


def test_cells_slices_and_slurm_arrays():
  assert study_cells.parse_cells('1/3') == (1, 3)
  for bad in ('3/3', '1', 'a/b', '-1/2', '0/0'):
    with pytest.raises(UserError, match='must be i/n'):
      study_cells.parse_cells(bad)
  cells = list(range(7))
  slices = [study_cells.select_cells(cells, i, 3) for i in range(3)]
  assert slices == [[0, 3, 6], [1, 4], [2, 5]]
  assert study_cells.slurm_slice({}) is None
  assert study_cells.slurm_slice({'SLURM_ARRAY_TASK_ID': '5', 'SLURM_ARRAY_TASK_MIN': '4',
                                  'SLURM_ARRAY_TASK_COUNT': '2'}) == (1, 2)
  assert study_cells.slurm_slice({'SLURM_ARRAY_TASK_ID': '6', 'SLURM_ARRAY_TASK_MIN': '2',
                                  'SLURM_ARRAY_TASK_STEP': '2',
                                  'SLURM_ARRAY_TASK_COUNT': '3'}) == (2, 3)
  with pytest.raises(UserError, match='pass --cells'):
    study_cells.slurm_slice({'SLURM_ARRAY_TASK_ID': '9', 'SLURM_ARRAY_TASK_MIN': '1',
                             'SLURM_ARRAY_TASK_COUNT': '3'})  # --array=1,5,9
  with pytest.raises(UserError, match='SLURM_ARRAY_TASK_COUNT is not'):
    study_cells.slurm_slice({'SLURM_ARRAY_TASK_ID': '0'})


def test_config_differences_ignore_how_a_cell_computes():
  saved = {'seed': 0, 'optim': {'lr': 0.1, 'cos': True}, 'runtime': {'conv_impl': 'torch'},
           'data': {'num_workers': 2, 'name': 'digits'}}
  wanted = {'seed': 0, 'optim': {'lr': 0.2, 'cos': True}, 'runtime': {'conv_impl': 'xla'},
            'data': {'num_workers': 0, 'name': 'digits'}}
  assert study_cells.config_differences(saved, wanted) == ['optim.lr: 0.1 -> 0.2']


def test_a_diverged_cell_is_marked_left_out_and_not_retried(tmp_path, monkeypatch):
  """run_cell stands in for training: it writes a finished cell's files, or diverges."""
  calls = []

  def fake_run_cell(cell, root):
    calls.append(cell.name)
    if cell.name == 'early/seed1':
      raise FloatingPointError('non-finite loss_inst=nan at epoch 1, step 2; training stopped')
    results = dict(RESULTS, split=cell.config.data.eval_split,
                   checkpoint_step=cell.config.train.epochs, knn_top1=80.0 + cell.seed)
    _write_cell(cell.workdir(root), results,
                [{'epoch': 0, 'acc_inst': 10.0 + cell.seed, 'acc_proto': None}])
    return study_runner.CellTiming(cell=cell.name, wall_s=1.0, train_s=0.5, eval_s=0.25)

  monkeypatch.setattr(study_runner, 'run_cell', fake_run_cell)
  path = _write(tmp_path / 's.py', _study_text())
  workdir = str(tmp_path / 'run')
  outcome = study_runner.run_study_file(path, workdir)
  assert calls == ['base/seed0', 'base/seed1', 'early/seed0', 'early/seed1']
  assert outcome.ran == calls[:3] and outcome.missing == []
  assert 'non-finite loss_inst' in outcome.diverged['early/seed1']
  assert outcome.timings[0].overhead_s == 0.25
  marker = json.load(open(os.path.join(workdir, 'early', 'seed1', 'diverged.json')))
  assert marker['error'].startswith('non-finite loss_inst=nan')
  report = json.load(open(os.path.join(workdir, 'report.json')))
  assert report['variants']['early']['knn_top1']['values'] == [80.0, None]
  assert report['variants']['base']['knn_top1']['values'] == [80.0, 81.0]
  assert list(report['diverged']) == ['early/seed1'] and report['missing'] == []
  calls.clear()
  again = study_runner.run_study_file(path, workdir)
  assert calls == [] and again.skipped == ['base/seed0', 'base/seed1', 'early/seed0']
  assert list(again.diverged) == ['early/seed1']


# ------------------------------------------------------------------------------------------
# The command line, on a tiny real study


def _run_cli(args, env=None, timeout=TIMEOUT_S):
  full_env = {key: value for key, value in os.environ.items() if not key.startswith('SLURM_')}
  full_env.update(env or {})
  return subprocess.run([sys.executable, '-m', 'pcl_jax.study', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=full_env)


def _error_lines(result):
  return [line for line in result.stderr.splitlines() if line.strip()]


CLI_ERRORS = {
    'missing': (['--study=nope/study.py'], '--study=nope/study.py: no such file'),
    'config': (['--config=configs/test.py'], '--config is not a flag of a study'),
    'seed': (['--config.seed=3'], "--config.seed: each cell's seed comes from the study file"),
    'unknown_field': (['--config.optim.lrr=3'], '--config.optim.lrr: the config has no field'),
    'cells': (['--cells=2/2'], '--cells=2/2 must be i/n'),
    'bad_value': (['--config.pcl.num_negatives=4'],
                  'cell base/seed0: pcl.num_negatives=4 is smaller'),
}


@pytest.fixture(scope='module')
def cli_errors(tmp_path_factory):
  """{name: (CompletedProcess, its directory)}: each CLI_ERRORS command line as `python -m
  pcl_jax.study ARGS` runs it, in a child of tests/cli_forkserver.py (JAX imported once)."""
  base = tmp_path_factory.mktemp('study_errors')
  named_args = {}
  for name, (args, _) in CLI_ERRORS.items():
    directory = base / name
    directory.mkdir()
    study = _write(directory / 'study.py', _study_text())
    if not any(arg.startswith('--study=') for arg in args):
      args = [f'--study={study}', *args]
    named_args[name] = [*args, f'--workdir={directory / "run"}']
  env = {key: value for key, value in os.environ.items() if not key.startswith('SLURM_')}
  results = cli_forkserver.run_commands(named_args, base, env, module='pcl_jax.study')
  return {name: (results[name], base / name) for name in CLI_ERRORS}


@pytest.mark.parametrize('name', list(CLI_ERRORS))
def test_cli_user_errors_are_one_line_and_status_2(cli_errors, name):
  result, directory = cli_errors[name]
  expected = CLI_ERRORS[name][1]
  assert result.returncode == 2, result.stderr[-2000:]
  lines = _error_lines(result)
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-2000:]
  assert expected in lines[0]
  assert not os.path.exists(directory / 'run' / 'base')


@pytest.fixture(scope='module')
def sliced(tmp_path_factory, compilation_cache_dir):
  """The tiny study run as a 2-task array, both tasks at once as a cluster runs them: task 0 by
  `--cells=0/2`, task 1 from SLURM variables; then the report of both, as `--report_only`.
  `--compilation_cache` names the test run's cache (tests/conftest.py)."""
  base = tmp_path_factory.mktemp('study')
  study = _write(base / 'tiny.py', _study_text())
  workdir, cache = base / 'sliced', compilation_cache_dir
  common = [f'--study={study}', f'--workdir={workdir}', f'--compilation_cache={cache}']
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    first = pool.submit(_run_cli, [*common, '--cells=0/2'])
    second = pool.submit(_run_cli, common, {'SLURM_ARRAY_TASK_ID': '5',
                                            'SLURM_ARRAY_TASK_MIN': '4',
                                            'SLURM_ARRAY_TASK_COUNT': '2'})
    first, second = first.result(), second.result()
  assert first.returncode == 0, first.stderr[-3000:]
  assert second.returncode == 0, second.stderr[-3000:]
  study_runner.run_study_file(study, str(workdir), report_only=True)
  return {'study': study, 'workdir': workdir, 'cache': cache, 'common': common,
          'outputs': (first, second)}


def test_slices_run_their_cells_and_together_finish_the_study(sliced):
  first, second = sliced['outputs']
  assert 'cell 1/2 (base/seed0, slice 0/2)' in first.stderr
  assert 'cell 2/2 (early/seed0, slice 0/2)' in first.stderr
  assert 'cell 1/2 (base/seed1, slice 1/2)' in second.stderr  # from the SLURM variables
  assert 'cell 2/2 (early/seed1, slice 1/2)' in second.stderr
  workdir = sliced['workdir']
  for variant in ('base', 'early'):
    for seed in (0, 1):
      cell = workdir / variant / f'seed{seed}'
      config = json.load(open(cell / 'config.json'))
      assert config['seed'] == seed and config['eval']['val_every'] == 1
      assert config['pcl']['warmup_epochs'] == (0 if variant == 'early' else 1)
      assert os.path.isdir(cell / 'checkpoints' / '2')  # a run directory as main writes it
      assert json.load(open(cell / 'eval' / 'results.json'))['checkpoint_step'] == 2
      assert len(run_files.read_metrics(str(cell / 'metrics.jsonl'))) == 2
  report = json.load(open(workdir / 'report.json'))
  assert report['missing'] == [] and report['seeds'] == [0, 1]
  for variant in ('base', 'early'):
    for metric in study_report.METRIC_NAMES:
      entry = report['variants'][variant][metric]
      assert entry['n'] == 2 and entry['ci95'] is not None, (variant, metric)
  assert report['paired']['early']['knn_top1']['p'] is not None
  assert report['curves']['base']['epochs'] == [0, 1]
  assert '4 of 4 cells finished.' in open(workdir / 'report.md').read()
  with open(workdir / 'report.png', 'rb') as handle:
    assert handle.read(8) == PNG_SIGNATURE


def test_rerun_skips_finished_cells_and_refuses_changed_settings(sliced):
  workdir = str(sliced['workdir'])
  checkpoint = os.path.join(workdir, 'early', 'seed1', 'checkpoints', '2')
  mtime = os.path.getmtime(checkpoint)
  report_mtime = os.path.getmtime(os.path.join(workdir, 'report.json'))
  outcome = study_runner.run_study_file(sliced['study'], workdir)  # in this process, all cells
  assert outcome.skipped == ['base/seed0', 'base/seed1', 'early/seed0', 'early/seed1']
  assert outcome.ran == [] and outcome.missing == [] and outcome.diverged == {}
  assert os.path.getmtime(checkpoint) == mtime
  assert os.path.getmtime(os.path.join(workdir, 'report.json')) > report_mtime
  study = study_spec.load_study(sliced['study'])
  changed = study_cells.cell_configs(study, {'optim.lr': 0.5})
  with pytest.raises(UserError, match=r'^cell base/seed0 in .* \(saved -> now: optim.lr: 0.08 -> '
                     r'0.5\)'):
    study_runner.run_study(study, workdir, changed, report_only=True)


def test_reevaluate_scores_finished_cells_again_with_new_eval_settings(sliced, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(sliced['workdir'], workdir)
  cell = os.path.join(workdir, 'base', 'seed0')
  checkpoint_mtime = os.path.getmtime(os.path.join(cell, 'checkpoints', '2'))
  study = study_spec.load_study(sliced['study'])
  three_runs = study_cells.cell_configs(study, {'eval.kmeans_runs': 3})
  with pytest.raises(UserError, match=r'eval.kmeans_runs: 2 -> 3'):  # not without reevaluate
    study_runner.run_study(study, workdir, three_runs, report_only=True)
  outcome = study_runner.run_study(study, workdir, three_runs, selection=(0, 4), reevaluate=True)
  assert outcome.reevaluated == ['base/seed0'] and outcome.ran == []
  assert os.path.getmtime(os.path.join(cell, 'checkpoints', '2')) == checkpoint_mtime
  results = json.load(open(os.path.join(cell, 'eval', 'results.json')))
  assert results['checkpoint_step'] == 2 and results['clustering']['runs'] == 3
  assert len(results['clustering']['nmi_runs']) == 3
  assert json.load(open(os.path.join(cell, 'config.json')))['eval']['kmeans_runs'] == 3
  report = json.load(open(os.path.join(workdir, 'report.json')))
  assert report['variants']['base']['nmi']['values'][0] == pytest.approx(
      results['clustering']['nmi'])
  # What training recorded cannot change by evaluating again.
  for changes, field in (({'eval.val_every': 2}, 'eval.val_every'), ({'optim.lr': 0.5}, 'optim.lr')):
    with pytest.raises(UserError, match=re.escape(field)):
      study_runner.run_study(study, workdir, study_cells.cell_configs(study, changes),
                             reevaluate=True)


@pytest.mark.slow
def test_one_process_gives_the_numbers_of_the_slices(sliced, tmp_path):
  result = _run_cli([f'--study={sliced["study"]}', f'--workdir={tmp_path}',
                     f'--compilation_cache={sliced["cache"]}'])
  assert result.returncode == 0, result.stderr[-3000:]
  whole = json.load(open(tmp_path / 'report.json'))
  parts = json.load(open(sliced['workdir'] / 'report.json'))
  assert whole['variants'] == parts['variants'] and whole['paired'] == parts['paired']
