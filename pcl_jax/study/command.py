r"""The command line of a study: `python -m pcl_jax.study` (DESIGN.md section 3).

  python -m pcl_jax.study --study=configs/studies/example_digits.py --workdir=/tmp/study
  python -m pcl_jax.study --study=FILE --workdir=DIR --cells=1/4 --config.train.epochs=50

This module owns the study's flags and how they become a run of `runner.run_study`: the study
file is read first (`parse_flags`), so that absl parses `--config.X=V` against its base config
as `pcl_jax.main` does (`run.cli` parses them and reads their values back); `--config.X=V`
apply to every cell, last (`cells.cell_configs`). `--config` itself is refused (the study file
names the base config), and so is `--config.seed` (the seeds are the study's). Without
`--cells=i/n` a SLURM array task runs its slice (`cells.slurm_slice`), another process every
cell.

Exit status as `pcl_jax.main`'s: 2 with one `error: ...` line for a user error (a bad study
file, field, value or cell directory), 3 when a cell diverged (after the others ran and the
report was written), 128 + signal when stopped (rerun to resume).
"""

import os
import re

from absl import flags

from pcl_jax.configuration import UserError
from pcl_jax.run import cli
from pcl_jax.study import cells as study_cells
from pcl_jax.study import runner
from pcl_jax.study import spec

HELP_FLAGS = ('help', 'helpfull', 'helpshort', 'h', '?')

# What parse_flags read for main: the study and the command line's {field path: value}.
_parsed = {}


def define_flags() -> None:
  """The command line's flags, on absl's global FLAGS (only when run as a program)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
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


def _check_config_flags(argv) -> None:
  """UserError for the `--config` flags a study does not take."""
  for arg in argv[1:]:
    if re.match(r'-{1,2}config(=|$)', arg):
      raise UserError('--config is not a flag of a study: the study file names the base '
                      "config ('config'); change fields with --config.SECTION.FIELD=V")
  if 'seed' in cli.override_paths(argv):
    raise UserError("--config.seed: each cell's seed comes from the study file's 'seeds'; "
                    'list the seeds there')


def parse_flags(argv):
  """Reads the study file, then absl's flags with the study's config as `--config`, so that
  `--config.X=V` parse (and fail) as they do for `pcl_jax.main`."""
  if any(arg.lstrip('-') in HELP_FLAGS for arg in argv[1:]):
    return cli.parse_flags(argv)  # absl prints the flags and exits
  try:
    _check_config_flags(argv)
    study = spec.load_study(cli.flag_value(argv, 'study'))
  except UserError as error:
    if cli.verbose_requested(argv):
      raise
    cli.fail(error)
  # --config first: absl defines the --config.X=V flags when it parses --config.
  remaining = cli.parse_flags([argv[0], f'--config={study.config}', *argv[1:]])
  _parsed['study'] = study
  _parsed['command_line'] = cli.config_overrides(argv, flags.FLAGS.config)
  return remaining


def main(argv):
  flag_values = flags.FLAGS
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; settings are flags, e.g. --config.optim.lr=0.03')
  if not flag_values.workdir:
    cli.fail('--workdir=DIR is required (the study directory), e.g. --workdir=runs/my_study')
  cli.setup_logging(flag_values.verbose)
  study, command_line = _parsed['study'], _parsed['command_line']

  def prepare():
    cells = study_cells.cell_configs(study, command_line)
    # Before anything starts a JAX backend (validation asks which one runs).
    cli.limit_xla_threads(cells[0].config)
    study_cells.validate_cells(cells)
    if flag_values.cells is not None:
      selection = study_cells.parse_cells(flag_values.cells)
    else:
      selection = study_cells.slurm_slice(os.environ) or (0, 1)
    return cells, selection

  cells, selection = cli.run_reporting_errors(prepare, flag_values.verbose)
  cache = flag_values.compilation_cache
  if cache is None and os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    cache = ''  # the user's own setting stays
  outcome = cli.run_reporting_errors(
      lambda: runner.run_study(study, flag_values.workdir, cells, selection, cache, command_line,
                               flag_values.report_only, flag_values.reevaluate),
      flag_values.verbose)
  print(f'report: {", ".join(outcome.report_paths)}'
        + (f' (missing {len(outcome.missing)} cells)' if outcome.missing else ''), flush=True)
  if outcome.diverged:
    names = ', '.join(outcome.diverged)
    first = next(iter(outcome.diverged.values()))
    cli.fail(f'{len(outcome.diverged)} cell(s) diverged: {names} (first: {first}); the report '
             'leaves them out and reruns skip them; delete a cell\'s directory to train it again',
             cli.DIVERGED_STATUS)
