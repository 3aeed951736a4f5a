r"""Command-line entry point. Intentionally thin: the logic lives in testable libraries.

  python -m pcl_jax.main --config=configs/digits.py --workdir=/tmp/pcl_digits
  python -m pcl_jax.main --config=configs/digits.py --workdir=/tmp/pcl_digits --mode=eval
"""

import logging as py_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, results).')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Train (resuming) or evaluate.')
flags.DEFINE_integer('step', None, 'Eval: the checkpoint (epochs done) to evaluate; default latest.')
flags.DEFINE_bool('overwrite', False, 'Eval: replace an existing WORKDIR/eval/results.json.')
flags.DEFINE_bool('best', False, 'Eval: the best-by-validation checkpoint (checkpoints_best/).')
flags.DEFINE_bool('verbose', False, 'Show the Python traceback of user errors.')
flags.mark_flags_as_required(['config', 'workdir'])


def _run(config, workdir):
  from pcl_jax import train  # pylint: disable=g-import-not-at-top
  if FLAGS.mode == 'train':
    train.train_and_evaluate(config, workdir)
  else:
    from pcl_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate_checkpoint(config, workdir, epochs_done=FLAGS.step,
                                 overwrite=FLAGS.overwrite, best=FLAGS.best)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Orbax and XLA log every file operation at INFO through absl; keep absl at WARNING and give
  # the project's own loggers (pcl_jax.*) INFO on stderr.
  logging.set_verbosity(logging.WARNING)
  handler = py_logging.StreamHandler(sys.stderr)
  handler.setFormatter(py_logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
  project_logger = py_logging.getLogger('pcl_jax')
  project_logger.addHandler(handler)
  project_logger.setLevel(py_logging.INFO)
  project_logger.propagate = False
  from pcl_jax import configuration  # pylint: disable=g-import-not-at-top
  try:
    _run(FLAGS.config, FLAGS.workdir)
  except (configuration.UserError, FileNotFoundError) as error:
    if FLAGS.verbose:
      raise
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
