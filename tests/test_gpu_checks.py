"""benchmarks/gpu_checks.sh --dry-run: the GPU verification script's code paths at tiny sizes on
this CPU, so that a lent GPU's few minutes are never lost to a broken script."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_dry_run_covers_every_stage_and_writes_one_results_file(tmp_path):
  result = subprocess.run(['bash', 'benchmarks/gpu_checks.sh', '--dry-run'], cwd=ROOT,
                          env={**os.environ, 'OUT': str(tmp_path)}, capture_output=True,
                          text=True, timeout=600)
  results = (tmp_path / 'results.txt').read_text()
  assert result.returncode == 0, results[-4000:]
  for stage in ('tests', 'resident', 'augment', 'loader', 'kmeans'):
    assert f'== {stage}: ' in results, stage
  assert '!!' not in results
  for figure in ('torch step channels-last img/s', 'interleaved: median JAX / torch CL',
                 'epoch M-steps (resident) img/s', 'epoch M-steps (augment) img/s',
                 'epoch M-steps (loader) img/s', 'E-step share of full epoch %',
                 'projected 200 epochs min', 'step-bound limit 200 epochs min',
                 'k-means programs compiled                     1.00', 'window 20/10'):
    assert figure in results, figure
