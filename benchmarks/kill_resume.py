r"""Kill the trainer anywhere, resume, and check that nothing is lost or corrupted.

  python benchmarks/kill_resume.py                   # 20 trials, configs/test.py, 6 epochs
  python benchmarks/kill_resume.py --trials 3 --epochs 3

Runs `python -m pcl_jax.main` once uninterrupted (the reference), then again into another
workdir, killing it at chosen moments and rerunning the same command each time until it
finishes; when a run completes before its next kill, it is compared and a fresh one starts, until
`--trials` kills are done. The moments rotate through:
  checkpoint  SIGKILL while Orbax writes a checkpoint (a `*.orbax-checkpoint-tmp*` dir exists);
  estep       SIGKILL in the E-step (after an epoch's summary, before the next E-step's log);
  step        SIGKILL between or inside M-steps (after a step of the current run);
  sigterm     SIGTERM at a step: the trainer must save, exit with 143 and say so;
  random      SIGKILL after a uniform random delay over the reference run's duration.
After every kill each listed checkpoint is restored: one that fails counts as corrupted. Each
finished run's metrics.jsonl (timings excepted) and final checkpoint arrays are compared with
the reference run's. Prints trials, corrupted checkpoints (must be 0), and the maximum
parameter and metric differences (must be within --tolerance); exit status 0 when all hold.
"""

import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PHASES = ('checkpoint', 'estep', 'step', 'sigterm', 'random')
# Per-run quantities that legitimately differ between runs.
TIMING_FIELDS = ('epoch_time_s', 'images_per_s', 'estep_features_s', 'estep_clustering_s',
                 'estep_s')
TMP_MARK = '.orbax-checkpoint-tmp'
_SUMMARY = re.compile(r'^epoch (\d+): loss_inst', re.M)
_STEP_PROGRESS = re.compile(r'epoch (\d+):\s+\d+%\|[^|]*\|\s*([1-9]\d*)/')
_ESTEP_DONE = re.compile(r'E-step epoch (\d+)')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--trials', type=int, default=20, help='kills (default 20)')
  parser.add_argument('--config', default='configs/test.py', help='config file')
  parser.add_argument('--epochs', type=int, default=6, help='train.epochs of both runs')
  parser.add_argument('--override', action='append', default=[],
                      help='extra --config.* flag for both runs (repeatable)')
  parser.add_argument('--phases', default=','.join(PHASES),
                      help=f'kill moments to rotate through (from {",".join(PHASES)})')
  parser.add_argument('--seed', type=int, default=0, help='seed of the kill timing')
  parser.add_argument('--tolerance', type=float, default=1e-5,
                      help='max allowed |difference| of parameters and metrics')
  parser.add_argument('--workdir', default='', help='where the two runs go (default: a temp dir)')
  parser.add_argument('--keep', action='store_true', help='keep the run directories')
  parser.add_argument('--compile-cache', default='',
                      help='JAX persistent compilation cache dir shared by all launches '
                      '(default: under --workdir; "off" disables it)')
  parser.add_argument('--timeout', type=float, default=600, help='seconds per launch')
  parser.add_argument('--json', default='', help='also write the results here')
  return parser.parse_args(argv)


def _child_env(cache_dir):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  if cache_dir:
    # Each relaunch would otherwise recompile everything; cached executables are the same code.
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


class Launch:
  """One `python -m pcl_jax.main` process with its stdout/stderr in files."""

  def __init__(self, args, workdir, log_prefix, env):
    self.workdir = workdir
    self.out_path, self.err_path = log_prefix + '.out', log_prefix + '.err'
    command = [sys.executable, '-m', 'pcl_jax.main', f'--config={args.config}',
               f'--workdir={workdir}', f'--config.train.epochs={args.epochs}',
               *args.override]
    with open(self.out_path, 'w') as out, open(self.err_path, 'w') as err:
      self.process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err, env=env)
    self.start = time.monotonic()

  def alive(self) -> bool:
    return self.process.poll() is None

  def stdout(self) -> str:
    with open(self.out_path, errors='replace') as handle:
      return handle.read()

  def stderr(self) -> str:
    with open(self.err_path, errors='replace') as handle:
      return handle.read()

  def wait(self, timeout) -> int:
    return self.process.wait(timeout=timeout)


