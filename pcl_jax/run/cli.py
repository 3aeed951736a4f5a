"""What the command-line entry points (`pcl_jax.main`, `pcl_jax.study`, `evaluation.score`) share.

This module owns how a user's mistake reaches the terminal: one line `error: ...` on stderr and
exit status 2 (`fail`); absl flag parsing, which runs the `--config` file and applies its
`--config.*` overrides, with every failure said in one such line (`parse_flags`); reading argv
around that parsing: a flag's value before it (`flag_value`), the `--config.*` overrides' field
paths (`override_paths`) and, after it, their parsed values (`config_overrides`); the logging
set-up of a run (`setup_logging`); and the mapping of what a run raises to a line and an exit
status (`run_reporting_errors`: 2 user error, 3 diverged, 128 + signal when stopped). It defines
no flags: each entry point defines its own on absl's global `FLAGS`, including `config` and
`verbose`, and imports neither jax nor torch at module level.
"""

import logging as py_logging
import os
import re
import sys
import threading
from typing import Callable, Dict, List, Optional

from absl import flags
from absl import logging
import ml_collections

from pcl_jax import configuration

FLAGS = flags.FLAGS

USER_ERROR_STATUS = 2
DIVERGED_STATUS = 3


def fail(message: str, status: int = USER_ERROR_STATUS, prefix: str = 'error') -> None:
  """Prints `prefix: message` as one line on stderr and exits with `status`."""
  one_line = ' '.join(str(message).split())
  tqdm_module = sys.modules.get('tqdm')
  try:  # a progress bar cut short by the error would otherwise prefix the message's line
    for bar in list(getattr(tqdm_module.tqdm, '_instances', ())) if tqdm_module else ():
      bar.close()
  except Exception:  # pylint: disable=broad-except
    pass
  print(f'{prefix}: {one_line}', file=sys.stderr, flush=True)
  # Work abandoned by the error (e.g. Orbax's pending reads of a checkpoint that did not fit)
  # would print 'Exception ignored' tracebacks at exit; the line above has said what matters.
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None
  sys.exit(status)


def _not_an_orbax_error(record: py_logging.LogRecord) -> bool:
  return not (record.levelno >= py_logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname)


def verbose_requested(argv) -> bool:
  return any(arg in ('--verbose', '-verbose', '--verbose=true', '--verbose=True')
             for arg in argv[1:])


def flag_value(argv, name: str) -> Optional[str]:
  """The value of flag `name` in argv (`--name=V`, `-name=V`, `--name V`), or None; read before
  absl parses argv, to check or load what the flag names first."""
  for i, arg in enumerate(argv[1:], 1):
    for prefix in (f'--{name}=', f'-{name}='):
      if arg.startswith(prefix):
        return arg[len(prefix):]
    if arg in (f'--{name}', f'-{name}') and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_argument(argv):
  """The value of --config in argv, without config_flags' `:args` suffix."""
  value = flag_value(argv, 'config')
  return None if value is None else value.split(':', 1)[0]


_OVERRIDE = re.compile(r'-{1,2}(?:no)?config\.([\w.]+)')


def override_paths(argv) -> List[str]:
  """The field paths of argv's `--config.X=V` overrides (`--noconfig.X` too), in argv's order,
  each once."""
  paths = []
  for arg in argv[1:]:
    match = _OVERRIDE.match(arg)
    if match and match.group(1) not in paths:
      paths.append(match.group(1))
  return paths


def config_overrides(argv, config: ml_collections.ConfigDict) -> Dict[str, object]:
  """{field path: value} of argv's `--config.X=V` overrides, the values as `parse_flags` parsed
  them into `config` (FLAGS.config)."""
  overrides = {}
  for path in override_paths(argv):
    node = config
    for part in path.split('.'):
      node = node[part]
    overrides[path] = node
  return overrides


def _check_config_path(argv) -> None:
  """A missing or unreadable --config file, said plainly (config_flags defers and buries it)."""
  path = _config_argument(argv)
  if path is None or path == '':
    return  # absl reports the missing required flag
  if os.path.isdir(path):
    fail(f'--config={path} is a directory; pass a config file such as configs/digits.py')
  if not os.path.isfile(path):
    fail(f'--config={path}: no such file (relative paths start at {os.getcwd()}); pass a config '
          'file such as configs/digits.py')


def _override_path(argv, key: str) -> str:
  """The `--config.a.b` override in argv whose path contains the field `key`."""
  return next((path for path in override_paths(argv) if key in path.split('.')), key)


