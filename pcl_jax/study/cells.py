r"""A study's cells: their configs, which of them this process runs, and what their directories say.

This module owns the cells of a study (docs/studies.md): `Cell`, one (variant, seed) and its
config, built (`cell_configs`) from the base config, then the study's `overrides`, then its
variant's (which win over `overrides`), then `seed`, then the command line's `--config.X=V`
(applied last, to every cell: they win over everything in the study file); checking them
(`validate_cells`); and the bookkeeping of a cell's directory DIR/<variant>/seed<k>/.

Cells come in a fixed order (variants in file order, each over the seeds in order); cell j
belongs to slice j % n of `--cells=i/n` (`parse_cells`, `select_cells`). A SLURM array task's
slice is (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP of
SLURM_ARRAY_TASK_COUNT (`slurm_slice`). A cell with eval results of its last epoch is finished
(`finished_results`); one that diverged holds diverged.json (`mark_diverged`,
`diverged_reason`). A cell whose config.json differs from what the study now asks (outside
`IGNORED_DIFFERENCES`) is refused with one error line naming it and the fields
(`check_cell_config`). Reading a cell's files imports neither jax nor the evaluation code: a
rerun that skips every cell stays fast.
"""

import dataclasses
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import ml_collections

from pcl_jax import configuration
from pcl_jax.configuration import UserError
from pcl_jax.run import files as run_files
from pcl_jax.study import spec

# Settings that change how a cell computes, not what: a finished or resumed cell may differ
# in them from the study (another machine, other kernels or loader workers).
IGNORED_DIFFERENCES = ('runtime', 'data.num_workers', 'data.cache_dir')
DIVERGED_FILE = 'diverged.json'


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


def cell_configs(study: spec.Study, command_line: Optional[Dict[str, object]] = None,
                 base: Optional[ml_collections.ConfigDict] = None) -> List[Cell]:
  """Every cell of the study in the study's order, its config built as the module docstring
  says. Fields are checked (`configuration.check_fields`), values not yet (`validate_cells`:
  it may start a JAX backend)."""
  where = f'--study={study.file}'
  base = spec.load_config(study.config, where) if base is None else base
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


def json_safe(value):
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
  changes = config_differences(saved, json_safe(cell.config.to_dict()), ignored)
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


def mark_diverged(cell: Cell, root: str, reason: str) -> None:
  """Records in the cell's directory that its training diverged, and why."""
  run_files.write_json_atomic(os.path.join(cell.workdir(root), DIVERGED_FILE), {'error': reason})


def diverged_reason(cell: Cell, root: str) -> Optional[str]:
  """Why the cell diverged (`mark_diverged`), or None when it did not."""
  marker = _read_json(os.path.join(cell.workdir(root), DIVERGED_FILE))
  return None if marker is None else str(marker.get('error', 'diverged'))
