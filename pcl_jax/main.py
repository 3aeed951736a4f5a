r"""Command-line entry point. Intentionally thin: the logic lives in testable libraries.

  python -m pcl_jax.main --config=configs/digits.py --workdir=/tmp/pcl_digits
  python -m pcl_jax.main --config=configs/digits.py --workdir=/tmp/pcl_digits --mode=eval

Every mistake a user can make on the command line or in a config (a bad flag, an unknown or
mistyped field, a missing file, a bad value, unusable data or checkpoint) ends the run with one
line `error: ...` on stderr naming the setting and the fix, and exit status 2; `--verbose` shows
the traceback instead. Exit status 3: training diverged (non-finite loss, features or state; the
last good checkpoint is kept). 128 + signal number: stopped by SIGTERM/SIGINT after saving a
checkpoint; rerunning the same command resumes.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from pcl_jax import configuration
from pcl_jax.run import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, results).')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Train (resuming) or evaluate.')
flags.DEFINE_integer('step', None, 'Eval: the checkpoint (epochs done) to evaluate; default latest.')
flags.DEFINE_bool('overwrite', False, 'Eval: replace an existing WORKDIR/eval/results.json.')
flags.DEFINE_bool('best', False, 'Eval: the best-by-validation checkpoint (checkpoints_best/).')
flags.DEFINE_string('coordinator_address', None,
                    'Multi-host: host:port of process 0 (omit to let JAX detect the cluster).')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process (0 .. num_processes-1).')
flags.DEFINE_bool('verbose', False, 'Show the Python traceback of user errors.')
flags.mark_flags_as_required(['config', 'workdir'])


def _run(config, workdir, schedule):
  # pylint: disable=g-import-not-at-top
  if FLAGS.mode == 'train':
    from pcl_jax import train
    train.train_and_evaluate(config, workdir, schedule=schedule)
  else:
    from pcl_jax.evaluation import driver
    driver.evaluate_checkpoint(config, workdir, epochs_done=FLAGS.step,
                               overwrite=FLAGS.overwrite, best=FLAGS.best)


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; settings are flags, e.g. --config.optim.lr=0.03')
  cli.setup_logging(FLAGS.verbose)
  # pylint: disable=g-import-not-at-top
  from pcl_jax import clustering
  from pcl_jax.run import parallel
  from pcl_jax.run import files as run_files
  from pcl_jax.kernels import host_threads
  # pylint: enable=g-import-not-at-top
  # Before anything touches a JAX backend (validation asks which one runs): a multi-host run
  # meets its peers here.
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  # Also before the backends start: the size of XLA's CPU thread pool (host_threads).
  cli.limit_xla_threads(FLAGS.config)
  try:
    # Before importing torch and the data pipeline: a bad value fails within a second or two.
    schedule = configuration.validate(FLAGS.config)
    clustering.check_settings(FLAGS.config)
    host_threads.log_choice()
    if FLAGS.mode == 'train':
      # Not the lock: in a multi-host run only process 0 takes it, once JAX knows which it is.
      run_files.prepare_workdir(FLAGS.workdir)
  except (configuration.UserError, run_files.WorkdirError) as error:
    if FLAGS.verbose:
      raise
    cli.fail(error)
  cli.run_reporting_errors(lambda: _run(FLAGS.config, FLAGS.workdir, schedule), FLAGS.verbose)


if __name__ == '__main__':
  # Before anything starts a thread that allocates (XLA's CPU pool): see host_memory's docstring.
  # The program tunes its own process; importing pcl_jax as a library changes nothing.
  from pcl_jax.kernels import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.tune_malloc()
  app.run(main, flags_parser=cli.parse_flags)
