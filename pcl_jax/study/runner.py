r"""Running a study: this process's cells one after another, then the report of all finished ones.

This module owns running a study (docs/studies.md): checking every cell's directory against
its config, training and evaluating this process's slice of the cells in order, marking the
ones that diverge and going on with the others, and handing the finished cells' numbers to
`report` (which writes DIR/report.json, report.md, report.png). What a cell computes is
`train.train_and_evaluate` and `evaluation.driver.evaluate_checkpoint`, exactly as
`python -m pcl_jax.main` (train, then `--mode=eval`) would run them on DIR/<variant>/seed<k>/.
The study file is `spec`'s, the cells and their directories `cells`', the command line
`command`'s.

A finished cell is skipped; another one resumes from its checkpoints. A diverged cell is left
out of the report and not retried by reruns. Every process writes the report from the cells
finished so far, listing the missing ones.

`reevaluate` scores the finished cells of the slice again from their last checkpoints, with
the evaluation's current code and the study's `eval.*` settings, without training (e.g. after
the evaluation protocol changed, or with `--config.eval.kmeans_runs=20`); their `eval.*` fields
(all but `eval.val_every`, which changes what training records) may then differ from the saved
ones, and config.json is rewritten with the settings the new results were made with.

JAX's persistent compilation cache (DIR/.jax_cache unless `--compilation_cache` says otherwise)
lets every cell after the first, and every later process (array tasks, reruns), load the
programs the first one compiled instead of compiling them again.
"""

import dataclasses
import logging
import os
import shlex
import time
from typing import Dict, List, Optional, Sequence, Tuple

from pcl_jax.configuration import UserError
from pcl_jax.run import files as run_files
from pcl_jax.study import cells as study_cells
from pcl_jax.study import spec

log = logging.getLogger(__name__)

CACHE_DIR = '.jax_cache'


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
# A cell


def _median(values: Sequence[float]) -> Optional[float]:
  ordered = sorted(values)
  if not ordered:
    return None
  middle = len(ordered) // 2
  return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def run_cell(cell: study_cells.Cell, root: str) -> CellTiming:
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


def reevaluate_cell(cell: study_cells.Cell, root: str) -> dict:
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


def reproduce_command(study: spec.Study, workdir: str,
                      command_line: Optional[Dict[str, object]] = None) -> str:
  """The command that reruns (or completes) the study."""
  parts = ['python', '-m', 'pcl_jax.study', f'--study={study.file}', f'--workdir={workdir}']
  parts += [f'--config.{key}={_format_value(value)}' for key, value in (command_line or {}).items()]
  return ' '.join(shlex.quote(part) for part in parts)


def study_summary(study: spec.Study, workdir: str,
                  command_line: Optional[Dict[str, object]] = None) -> dict:
  """The report's 'study' entry: what was asked, and how to rerun it."""
  return study_cells.json_safe({
      'name': study.name, 'file': study.file, 'config': study.config,
      'overrides': study.overrides, 'variants': study.variants,
      'command_line_overrides': command_line or {},
      'command': reproduce_command(study, workdir, command_line),
  })


def write_study_report(study: spec.Study, cells: Sequence[study_cells.Cell], root: str,
                       command_line: Optional[Dict[str, object]] = None):
  """Reads every finished cell and writes the report files; returns (paths, missing)."""
  from pcl_jax.study import report as study_report  # pylint: disable=g-import-not-at-top
  metrics, curves, diverged = {}, {}, {}
  for cell in cells:
    reason = study_cells.diverged_reason(cell, root)
    if reason is not None:
      diverged[cell.name] = reason
      continue
    results = study_cells.finished_results(cell, root)
    if results is None:
      continue
    records = run_files.read_metrics(os.path.join(cell.workdir(root), 'metrics.jsonl'))
    metrics[(cell.variant, cell.seed)] = study_report.cell_metrics(results, records)
    curves[(cell.variant, cell.seed)] = study_report.validation_curve(records)
  report = study_report.build_report(
      study_summary(study, root, command_line), study.baseline, list(study.variants),
      list(study.seeds), metrics, curves, diverged)
  return study_report.write_report(root, report), report['missing']


def run_study(study: spec.Study, workdir: str, cells: Sequence[study_cells.Cell],
              selection: Tuple[int, int] = (0, 1),
              compilation_cache: Optional[str] = '',
              command_line: Optional[Dict[str, object]] = None,
              report_only: bool = False, reevaluate: bool = False) -> StudyOutcome:
  """Runs this process's slice of the cells, then writes the report of all finished cells.

  Args:
    study: the study (`spec.load_study`).
    workdir: the study directory; cell directories go under it.
    cells: every cell of the study (`cells.cell_configs`, checked by `cells.validate_cells`).
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
    study_cells.check_cell_config(cell, workdir, reevaluate)
  index, count = selection
  mine = [] if report_only else study_cells.select_cells(cells, index, count)
  if compilation_cache is None:
    compilation_cache = os.path.join(workdir, CACHE_DIR)
  outcome = StudyOutcome(ran=[], skipped=[], diverged={}, missing=[], timings=[],
                         report_paths=[], reevaluated=[])
  for number, cell in enumerate(mine, 1):
    label = f'cell {number}/{len(mine)} ({cell.name}, slice {index}/{count})'
    reason = study_cells.diverged_reason(cell, workdir)
    if reason is not None:
      log.info('%s: diverged before, skipped (%s)', label, reason)
      outcome.diverged[cell.name] = reason
      continue
    finished = study_cells.finished_results(cell, workdir) is not None
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
      study_cells.mark_diverged(cell, workdir, reason)
      log.warning('%s diverged: %s; going on with the other cells', label, reason)
      outcome.diverged[cell.name] = reason
      continue
    outcome.ran.append(cell.name)
    outcome.timings.append(timing)
    log.info('%s: done in %.1fs (training %.1fs and evaluation %.1fs as measured by them; '
             'start-up, compilation and files %.1fs)', label, timing.wall_s, timing.train_s,
             timing.eval_s, timing.overhead_s)
  outcome.report_paths, outcome.missing = write_study_report(study, cells, workdir, command_line)
  diverged = sum(study_cells.diverged_reason(cell, workdir) is not None for cell in cells)
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
  study = spec.load_study(path)
  all_cells = study_cells.cell_configs(study, overrides)
  study_cells.validate_cells(all_cells)
  selection = study_cells.parse_cells(cells) if cells is not None else (0, 1)
  return run_study(study, workdir, all_cells, selection, compilation_cache, overrides,
                   report_only, reevaluate)
