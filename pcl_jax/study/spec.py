r"""A study file: its schema, loading it, and checking what its get_study() returns.

This module owns what a study file may say (docs/studies.md): a Python file, loaded by path,
whose `get_study()` returns {'config': base config path (relative to the current directory, or
absolute), 'overrides': {dotted field: value} for every cell (optional), 'variants': {name:
{dotted field: value}}, 'baseline': a variant's name, 'seeds': [int, ...]}. `load_study` reads
and checks one into a `Study`, naming the first problem in one UserError; `load_config` reads a
config file's get_config() the same way. Whether an override's field exists in the config is
the cells' check (`cells.apply_overrides`); here only its shape (a dotted path, never `seed`).
It imports neither jax nor torch: a bad study file fails before either loads.
"""

import dataclasses
import difflib
import importlib.util
import os
import re
from typing import Dict, Tuple

import ml_collections

from pcl_jax.configuration import UserError

STUDY_KEYS = ('config', 'overrides', 'variants', 'baseline', 'seeds')
REQUIRED_KEYS = ('config', 'variants', 'baseline', 'seeds')
# A variant's name is a directory name beside the report's files in the study directory.
VARIANT_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$')
REPORT_FILES = ('report.json', 'report.md', 'report.png')  # report.write_report's, no variant's
FIELD_PATH = re.compile(r'^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$')


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
