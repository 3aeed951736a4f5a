r"""Studies: a grid of variants x seeds, each cell an ordinary run directory, and a report.

  python -m pcl_jax.study --study=configs/studies/example_digits.py --workdir=/tmp/study
  python -m pcl_jax.study --study=FILE --workdir=DIR --cells=1/4 --config.train.epochs=50

This module owns running a study (docs/studies.md): reading the study file, building and
checking every cell's config, choosing this process's cells, training and evaluating them one
after another in this process, and handing the finished cells' numbers to `study_report`
(which writes DIR/report.json, report.md, report.png). What a cell computes is
`train.train_and_evaluate` and `evaluation.driver.evaluate_checkpoint`, exactly as
`python -m pcl_jax.main` (train, then `--mode=eval`) would run them on DIR/<variant>/seed<k>/.

The study file defines `get_study()` returning {'config': base config path (relative to the
current directory, or absolute), 'overrides': {dotted field: value} for every cell (optional),
'variants': {name: {dotted field: value}}, 'baseline': a variant's name, 'seeds': [int, ...]}.
A cell's config is the base config, then the study's `overrides`, then its variant's (which win
over `overrides`), then `seed`, then the command line's `--config.X=V` (applied last, to every
cell: they win over everything in the study file; `--config.seed` is refused, the seeds are the
study's).

Cells run in a fixed order (variants in file order, each over the seeds in order); cell j
belongs to slice j % n of `--cells=i/n`. Without `--cells`, a SLURM array task takes slice
(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP of SLURM_ARRAY_TASK_COUNT;
elsewhere the process runs every cell. A cell with eval results of its last epoch is finished
and skipped; another one resumes from its checkpoints. A cell whose config.json differs from
what the study now asks (outside `IGNORED_DIFFERENCES`) stops the study with one error line
naming it and the fields. A cell whose training diverges is marked (DIR/<variant>/seed<k>/
diverged.json), left out of the report, and not retried by reruns; the others still run.
Every process writes the report from the cells finished so far, listing the missing ones.

`--reevaluate` scores the finished cells of the slice again from their last checkpoints, with
the evaluation's current code and the study's `eval.*` settings, without training (e.g. after
the evaluation protocol changed, or with `--config.eval.kmeans_runs=20`); their `eval.*` fields
(all but `eval.val_every`, which changes what training records) may then differ from the saved
ones, and config.json is rewritten with the settings the new results were made with.

JAX's persistent compilation cache (DIR/.jax_cache unless `--compilation_cache` says otherwise)
lets every cell after the first, and every later process (array tasks, reruns), load the
programs the first one compiled instead of compiling them again.

Exit status as `pcl_jax.main`'s: 2 with one `error: ...` line for a user error (a bad study
file, field, value or cell directory), 3 when a cell diverged (after the others ran and the
report was written), 128 + signal when stopped (rerun to resume).
"""

import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import re
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import ml_collections

from pcl_jax import configuration
from pcl_jax.configuration import UserError
from pcl_jax.run import cli
from pcl_jax.run import files as run_files

log = logging.getLogger('pcl_jax.study')  # not __name__: '__main__' when run with -m

STUDY_KEYS = ('config', 'overrides', 'variants', 'baseline', 'seeds')
REQUIRED_KEYS = ('config', 'variants', 'baseline', 'seeds')
# A variant's name is a directory name.
VARIANT_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$')
FIELD_PATH = re.compile(r'^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$')
# Settings that change how a cell computes, not what: a finished or resumed cell may differ
# in them from the study (another machine, other kernels or loader workers).
IGNORED_DIFFERENCES = ('runtime', 'data.num_workers', 'data.cache_dir')
DIVERGED_FILE = 'diverged.json'
REPORT_FILES = ('report.json', 'report.md', 'report.png')  # study_report.REPORT_FILES
CACHE_DIR = '.jax_cache'


@dataclasses.dataclass(frozen=True)
class Study:
  """A study file's contents, checked (`load_study`)."""
  file: str
  name: str
  config: str
  overrides: Dict[str, object]
  variants: Dict[str, Dict[str, object]]
  baseline: str
  seeds: Tuple[int, ...]


