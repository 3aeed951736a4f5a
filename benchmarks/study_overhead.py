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
results.json's `timing_s.total`), the overhead beyond that (building the run: data, model,
initial state; checkpoints; compilation outside the timed parts), and, from JAX's own monitoring
events and across both, the seconds spent tracing, lowering, compiling with XLA (and how many
programs) and loading programs from the persistent cache (how many). The last table gives the
ratios no cache / cache of the first cell's wall time, the later cells' mean and the whole
process. On a busy machine the epochs' times scatter; the compile columns show the cache's
effect directly.
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


# JAX's own timings of the work of making programs (jax/_src/dispatch.py, compiler.py).
_EVENTS = {'/jax/core/compile/jaxpr_trace_duration': 'trace_s',
           '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower_s',
           '/jax/core/compile/backend_compile_duration': 'backend_s',
           '/jax/compilation_cache/cache_retrieval_time_sec': 'cache_load_s'}


def child(spec: str) -> None:
  """One study in this (fresh) process; prints its cells' timings as one JSON line."""
  start = time.perf_counter()
  study_path, workdir, cache = json.loads(spec)
  from pcl_jax.kernels import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.tune_malloc()
  # pylint: disable=g-import-not-at-top
  import jax
  from pcl_jax.run import cli
  from pcl_jax.study import cells as study_cells
  from pcl_jax.study import runner as study_runner
  from pcl_jax.study import spec as study_spec
  # pylint: enable=g-import-not-at-top
  totals = dict.fromkeys(list(_EVENTS.values()) + ['programs', 'cache_hits'], 0.0)

  def on_duration(event, duration, **_):
    if event in _EVENTS:
      totals[_EVENTS[event]] += duration
    if event == '/jax/core/compile/backend_compile_duration':
      totals['programs'] += 1

  def on_event(event, **_):
    if event == '/jax/compilation_cache/cache_hits':
      totals['cache_hits'] += 1

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)
  per_cell = []
  run_cell = study_runner.run_cell

  def measured_run_cell(*args, **kwargs):
    before = dict(totals)
    timing = run_cell(*args, **kwargs)
    per_cell.append({key: totals[key] - before[key] for key in totals})
    return timing

  study_runner.run_cell = measured_run_cell
  study = study_spec.load_study(study_path)
  cells = study_cells.cell_configs(study)
  cli.limit_xla_threads(cells[0].config)
  study_cells.validate_cells(cells)
  ready = time.perf_counter()
  outcome = study_runner.run_study(study, workdir, cells, compilation_cache=cache)
  print('TIMINGS ' + json.dumps({
      'startup_s': ready - start, 'total_s': time.perf_counter() - start,
      'cells': [dict(vars(t), overhead_s=t.overhead_s, **jax_s)
                for t, jax_s in zip(outcome.timings, per_cell)]}), flush=True)


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
  compile_s = cell['backend_s'] - cell['cache_load_s']
  misses = cell['programs'] - cell['cache_hits']
  return (f"| {mode} | {number} | {cell['wall_s']:.1f} | {cell['train_s'] + cell['eval_s']:.1f} | "
          f"{cell['overhead_s']:.1f} | {cell['trace_s']:.1f} | {cell['lower_s']:.1f} | "
          f"{compile_s:.1f} ({misses:.0f}) | {cell['cache_load_s']:.2f} "
          f"({cell['cache_hits']:.0f}) |")


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
  print('| mode | cell | wall | own (train + eval) | overhead | trace | lower | XLA compile '
        '(programs) | cache load (programs) |')
  print('|---|---|---|---|---|---|---|---|---|')
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