def _flag_error_message(error: BaseException, argv) -> str:
  """One line naming the flag or config field behind an error raised while parsing flags."""
  text = str(error)
  config_path = _config_argument(argv)
  if isinstance(error, (KeyError, AttributeError)) and 'get_config' in text:
    return (f'--config={config_path} defines no get_config(); a config file must define '
            'get_config() returning a ConfigDict (see configs/digits.py)')
  if isinstance(error, (KeyError, AttributeError)):
    # ml_collections: "'lrr'\nDid you mean "lr" instead of "lrr"?" for an unknown field.
    names = re.findall(r"'([\w]+)'", text.replace('\\', ''))
    if names:
      key = names[0]
      suggestion = re.search(r'Did you mean "([\w]+)"', text)
      path = _override_path(argv, key)
      hint = ''
      if suggestion:
        hint = f' (did you mean --config.{path.rsplit(key, 1)[0]}{suggestion.group(1)}?)'
      moved = configuration.MOVED_FIELDS.get(path)
      if moved:
        hint = f' (it is now --config.{moved})'
      return (f'--config.{path}: the config has no field {key!r}{hint}; configs/default.py lists '
              'every field')
  if 'Error whilst parsing config file' in text:
    # config_flags wraps errors raised by the file's get_config() with their traceback text.
    lines = [line for line in text.splitlines() if line.strip()]
    return f'--config={config_path} failed to load: {lines[-1].strip()}'
  if isinstance(error, flags.Error):
    if 'must have a value other than None' in text:
      if config_path and '--config=None' in text:
        return (f'--config={config_path}: get_config() returned None; make it return the '
                'ConfigDict')
      return ('--config and --workdir are required, e.g. --config=configs/digits.py '
              '--workdir=runs/digits')
    match = re.match(r'flag (--config\.[\w.]+=.*?): (.*)$', text, re.S)
    if match:  # a --config.* override that does not parse as the field's type
      reason = match.group(2).strip()
      if 'Non-boolean argument' in reason:
        reason = 'not a boolean (use true or false)'
      return (f'{match.group(1)}: {reason}; give a value of the field\'s type '
              '(configs/default.py shows each field)')
    return text + ('' if 'Did you mean' in text else '; see --helpfull for the flags')
  if isinstance(error, OSError) and config_path is not None:
    lines = [line for line in text.splitlines() if line.strip()]
    return f'--config={config_path} cannot be read ({lines[-1].strip()})'
  first = text.strip().splitlines()[0] if text.strip() else ''
  return f'--config={config_path} failed to load: {type(error).__name__}: {first}'


def parse_flags(argv):
  """absl's flag parsing, with every failure turned into one `error:` line and status 2.

  Parsing runs the config file and applies `--config.*` overrides, so the user's typos surface
  here, before `main`: unknown fields, wrong types, a missing file, no get_config().
  """
  verbose = verbose_requested(argv)
  if not verbose:
    _check_config_path(argv)
  # config_flags warns through absl logging before flags exist; the error below says it all.
  absl_logger = py_logging.getLogger('absl')
  absl_level = absl_logger.level
  absl_logger.setLevel(py_logging.ERROR)
  try:
    remaining = FLAGS(argv)
    config = FLAGS.config
    if not isinstance(config, ml_collections.ConfigDict):
      try:
        _ = config.data  # config_flags defers load errors until the config is first touched
      except OSError:
        raise
      except Exception:  # pylint: disable=broad-except
        pass
      fail(f'--config={_config_argument(argv)}: get_config() returned '
            f'{type(config).__name__}, not a ConfigDict; make it return the config')
  except Exception as error:  # pylint: disable=broad-except
    if verbose:
      raise
    fail(_flag_error_message(error, argv))
  finally:
    absl_logger.setLevel(absl_level)
  return remaining


def setup_logging(verbose: bool) -> None:
  """absl at WARNING (Orbax and XLA log every file operation at INFO through it); the project's
  own loggers (pcl_jax.*) at INFO on stderr."""
  logging.set_verbosity(logging.WARNING)
  if not verbose:
    # Orbax logs the failures of its background threads at ERROR, then raises them again in the
    # caller, where they become one `error:` line (or, for a damaged checkpoint, a warning).
    logging.get_absl_handler().addFilter(_not_an_orbax_error)
  handler = py_logging.StreamHandler(sys.stderr)
  handler.setFormatter(py_logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
  project_logger = py_logging.getLogger('pcl_jax')
  project_logger.addHandler(handler)
  project_logger.setLevel(py_logging.INFO)
  project_logger.propagate = False


def limit_xla_threads(config) -> None:
  """Before the JAX backends start: XLA's CPU thread count for `config` (kernels/host_threads).
  A malformed config is left to validation, which names what is wrong."""
  from pcl_jax.kernels import host_threads  # pylint: disable=g-import-not-at-top
  try:
    runtime = config.runtime
    host_threads.limit_xla_threads(runtime.conv_impl, config.model.arch, runtime.xla_cpu_threads)
  except (AttributeError, KeyError, TypeError):
    pass


def run_reporting_errors(run: Callable[[], object], verbose: bool):
  """Returns `run()`; what it raises ends the process with one line and an exit status.

  UserError or a missing file: `error:`, status 2. FloatingPointError (diverged): `error:`,
  status 3. TrainingInterrupted: `stopped:`, 128 + signal. Ctrl-C: `stopped:`, 130. A full or
  read-only disk (`run_files.storage_failure`): `error:`, status 2. Anything else propagates (a
  bug: its traceback is wanted). `verbose` re-raises user errors with their traceback.
  """
  # pylint: disable=g-import-not-at-top
  from pcl_jax.run import files as run_files
  from pcl_jax.run import stop
  # pylint: enable=g-import-not-at-top
  try:
    return run()
  except (configuration.UserError, run_files.WorkdirError, FileNotFoundError) as error:
    if verbose:
      raise
    fail(error)
  except FloatingPointError as error:
    if verbose:
      raise
    fail(error, DIVERGED_STATUS)
  except stop.TrainingInterrupted as error:
    fail(error, 128 + error.signum if error.signum else 1, prefix='stopped')
  except KeyboardInterrupt:
    if verbose:
      raise
    fail('interrupted; checkpoints on disk are intact: rerun the same command to resume from '
         'the latest', 128 + 2, prefix='stopped')
  except Exception as error:  # pylint: disable=broad-except
    failure = None if verbose else run_files.storage_failure(error)
    if failure is None:
      raise
    code, path = failure
    where = f' writing {path}' if path else ''
    fail(f'{os.strerror(code)}{where}; free space or fix permissions, then rerun (the files '
         'already written are intact; training resumes from its latest checkpoint)')