@dataclasses.dataclass
class Cell:
  """One (variant, seed) of a study and its full config."""
  variant: str
  seed: int
  config: ml_collections.ConfigDict

  @property
  def name(self) -> str:
    return f'{self.variant}/seed{self.seed}'

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.variant, f'seed{self.seed}')


@dataclasses.dataclass
class CellTiming:
  """Where a cell's wall time went in this process (seconds)."""
  cell: str
  wall_s: float  # train_and_evaluate + evaluate_checkpoint, as called
  train_s: float  # the epochs this process trained, as the trainer measured them
  eval_s: float  # the evaluation, as the driver measured it
  first_epoch_s: Optional[float] = None  # epoch_time_s of the first epoch trained here
  later_epoch_s: Optional[float] = None  # median epoch_time_s of the others

  @property
  def overhead_s(self) -> float:
    """Start-up, compilation outside the epochs, checkpoint and result writing."""
    return self.wall_s - self.train_s - self.eval_s


@dataclasses.dataclass
class StudyOutcome:
  """What `run_study` did in this process."""
  ran: List[str]
  skipped: List[str]
  diverged: Dict[str, str]  # cell -> why, for this process's cells
  missing: List[str]  # cells of the whole study not finished yet
  timings: List[CellTiming]
  report_paths: List[str]
  reevaluated: List[str] = dataclasses.field(default_factory=list)  # `reevaluate`'s cells


# ------------------------------------------------------------------------------------------
# The study file