def _tmp_dirs(workdir):
  return glob.glob(os.path.join(workdir, 'checkpoints*', f'*{TMP_MARK}*'))


def _state(launch):
  """What the child is doing now, from its logs and checkpoint directory."""
  if _tmp_dirs(launch.workdir):
    return 'checkpoint'
  out, err = launch.stdout(), launch.stderr()
  summaries = [int(e) for e in _SUMMARY.findall(out)]
  esteps = [int(e) for e in _ESTEP_DONE.findall(err)]
  steps = _STEP_PROGRESS.findall(err)
  if summaries and (not steps or int(steps[-1][0]) <= summaries[-1]):
    next_epoch = summaries[-1] + 1
    return 'estep' if next_epoch not in esteps else 'step'
  if steps:
    return 'step'
  return 'startup'


def _wait_for(launch, predicate, deadline, poll_s=0.002):
  """Polls until predicate() is true (returns True) or the child exits/deadline passes."""
  while launch.alive() and time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(poll_s)
  return False


def _kill_moment(launch, phase, rng, args, reference_s):
  """Waits for the phase's moment; returns True if the child is still alive to be killed."""
  deadline = time.monotonic() + args.timeout
  if phase == 'checkpoint':
    # The first write of this launch: 0-20 ms into it, so some kills land mid-write.
    if not _wait_for(launch, lambda: bool(_tmp_dirs(launch.workdir)), deadline):
      return False
    time.sleep(rng.uniform(0.0, 0.02))
  elif phase == 'estep':
    seen = len(_SUMMARY.findall(launch.stdout()))

    def next_summary():
      return len(_SUMMARY.findall(launch.stdout())) > seen

    if not _wait_for(launch, next_summary, deadline, poll_s=0.01):
      return False
    time.sleep(rng.uniform(0.0, 1.0))
  elif phase in ('step', 'sigterm'):
    # Steps take milliseconds to a second: a short delay keeps most kills inside the M-steps.
    if not _wait_for(launch, lambda: bool(_STEP_PROGRESS.search(launch.stderr())), deadline,
                     poll_s=0.01):
      return False
    time.sleep(rng.uniform(0.0, 0.3))
  else:  # random
    _wait_for(launch, lambda: False, time.monotonic() + rng.uniform(0.5, 0.8 * reference_s),
              poll_s=0.01)
  return launch.alive()


