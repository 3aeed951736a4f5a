"""pcl_jax's step against the official salesforce/PCL code, replayed from a recording.

`benchmarks/reference_equivalence.py --ref DIR --arch conv4 --save-fixture ...` ran the official
MoCo and `main_pcl.train` beside pcl_jax and kept everything the official side computed
(tests/data/reference_equivalence.npz; the command is in it). Here the same comparison runs with
that recording in place of the official code: pcl_jax trains the tiny Conv4 from the official
initial weights over the warm-up, one-level, three-level (sampled negatives) and unique-columns
epochs, and every loss, accuracy, learning rate, parameter, SGD momentum buffer, BN statistic,
key-encoder parameter, queue row and pointer, E-step feature and concentration must stay within
the script's 1e-4 of the official value. A change to what the step computes fails here.
"""

import os

import pytest

from benchmarks import reference_equivalence as equivalence

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data',
                       'reference_equivalence.npz')


@pytest.fixture(scope='module')
def recording():
  return equivalence.RecordedOfficial(FIXTURE, 'conv4')


def test_the_recording_is_of_these_inputs(recording):
  assert recording.inputs_sha256 == equivalence.inputs_digest(), (
      'make_images / epoch_batches give other inputs than the recording had (a numpy change?): '
      f'rerun `{recording.command}` with the official code')
  assert '--save-fixture' in recording.command


def test_pcl_jax_steps_as_the_official_code(recording):
  results, _ = equivalence.compare(recording, 'conv4')
  assert not recording.methods, f'official calls left unreplayed: {recording.methods}'
  quantities = {key.split('/', 2)[2] for key in results}
  assert quantities == (set(equivalence.METRICS) | set(equivalence.STATE_PARTS)
                        | {'features', 'concentration', 'key_update'})
  epochs = {key.split('/')[1] for key in results}
  assert epochs == {name for name, _, _ in equivalence.EPOCHS}
  too_far = {key: value for key, value in results.items()
             if not value < equivalence.THRESHOLD}
  assert not too_far, f'pcl_jax departs from the official code: {too_far}'