def _load_module(path: str, where: str, function: str):
  """`function` of the Python file `path`; UserError naming `where` if it cannot be had."""
  if os.path.isdir(path):
    raise UserError(f'{where} is a directory; pass a file')
  if not os.path.isfile(path):
    raise UserError(f'{where}: no such file (relative paths start at {os.getcwd()})')
  spec = importlib.util.spec_from_file_location(
      f'_pcl_jax_loaded_{abs(hash(os.path.abspath(path)))}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as error:  # pylint: disable=broad-except
    first = str(error).strip().splitlines()[0] if str(error).strip() else ''
    raise UserError(f'{where} failed to load: {type(error).__name__}: {first}') from error
  loaded = getattr(module, function, None)
  if not callable(loaded):
    raise UserError(f'{where} defines no {function}()')
  return loaded


def _check_overrides(overrides, where: str) -> Dict[str, object]:
  if not isinstance(overrides, dict):
    raise UserError(f'{where} must be a dict of dotted field -> value such as '
                    f"{{'optim.lr': 0.06}}, got {type(overrides).__name__}")
  for key in overrides:
    if not isinstance(key, str) or not FIELD_PATH.match(key):
      raise UserError(f'{where}: {key!r} is not a dotted config field such as \'optim.lr\'')
    if key == 'seed':
      raise UserError(f"{where}: 'seed' is set per cell from the study's seeds; list the seeds "
                      "in 'seeds' instead")
  return dict(overrides)


def study_from_dict(spec, file: str) -> Study:
  """Checks what a study file's get_study() returned; UserError naming the first problem."""
  where = f'--study={file}'
  if not isinstance(spec, dict):
    raise UserError(f'{where}: get_study() returned {type(spec).__name__}, not a dict with '
                    f'keys {", ".join(STUDY_KEYS)}')
  for key in spec:
    if key not in STUDY_KEYS:
      close = difflib.get_close_matches(str(key), STUDY_KEYS, n=1)
      hint = f' (did you mean {close[0]!r}?)' if close else ''
      raise UserError(f'{where}: get_study() has an unknown key {key!r}{hint}; the keys are '
                      f'{", ".join(STUDY_KEYS)}')
  absent = [key for key in REQUIRED_KEYS if key not in spec]
  if absent:
    raise UserError(f'{where}: get_study() lacks {", ".join(repr(k) for k in absent)}; the keys '
                    f'are {", ".join(STUDY_KEYS)} (overrides optional)')
  config = spec['config']
  if not isinstance(config, str) or not config:
    raise UserError(f"{where}: 'config' must be a config file path such as 'configs/digits.py', "
                    f'got {config!r}')
  if not os.path.isfile(config):
    raise UserError(f"{where}: config {config!r}: no such file (relative paths start at "
                    f'{os.getcwd()})')
  overrides = _check_overrides(spec.get('overrides', {}), f"{where}: 'overrides'")
  variants = spec['variants']
  if not isinstance(variants, dict) or not variants:
    raise UserError(f"{where}: 'variants' must be a non-empty dict of name -> overrides, got "
                    f'{variants!r}')
  checked = {}
  for name, variant in variants.items():
    if not isinstance(name, str) or not VARIANT_NAME.match(name):
      raise UserError(f'{where}: variant name {name!r} must be a directory name of letters, '
                      'digits and _ . + - (starting with a letter or digit)')
    if name in REPORT_FILES:
      raise UserError(f'{where}: variant name {name!r} is the name of a report file; rename it')
    checked[name] = _check_overrides(variant, f'{where}: variant {name!r}')
  baseline = spec['baseline']
  if not isinstance(baseline, str) or baseline not in checked:
    raise UserError(f"{where}: baseline {baseline!r} is not a variant; use one of "
                    f'{", ".join(checked)}')
  seeds = spec['seeds']
  if not isinstance(seeds, (list, tuple)) or not seeds:
    raise UserError(f"{where}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
  for seed in seeds:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
      raise UserError(f"{where}: seed {seed!r} is not an integer >= 0")
  duplicates = sorted({seed for seed in seeds if seeds.count(seed) > 1})
  if duplicates:
    raise UserError(f"{where}: seeds {duplicates} are listed more than once; each seed is one "
                    'cell per variant')
  name = os.path.splitext(os.path.basename(file))[0]
  return Study(file=file, name=name, config=config, overrides=overrides, variants=checked,
               baseline=baseline, seeds=tuple(seeds))


def load_study(path: str) -> Study:
  """Reads and checks a study file (module docstring); UserError naming any problem."""
  if not path:
    raise UserError('--study=FILE is required, e.g. --study=configs/studies/example_digits.py')
  spec = _call_file_function(path, f'--study={path}', 'get_study')
  return study_from_dict(spec, path)


def _call_file_function(path: str, where: str, function: str):
  """What `function()` of the Python file `path` returns; UserError (prefixed `where`) when the
  file cannot be loaded, lacks it, or it raises."""
  fn = _load_module(path, where, function)
  try:
    return fn()
  except Exception as error:  # pylint: disable=broad-except
    raise UserError(f'{where}: {function}() failed: {type(error).__name__}: {error}') from error


def load_config(path: str, where: str) -> ml_collections.ConfigDict:
  """The ConfigDict of config file `path`'s get_config()."""
  config = _call_file_function(path, f'{where}: config {path}', 'get_config')
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f'{where}: config {path}: get_config() returned {type(config).__name__}, '
                    'not a ConfigDict')
  return config


# ------------------------------------------------------------------------------------------
# Cells and their configs


def apply_overrides(config: ml_collections.ConfigDict, overrides: Dict[str, object],
                    where: str) -> None:
  """Sets each dotted field of `overrides` in `config`; UserError naming `where` and the field
  when it does not exist (`configuration.check_fields` names it, with a close match) or the
  value does not fit its type."""
  for key, value in overrides.items():
    parts = key.split('.')
    node = config
    for depth, part in enumerate(parts[:-1]):
      if part not in node:
        node[part] = ml_collections.ConfigDict()  # check_fields names the unknown section
      elif not isinstance(node[part], ml_collections.ConfigDict):
        raise UserError(f"{where}: {key!r}: {'.'.join(parts[:depth + 1])} is a field, not a "
                        'section; configs/default.py lists every field')
      node = node[part]
    try:
      node[parts[-1]] = value
    except (TypeError, ValueError, AttributeError) as error:
      first = str(error).strip().splitlines()[0] if str(error).strip() else ''
      raise UserError(f"{where}: {key}={value!r} does not fit the field ({first}); give a value "
                      "of the field's type (configs/default.py shows each field)") from error
  try:
    configuration.check_fields(config)
  except UserError as error:
    raise UserError(f'{where}: {error}') from error


def cell_configs(study: Study, command_line: Optional[Dict[str, object]] = None,
                 base: Optional[ml_collections.ConfigDict] = None) -> List[Cell]:
  """Every cell of the study in the study's order, its config built as the module docstring
  says. Fields are checked (`configuration.check_fields`), values not yet (`validate_cells`:
  it may start a JAX backend)."""
  where = f'--study={study.file}'
  base = load_config(study.config, where) if base is None else base
  base = ml_collections.ConfigDict(base.to_dict())  # unlocked, independent copy
  apply_overrides(base, study.overrides, f"{where}: 'overrides'")
  cells = []
  for variant, overrides in study.variants.items():
    variant_config = ml_collections.ConfigDict(base.to_dict())
    apply_overrides(variant_config, overrides, f'{where}: variant {variant!r}')
    for seed in study.seeds:
      config = ml_collections.ConfigDict(variant_config.to_dict())
      config.seed = seed
      if command_line:
        apply_overrides(config, command_line, 'command line')
      cells.append(Cell(variant, seed, config))
  return cells


def validate_cells(cells: Sequence[Cell]) -> None:
  """`configuration.validate` and `clustering.check_settings` of every cell (fails on the
  first, naming it)."""
  from pcl_jax import clustering  # pylint: disable=g-import-not-at-top  (JAX: not for --help)
  for cell in cells:
    try:
      configuration.validate(cell.config)
      clustering.check_settings(cell.config)
    except UserError as error:
      raise UserError(f'cell {cell.name}: {error}') from error


def parse_cells(text: str) -> Tuple[int, int]:
  """'i/n' -> (i, n) with 0 <= i < n."""
  match = re.match(r'^\s*(\d+)\s*/\s*(\d+)\s*$', str(text))
  if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
    raise UserError(f'--cells={text} must be i/n with 0 <= i < n (slice i of n, from 0), e.g. '
                    '--cells=0/4')
  return int(match.group(1)), int(match.group(2))


def slurm_slice(environ) -> Optional[Tuple[int, int]]:
  """(i, n) of a SLURM array task from its environment; None outside an array job."""
  if 'SLURM_ARRAY_TASK_ID' not in environ:
    return None
  names = ('SLURM_ARRAY_TASK_ID', 'SLURM_ARRAY_TASK_COUNT', 'SLURM_ARRAY_TASK_MIN',
           'SLURM_ARRAY_TASK_STEP')
  defaults = {'SLURM_ARRAY_TASK_MIN': '0', 'SLURM_ARRAY_TASK_STEP': '1'}
  values = {}
  for name in names:
    text = environ.get(name, defaults.get(name))
    if text is None:
      raise UserError(f'SLURM_ARRAY_TASK_ID is set but {name} is not; pass --cells=i/n')
    try:
      values[name] = int(text)
    except ValueError:
      raise UserError(f'{name}={text!r} is not an integer; pass --cells=i/n') from None
  task, count, first, step = (values[name] for name in names)
  index, remainder = divmod(task - first, max(step, 1))
  if remainder or not 0 <= index < count:
    raise UserError(f'SLURM array task {task} (min {first}, step {step}, count {count}) is not '
                    'one of an evenly spaced array; pass --cells=i/n (i from 0 to n-1)')
  return index, count


def select_cells(cells: Sequence[Cell], index: int, count: int) -> List[Cell]:
  """Slice `index` of `count`: the cells j with j % count == index."""
  return [cell for j, cell in enumerate(cells) if j % count == index]


# ------------------------------------------------------------------------------------------
# A cell's directory


def _json_safe(value):
  """`value` as JSON would store it (tuples become lists; other objects their repr)."""
  return json.loads(json.dumps(value, default=repr))


def config_differences(saved: dict, wanted: dict,
                       ignored: Sequence[str] = IGNORED_DIFFERENCES) -> List[str]:
  """'field: saved -> wanted' for each leaf that differs, outside `ignored`."""
  return configuration.config_changes(saved, wanted, tuple(ignored))


def evaluation_only_fields(config) -> Tuple[str, ...]:
  """The `eval.*` fields that change only the evaluation (`--reevaluate` may change them)."""
  return tuple(f'eval.{name}' for name in config.eval if name != 'val_every')


def check_cell_config(cell: Cell, root: str, reevaluate: bool = False) -> None:
  """UserError when the cell's directory holds a config.json other than the cell's config
  (`reevaluate`: other than in `evaluation_only_fields`)."""
  path = os.path.join(cell.workdir(root), 'config.json')
  if not os.path.exists(path):
    return
  try:
    with open(path) as handle:
      saved = configuration.upgrade_saved_config(json.load(handle))
  except (OSError, ValueError) as error:
    raise UserError(f'cell {cell.name}: {path} cannot be read ({error}); move that directory '
                    'away to run the cell again') from error
  ignored = IGNORED_DIFFERENCES + (evaluation_only_fields(cell.config) if reevaluate else ())
  changes = config_differences(saved, _json_safe(cell.config.to_dict()), ignored)
  if changes:
    shown = '; '.join(changes[:6]) + (f'; and {len(changes) - 6} more' if len(changes) > 6
                                       else '')
    raise UserError(f'cell {cell.name} in {cell.workdir(root)} was run with other settings than '
                    f'the study now asks (saved -> now: {shown}); restore them in the study file '
                    'or on the command line, or move that directory away to run the cell again')


def _read_json(path: str) -> Optional[dict]:
  try:
    with open(path) as handle:
      value = json.load(handle)
    return value if isinstance(value, dict) else None
  except (OSError, ValueError):
    return None


def finished_results(cell: Cell, root: str) -> Optional[dict]:
  """The cell's eval results of its eval split at its last epoch's checkpoint, or None.

  Read from whichever of eval/results*.json holds them (the driver writes results_<split>.json
  and results.json alike), without importing the evaluation code: a rerun that skips every
  cell stays fast.
  """
  directory = os.path.join(cell.workdir(root), 'eval')
  names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
  for name in names:
    if name.startswith('results') and name.endswith('.json'):
      results = _read_json(os.path.join(directory, name))
      if (results is not None and results.get('split') == cell.config.data.eval_split
          and results.get('checkpoint_step') == cell.config.train.epochs):
        return results
  return None


def diverged_reason(cell: Cell, root: str) -> Optional[str]:
  marker = _read_json(os.path.join(cell.workdir(root), DIVERGED_FILE))
  return None if marker is None else str(marker.get('error', 'diverged'))


def _median(values: Sequence[float]) -> Optional[float]:
  ordered = sorted(values)
  if not ordered:
    return None
  middle = len(ordered) // 2
  return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def run_cell(cell: Cell, root: str) -> CellTiming:
  """Trains the cell (resuming) and evaluates its last checkpoint as `--mode=eval` does.

  Raises what `train.train_and_evaluate` and `driver.evaluate_checkpoint` raise.
  """
  # pylint: disable=g-import-not-at-top
  from pcl_jax import train
  from pcl_jax.evaluation import driver
  # pylint: enable=g-import-not-at-top
  workdir = cell.workdir(root)
  run_files.prepare_workdir(workdir)
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):  # recorded before training starts, as the cell's config
    run_files.write_json_atomic(config_path, cell.config.to_dict())
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  epochs_before = {r.get('epoch') for r in run_files.read_metrics(metrics_path)}
  start = time.perf_counter()
  train.train_and_evaluate(cell.config, workdir)
  results = driver.evaluate_checkpoint(cell.config, workdir, overwrite=True)
  wall = time.perf_counter() - start
  epoch_times = [r['epoch_time_s'] for r in run_files.read_metrics(metrics_path)
                 if r.get('epoch') not in epochs_before and r.get('epoch_time_s') is not None]
  return CellTiming(cell=cell.name, wall_s=wall, train_s=sum(epoch_times),
                    eval_s=float(results.get('timing_s', {}).get('total', 0.0)),
                    first_epoch_s=epoch_times[0] if epoch_times else None,
                    later_epoch_s=_median(epoch_times[1:]))