def _restore_all(workdir):
  """(restorable steps, corrupted [(step, error)], partial tmp dirs) of WORKDIR/checkpoints."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return [], [], []
  manager = ocp.CheckpointManager(directory, item_names=('state', 'meta'))
  good, bad = [], []
  for step in manager.all_steps():
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
      if int(restored['meta']['epochs_done']) != step:
        raise ValueError(f'meta says {restored["meta"]["epochs_done"]} epochs')
      good.append(step)
    except Exception as error:  # pylint: disable=broad-except
      bad.append((step, f'{type(error).__name__}: {str(error)[:200]}'))
  manager.close()
  return good, bad, _tmp_dirs(workdir)


def _final_arrays(workdir):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pcl_jax.run import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  tree, meta, step = checkpoint_lib.restore_for_eval(workdir)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}, meta, step


def _metrics(workdir):
  from pcl_jax.run import files as run_files  # pylint: disable=g-import-not-at-top
  return run_files.read_metrics(os.path.join(workdir, 'metrics.jsonl'))


def _max_metric_diff(reference, candidate):
  if [r['epoch'] for r in reference] != [r['epoch'] for r in candidate]:
    return float('inf'), 'epochs differ: ' + str(([r['epoch'] for r in reference],
                                                  [r['epoch'] for r in candidate]))
  worst, where = 0.0, ''
  for a, b in zip(reference, candidate):
    for key in sorted(set(a) | set(b)):
      if key in TIMING_FIELDS:
        continue
      x, y = a.get(key), b.get(key)
      if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        diff = abs(float(x) - float(y))
      else:
        diff = 0.0 if x == y else float('inf')
      if diff > worst:
        worst, where = diff, f'epoch {a["epoch"]} {key}: {x} vs {y}'
  return worst, where


def _max_param_diff(reference, candidate):
  import numpy as np  # pylint: disable=g-import-not-at-top
  if set(reference) != set(candidate):
    return float('inf'), 'different arrays'
  worst, where = 0.0, ''
  for name, a in reference.items():
    b = candidate[name]
    if a.shape != b.shape:
      return float('inf'), f'{name}: shapes {a.shape} vs {b.shape}'
    diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
    if diff > worst:
      worst, where = diff, name
  return worst, where


def run(args) -> dict:
  """Runs the experiment; returns the results (also printed)."""
  rng = random.Random(args.seed)
  phases = [p.strip() for p in args.phases.split(',') if p.strip()]
  unknown = sorted(set(phases) - set(PHASES))
  if unknown or not phases:
    raise SystemExit(f'--phases: unknown {unknown}; use some of {",".join(PHASES)}')
  base = args.workdir or tempfile.mkdtemp(prefix='kill_resume_')
  os.makedirs(base, exist_ok=True)
  cache = '' if args.compile_cache == 'off' else (args.compile_cache or
                                                  os.path.join(base, 'jax_cache'))
  env = _child_env(cache)
  reference_dir = os.path.join(base, 'reference')
  logs = os.path.join(base, 'logs')
  shutil.rmtree(reference_dir, ignore_errors=True)
  for old in glob.glob(os.path.join(base, 'killed*')):
    shutil.rmtree(old, ignore_errors=True)
  os.makedirs(logs, exist_ok=True)

  print(f'kill_resume: {args.config} epochs={args.epochs} trials={args.trials} in {base}',
        flush=True)
  start = time.monotonic()
  reference = Launch(args, reference_dir, os.path.join(logs, 'reference'), env)
  if reference.wait(args.timeout) != 0:
    raise SystemExit(f'reference run failed:\n{reference.stderr()[-3000:]}')
  reference_s = time.monotonic() - start
  print(f'reference run: {reference_s:.1f}s', flush=True)
  reference_arrays, _, reference_step = _final_arrays(reference_dir)
  reference_metrics = _metrics(reference_dir)

  trials, corrupted, partial_seen, problems, rounds = [], [], 0, [], []
  worst = {'param': (0.0, ''), 'metric': (0.0, '')}

  def finish_round(killed_dir):
    """Lets the round's run finish, then compares it with the reference."""
    final = Launch(args, killed_dir, os.path.join(logs, f'{os.path.basename(killed_dir)}_final'),
                   env)
    status = final.wait(args.timeout)
    if status != 0:
      problems.append(f'{killed_dir}: final run failed (status {status}): '
                      f'{final.stderr()[-1000:]}')
      return
    _, bad, _ = _restore_all(killed_dir)
    corrupted.extend((os.path.basename(killed_dir), step, error) for step, error in bad)
    arrays, _, step = _final_arrays(killed_dir)
    if step != reference_step:
      problems.append(f'{killed_dir}: final checkpoint {step}, reference {reference_step}')
    diffs = {'param': _max_param_diff(reference_arrays, arrays),
             'metric': _max_metric_diff(reference_metrics, _metrics(killed_dir))}
    for key, (diff, where) in diffs.items():
      if diff > worst[key][0]:
        worst[key] = (diff, f'{os.path.basename(killed_dir)}: {where}')
    rounds.append({'dir': killed_dir, 'param_diff': diffs['param'][0],
                   'metric_diff': diffs['metric'][0]})
    print(f'{os.path.basename(killed_dir)} finished: max |param diff| {diffs["param"][0]:.3g}, '
          f'max |metric diff| {diffs["metric"][0]:.3g}', flush=True)

  # A round is one run killed and resumed until it finishes. When a launch ends by itself (the
  # run completed before its kill moment), the round is compared and a new one starts.
  killed_dir = os.path.join(base, 'killed0')
  launches = 0
  while len(trials) < args.trials and launches < 4 * args.trials + 4:
    launches += 1
    phase = phases[len(trials) % len(phases)]
    name = f'{os.path.basename(killed_dir)}_launch{launches:02d}'
    launch = Launch(args, killed_dir, os.path.join(logs, name), env)
    if not _kill_moment(launch, phase, rng, args, reference_s):
      status = launch.wait(args.timeout)
      if status != 0:
        problems.append(f'{name}: run failed (status {status}): {launch.stderr()[-500:]}')
      finish_round(killed_dir)
      killed_dir = os.path.join(base, f'killed{len(rounds)}')
      continue
    observed = _state(launch)
    launch.process.send_signal(signal.SIGTERM if phase == 'sigterm' else signal.SIGKILL)
    try:
      status = launch.wait(args.timeout)
    except subprocess.TimeoutExpired:
      launch.process.kill()
      status = launch.wait(60)
      problems.append(f'{name}: no exit within {args.timeout}s of SIGTERM')
    if phase == 'sigterm':
      stderr = launch.stderr()
      if status != 128 + signal.SIGTERM or 'stopped: SIGTERM' not in stderr:
        problems.append(f'{name}: SIGTERM gave status {status}, stderr tail {stderr[-300:]!r}')
    good, bad, partial = _restore_all(killed_dir)
    corrupted.extend((name, step, error) for step, error in bad)
    partial_seen += len(partial)
    trials.append({'trial': len(trials), 'launch': name, 'phase': phase, 'observed': observed,
                   'status': status, 'checkpoints': good, 'corrupted': len(bad),
                   'partial_dirs': len(partial),
                   'seconds': round(time.monotonic() - launch.start, 1)})
    print(f'trial {len(trials) - 1:2d}: {phase:10s} -> {signal.Signals(-status).name if status < 0 else status}'
          f' during {observed:10s} checkpoints {good} corrupted {len(bad)} '
          f'partial dirs {len(partial)}', flush=True)
  finish_round(killed_dir)

  observed = {}
  for record in trials:
    observed[record['observed']] = observed.get(record['observed'], 0) + 1
  (param_diff, param_where), (metric_diff, metric_where) = worst['param'], worst['metric']
  passed = (len(trials) == args.trials and not corrupted and not problems
            and param_diff <= args.tolerance and metric_diff <= args.tolerance)
  results = {
      'trials': len(trials), 'killed_during': observed, 'corrupted_checkpoints': len(corrupted),
      'corrupted': corrupted, 'partial_checkpoint_dirs_seen': partial_seen,
      'rounds': rounds, 'max_param_diff': param_diff, 'max_param_diff_at': param_where,
      'max_metric_diff': metric_diff, 'max_metric_diff_at': metric_where,
      'problems': problems, 'passed': passed, 'trial_log': trials,
      'seconds': round(time.monotonic() - start, 1), 'workdir': base,
  }
  print(f'trials: {len(trials)} in {len(rounds)} resumed run(s) (killed during: '
        f'{", ".join(f"{k} {v}" for k, v in sorted(observed.items()))})')
  print(f'corrupted checkpoints: {len(corrupted)}{" " + str(corrupted) if corrupted else ""}; '
        f'partial checkpoint dirs left by kills: {partial_seen} (ignored, removed on resume)')
  print(f'max |param diff|: {param_diff:.3g} {param_where}'.rstrip())
  print(f'max |metric diff|: {metric_diff:.3g} {metric_where}'.rstrip())
  for problem in problems:
    print(f'problem: {problem}')
  print(f'{"PASS" if passed else "FAIL"} in {results["seconds"]:.0f}s', flush=True)
  if args.json:
    with open(args.json, 'w') as handle:
      json.dump(results, handle, indent=2, default=str)
  if not args.keep and not args.workdir:
    shutil.rmtree(base, ignore_errors=True)
  return results


def main(argv=None):
  results = run(parse_args(argv))
  sys.exit(0 if results['passed'] else 1)


if __name__ == '__main__':
  main()
