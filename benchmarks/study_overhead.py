r"""What a study's cells cost beyond their own training and evaluation, with and without JAX's
persistent compilation cache.

  python benchmarks/study_overhead.py                 # digits, 1 variant x 3 seeds, 3 epochs
  python benchmarks/study_overhead.py --seeds 4 --epochs 2 --config configs/test.py

Runs one tiny study (`pcl_jax.study.run_study`, as `python -m pcl_jax.study` does) three times,
each in a fresh process and a fresh study directory:
  no cache    the persistent cache off (every Trainer compiles its programs again);
  cache cold  the cache on, empty at the start (cells after the first load what it compiled);
  cache warm  the cache on, filled by the cold run (what another array task or a rerun sees).
For each cell it prints the wall time of training + evaluation as the study called them, the
time the trainer and the evaluation measured themselves (the epochs' `epoch_time_s` and
results.json's `timing_s.total`), and the overhead beyond that (building the run: data, model,
initial state; checkpoints; compilation outside the timed parts); then the first epoch's time
against the median of the later ones, whose difference is mostly the train step's compilation.
The last table gives the ratio no cache / cache for the first cell and for the later cells.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = ('no cache', 'cache cold', 'cache warm')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/digits.py', help='base config of the study')
  parser.add_argument('--seeds', type=int, default=3, help='cells (one variant, seeds 0..N-1)')
  parser.add_argument('--epochs', type=int, default=3, help='train.epochs of every cell')
  parser.add_argument('--override', action='append', default=[],
                      help='extra dotted=value override of every cell (repeatable)')
  parser.add_argument('--workdir', default='', help='where the studies go (default: a temp dir)')
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def _study_file(directory: str, args) -> str:
  overrides = {'train.epochs': args.epochs, 'pcl.warmup_epochs': 1,
               'checkpoint.every_epochs': args.epochs, 'eval.val_every': 0}
  for item in args.override:
    key, value = item.split('=', 1)
    overrides[key] = json.loads(value) if value[:1] in '0123456789-[{"tf' else value
  spec = {'config': args.config, 'overrides': overrides, 'variants': {'base': {}},
          'baseline': 'base', 'seeds': list(range(args.seeds))}
  path = os.path.join(directory, 'study.py')
  with open(path, 'w') as handle:
    handle.write(f'def get_study():\n  return {spec!r}\n')
  return path


def child(spec: str) -> None:
  """One study in this (fresh) process; prints its cells' timings as one JSON line."""
  start = time.perf_counter()
  study_path, workdir, cache = json.loads(spec)
  from pcl_jax.kernels import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.tune_malloc()
  # pylint: disable=g-import-not-at-top
  from pcl_jax import cli
  from pcl_jax import study as study_lib
  # pylint: enable=g-import-not-at-top
  study = study_lib.load_study(study_path)
  cells = study_lib.cell_configs(study)
  cli.limit_xla_threads(cells[0].config)
  study_lib.validate_cells(cells)
  ready = time.perf_counter()
  outcome = study_lib.run_study(study, workdir, cells, compilation_cache=cache)
  print('TIMINGS ' + json.dumps({
      'startup_s': ready - start, 'total_s': time.perf_counter() - start,
      'cells': [dict(vars(t), overhead_s=t.overhead_s) for t in outcome.timings]}), flush=True)


def _run_child(study_path: str, workdir: str, cache: str) -> dict:
  env = dict(os.environ)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  result = subprocess.run([sys.executable, os.path.abspath(__file__),
                           f'--child={json.dumps([study_path, workdir, cache])}'],
                          cwd=ROOT, capture_output=True, text=True, env=env)
  if result.returncode:
    sys.exit(f'the study failed:\n{result.stderr[-3000:]}')
  line = [l for l in result.stdout.splitlines() if l.startswith('TIMINGS ')][-1]
  return json.loads(line[len('TIMINGS '):])


def _row(mode: str, number: int, cell: dict) -> str:
  later = cell['later_epoch_s']
  compile_s = '' if later is None else f"{cell['first_epoch_s'] - later:6.2f}"
  return (f"| {mode} | {number} | {cell['wall_s']:6.2f} | {cell['train_s'] + cell['eval_s']:6.2f}"
          f" | {cell['overhead_s']:6.2f} | {cell['first_epoch_s']:6.2f} | "
          f"{'' if later is None else f'{later:6.2f}'} | {compile_s} |")


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.child:
    child(args.child)
    return 0
  base = args.workdir or tempfile.mkdtemp(prefix='study_overhead_')
  os.makedirs(base, exist_ok=True)
  study_path = _study_file(base, args)
  cache_dir = os.path.join(base, 'jax_cache')
  runs = {}
  for mode, cache in zip(MODES, ('', cache_dir, cache_dir)):
    workdir = os.path.join(base, mode.replace(' ', '_'))
    runs[mode] = _run_child(study_path, workdir, cache)
    print(f'{mode}: {runs[mode]["total_s"]:.1f}s in all (start-up {runs[mode]["startup_s"]:.1f}s)',
          flush=True)
  print()
  print(f'study: {args.config}, 1 variant x {args.seeds} seeds, train.epochs={args.epochs}; '
        'seconds per cell')
  print()
  print('| mode | cell | wall | own (train + eval) | overhead | first epoch | later epochs '
        '(median) | first - later |')
  print('|---|---|---|---|---|---|---|---|')
  for mode in MODES:
    for number, cell in enumerate(runs[mode]['cells'], 1):
      print(_row(mode, number, cell))
  print()
  print('| | no cache / cache cold | no cache / cache warm |')
  print('|---|---|---|')

  def walls(mode, first):
    cells = runs[mode]['cells']
    return cells[0]['wall_s'] if first else statistics.mean(c['wall_s'] for c in cells[1:])

  for first, label in ((True, 'first cell wall'), (False, 'later cells wall (mean)')):
    if not first and args.seeds < 2:
      continue
    print(f"| {label} | {walls('no cache', first) / walls('cache cold', first):.2f} | "
          f"{walls('no cache', first) / walls('cache warm', first):.2f} |")
  totals = [runs[mode]['total_s'] for mode in MODES]
  print(f'| process total | {totals[0] / totals[1]:.2f} | {totals[0] / totals[2]:.2f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
