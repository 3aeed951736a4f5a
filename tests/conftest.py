"""Shared pytest set-up: GPU tests skip cleanly without a GPU."""

import jax
import pytest


def pytest_collection_modifyitems(config, items):
  del config
  if jax.default_backend() == 'gpu':
    return
  skip_gpu = pytest.mark.skip(reason='needs a GPU (jax.default_backend() != "gpu")')
  for item in items:
    if 'gpu' in item.keywords:
      item.add_marker(skip_gpu)