def reevaluate_cell(cell: Cell, root: str) -> dict:
  """Scores a finished cell's last checkpoint again with its config as the study now builds it;
  config.json then records that config. Returns the new results."""
  from pcl_jax.evaluation import driver  # pylint: disable=g-import-not-at-top
  workdir = cell.workdir(root)
  results = driver.evaluate_checkpoint(cell.config, workdir, cell.config.train.epochs,
                                       overwrite=True)
  run_files.write_json_atomic(os.path.join(workdir, 'config.json'), cell.config.to_dict())
  return results


# ------------------------------------------------------------------------------------------
# The study


def enable_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory`, for every program (none is too small or
  too quick to compile: a cell compiles dozens of small evaluation programs too).

  JAX never caches a program with host callbacks (`runtime.conv_impl=torch`'s convolutions):
  those compile again in every process.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  # pylint: enable=g-import-not-at-top
  directory = os.path.abspath(directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  if jax.config.jax_compilation_cache_dir != directory:
    os.makedirs(directory, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', directory)
    # JAX decides once per process whether a cache is used, at its first compilation: a
    # process that compiled before (a notebook, a test run) decides again.
    compilation_cache.reset_cache()


def _format_value(value) -> str:
  if isinstance(value, bool):
    return 'true' if value else 'false'
  return str(value)


def reproduce_command(study: Study, workdir: str,
                      command_line: Optional[Dict[str, object]] = None) -> str:
  """The command that reruns (or completes) the study."""
  parts = ['python', '-m', 'pcl_jax.study', f'--study={study.file}', f'--workdir={workdir}']
  parts += [f'--config.{key}={_format_value(value)}' for key, value in (command_line or {}).items()]
  return ' '.join(shlex.quote(part) for part in parts)


def study_summary(study: Study, workdir: str,
                  command_line: Optional[Dict[str, object]] = None) -> dict:
  """The report's 'study' entry: what was asked, and how to rerun it."""
  return _json_safe({
      'name': study.name, 'file': study.file, 'config': study.config,
      'overrides': study.overrides, 'variants': study.variants,
      'command_line_overrides': command_line or {},
      'command': reproduce_command(study, workdir, command_line),
  })


def write_study_report(study: Study, cells: Sequence[Cell], root: str,
                       command_line: Optional[Dict[str, object]] = None):
  """Reads every finished cell and writes the report files; returns (paths, missing)."""
  from pcl_jax.study import report as study_report  # pylint: disable=g-import-not-at-top
  metrics, curves, diverged = {}, {}, {}
  for cell in cells:
    reason = diverged_reason(cell, root)
    if reason is not None:
      diverged[cell.name] = reason
      continue
    results = finished_results(cell, root)
    if results is None:
      continue
    records = run_files.read_metrics(os.path.join(cell.workdir(root), 'metrics.jsonl'))
    metrics[(cell.variant, cell.seed)] = study_report.cell_metrics(results, records)
    curves[(cell.variant, cell.seed)] = study_report.validation_curve(records)
  report = study_report.build_report(
      study_summary(study, root, command_line), study.baseline, list(study.variants),
      list(study.seeds), metrics, curves, diverged)
  return study_report.write_report(root, report), report['missing']


def run_study(study: Study, workdir: str, cells: Sequence[Cell],
              selection: Tuple[int, int] = (0, 1),
              compilation_cache: Optional[str] = '',
              command_line: Optional[Dict[str, object]] = None,
              report_only: bool = False, reevaluate: bool = False) -> StudyOutcome:
  """Runs this process's slice of the cells, then writes the report of all finished cells.

  Args:
    study: the study (`load_study`).
    workdir: the study directory; cell directories go under it.
    cells: every cell of the study (`cell_configs`, checked by `validate_cells`).
    selection: (i, n): run slice i of n.
    compilation_cache: directory of JAX's persistent compilation cache; None: WORKDIR/.jax_cache;
      '': leave JAX's setting as it is.
    command_line: the command-line overrides the cells were built with (for the report).
    report_only: run no cell, only write the report.
    reevaluate: score the slice's finished cells again (`reevaluate_cell`) instead of skipping
      them; train the others as usual.
  Returns:
    What happened (`StudyOutcome`; re-scored cells are listed in `reevaluated`).
  Raises:
    UserError: the workdir cannot be written, or a cell's directory holds other settings; and
    what `run_cell` raises, but FloatingPointError (a diverged cell is marked and skipped).
  """
  try:
    run_files.prepare_workdir(workdir)
  except run_files.WorkdirError as error:
    raise UserError(str(error)) from None
  for cell in cells:  # every cell, not only this slice's: never mix settings in one report
    check_cell_config(cell, workdir, reevaluate)
  index, count = selection
  mine = [] if report_only else select_cells(cells, index, count)
  if compilation_cache is None:
    compilation_cache = os.path.join(workdir, CACHE_DIR)
  outcome = StudyOutcome(ran=[], skipped=[], diverged={}, missing=[], timings=[],
                         report_paths=[], reevaluated=[])
  for number, cell in enumerate(mine, 1):
    label = f'cell {number}/{len(mine)} ({cell.name}, slice {index}/{count})'
    reason = diverged_reason(cell, workdir)
    if reason is not None:
      log.info('%s: diverged before, skipped (%s)', label, reason)
      outcome.diverged[cell.name] = reason
      continue
    finished = finished_results(cell, workdir) is not None
    if finished and reevaluate:
      log.info('%s: finished, evaluating it again', label)
      reevaluate_cell(cell, workdir)
      outcome.reevaluated.append(cell.name)
      continue
    if finished:
      log.info('%s: finished, skipped', label)
      outcome.skipped.append(cell.name)
      continue
    log.info('%s: training and evaluating in %s', label, cell.workdir(workdir))
    if compilation_cache:
      enable_compilation_cache(compilation_cache)
    try:
      timing = run_cell(cell, workdir)
    except FloatingPointError as error:
      reason = ' '.join(str(error).split())
      run_files.write_json_atomic(os.path.join(cell.workdir(workdir), DIVERGED_FILE),
                                  {'error': reason})
      log.warning('%s diverged: %s; going on with the other cells', label, reason)
      outcome.diverged[cell.name] = reason
      continue
    outcome.ran.append(cell.name)
    outcome.timings.append(timing)
    log.info('%s: done in %.1fs (training %.1fs and evaluation %.1fs as measured by them; '
             'start-up, compilation and files %.1fs)', label, timing.wall_s, timing.train_s,
             timing.eval_s, timing.overhead_s)
  outcome.report_paths, outcome.missing = write_study_report(study, cells, workdir, command_line)
  diverged = sum(diverged_reason(cell, workdir) is not None for cell in cells)
  log.info('wrote %s (%d of %d cells finished%s%s)', ', '.join(outcome.report_paths),
           len(cells) - len(outcome.missing) - diverged, len(cells),
           f'; {diverged} diverged' if diverged else '',
           f'; missing {", ".join(outcome.missing)}' if outcome.missing else '')
  return outcome


def run_study_file(path: str, workdir: str, overrides: Optional[Dict[str, object]] = None,
                   cells: Optional[str] = None, compilation_cache: Optional[str] = '',
                   report_only: bool = False, reevaluate: bool = False) -> StudyOutcome:
  """The study of file `path`, as the command line runs it, for programs and tests.

  Args:
    path: the study file.
    workdir: the study directory.
    overrides: {dotted field: value} applied last to every cell (the command line's
      `--config.X=V`).
    cells: 'i/n' (None: every cell; SLURM variables are not read here).
    compilation_cache: as `run_study`'s ('' by default here: JAX's setting is left alone).
    report_only: write the report only.
    reevaluate: score finished cells again (`run_study`'s).
  """
  study = load_study(path)
  all_cells = cell_configs(study, overrides)
  validate_cells(all_cells)
  selection = parse_cells(cells) if cells is not None else (0, 1)
  return run_study(study, workdir, all_cells, selection, compilation_cache, overrides,
                   report_only, reevaluate)


# ------------------------------------------------------------------------------------------
# Command line

_parsed = {}  # what parse_flags read: the study and the command line's override paths


def define_flags() -> None:
  """The command line's flags, on absl's global FLAGS (only when run as a program)."""
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from ml_collections import config_flags
  # pylint: enable=g-import-not-at-top
  flags.DEFINE_string('study', None, 'Study file (its get_study() returns the grid).')
  flags.DEFINE_string('workdir', None, 'Study directory: DIR/<variant>/seed<k>/ and DIR/report.*')
  flags.DEFINE_string('cells', None, 'i/n: run slice i of n of the cells (default: the SLURM '
                      'array task\'s slice, else every cell).')
  flags.DEFINE_string('compilation_cache', None, 'JAX persistent compilation cache directory '
                      '(default DIR/.jax_cache; empty: JAX\'s own setting).')
  flags.DEFINE_bool('report_only', False, 'Run no cell; write the report of the finished ones.')
  flags.DEFINE_bool('reevaluate', False, 'Score the finished cells again from their last '
                    'checkpoints with the current evaluation and eval.* settings (no training).')
  flags.DEFINE_bool('verbose', False, 'Show the Python traceback of user errors.')
  # Set from the study file's 'config' by parse_flags; --config.X=V override its fields.
  config_flags.DEFINE_config_file('config', None, 'Set from the study file.', lock_config=True)


def _flag_value(argv, name: str) -> Optional[str]:
  for i, arg in enumerate(argv[1:], 1):
    for prefix in (f'--{name}=', f'-{name}='):
      if arg.startswith(prefix):
        return arg[len(prefix):]
    if arg in (f'--{name}', f'-{name}') and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _override_paths(argv) -> List[str]:
  paths = []
  for arg in argv[1:]:
    match = re.match(r'-{1,2}(?:no)?config\.([\w.]+)', arg)
    if match and match.group(1) not in paths:
      paths.append(match.group(1))
  return paths


def parse_flags(argv):
  """Reads the study file, then absl's flags with the study's config as `--config`, so that
  `--config.X=V` parse (and fail) as they do for `pcl_jax.main`."""
  if any(arg.lstrip('-') in ('help', 'helpfull', 'helpshort', 'h', '?') for arg in argv[1:]):
    return cli.parse_flags(argv)  # absl prints the flags and exits
  verbose = cli.verbose_requested(argv)
  try:
    for arg in argv[1:]:
      if re.match(r'-{1,2}config(=|$)', arg):
        raise UserError('--config is not a flag of a study: the study file names the base '
                        "config ('config'); change fields with --config.SECTION.FIELD=V")
    if 'seed' in _override_paths(argv):
      raise UserError("--config.seed: each cell's seed comes from the study file's 'seeds'; "
                      'list the seeds there')
    _parsed['study'] = load_study(_flag_value(argv, 'study'))
  except UserError as error:
    if verbose:
      raise
    cli.fail(error)
  _parsed['override_paths'] = _override_paths(argv)
  # --config first: absl defines the --config.X=V flags when it parses --config.
  return cli.parse_flags([argv[0], f'--config={_parsed["study"].config}', *argv[1:]])


def _command_line_overrides(config, paths: Sequence[str]) -> Dict[str, object]:
  """{path: value} of the `--config.X=V` flags, as parsed into `config`."""
  overrides = {}
  for path in paths:
    node = config
    for part in path.split('.'):
      node = node[part]
    overrides[path] = node
  return overrides


def main(argv):
  # pylint: disable=g-import-not-at-top
  from absl import flags
  # pylint: enable=g-import-not-at-top
  flag_values = flags.FLAGS
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; settings are flags, e.g. --config.optim.lr=0.03')
  if not flag_values.workdir:
    cli.fail('--workdir=DIR is required (the study directory), e.g. --workdir=runs/my_study')
  cli.setup_logging(flag_values.verbose)
  study = _parsed['study']

  def prepare():
    command_line = _command_line_overrides(flag_values.config, _parsed['override_paths'])
    cells = cell_configs(study, command_line)
    # Before anything starts a JAX backend (validation asks which one runs).
    cli.limit_xla_threads(cells[0].config)
    validate_cells(cells)
    if flag_values.cells is not None:
      selection = parse_cells(flag_values.cells)
    else:
      selection = slurm_slice(os.environ) or (0, 1)
    return command_line, cells, selection

  command_line, cells, selection = cli.run_reporting_errors(prepare, flag_values.verbose)
  cache = flag_values.compilation_cache
  if cache is None and os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    cache = ''  # the user's own setting stays
  outcome = cli.run_reporting_errors(
      lambda: run_study(study, flag_values.workdir, cells, selection, cache, command_line,
                        flag_values.report_only, flag_values.reevaluate), flag_values.verbose)
  print(f'report: {", ".join(outcome.report_paths)}'
        + (f' (missing {len(outcome.missing)} cells)' if outcome.missing else ''), flush=True)
  if outcome.diverged:
    names = ', '.join(outcome.diverged)
    first = next(iter(outcome.diverged.values()))
    cli.fail(f'{len(outcome.diverged)} cell(s) diverged: {names} (first: {first}); the report '
             'leaves them out and reruns skip them; delete a cell\'s directory to train it again',
             cli.DIVERGED_STATUS)

