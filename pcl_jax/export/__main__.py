r"""Export a run's encoder for PyTorch: safetensors weights and their description.

  python -m pcl_jax.export --workdir=DIR --out=OUT [--step=E | --best] [--encoder=key|query]
      [--format=safetensors|pcl] [--overwrite]

Writes OUT/encoder.safetensors (torch names and layouts, `torch_names`; no pickle) and
OUT/encoder.json (`encoder.describe`); with --format=pcl also OUT/checkpoint.pth.tar in
salesforce/PCL's layout (`state_dict` with `module.encoder_q.*`), which the official evaluation
scripts load. Load the safetensors file with:

  import json, safetensors.torch
  from pcl_jax.export import torch_models
  model = torch_models.build(json.load(open('OUT/encoder.json')))
  model.load_state_dict(safetensors.torch.load_file('OUT/encoder.safetensors'))

(a ResNet is torchvision's own model: `torchvision.models.resnet18(num_classes=dim)`, with the
MLP head and small stem the json names). Everything is written to a temporary folder beside OUT
and renamed into place, so a failed export leaves no half-written OUT. Bad input gets one
`error:` line (exit status 2).
"""

import argparse
import os
import shutil
import sys
import tempfile

from pcl_jax.configuration import UserError
from pcl_jax.run import cli

FORMATS = ('safetensors', 'pcl')


def write_export(run, out: str, export_format: str, overwrite: bool) -> None:
  """Writes the export of `run` (`encoder.RunEncoder`) to `out`, atomically.

  Raises:
    UserError: `out` exists and `overwrite` is False.
  """
  # pylint: disable=g-import-not-at-top
  import safetensors.numpy
  from pcl_jax.export import encoder as encoder_lib
  from pcl_jax.export import torch_names
  from pcl_jax.run import files as run_files
  # pylint: enable=g-import-not-at-top
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise UserError(f'--out={out} exists; pass --overwrite to replace it, or another --out')
  model = run.config.model
  try:
    torch_names.check_exportable(model.arch, model.width)
  except ValueError as error:
    raise UserError(str(error)) from error
  tensors = torch_names.to_torch(jax_to_numpy(run.variables), model.arch, model.mlp,
                                 run.config.data.image_size)
  spec = encoder_lib.describe(run)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.', dir=parent)
  try:
    safetensors.numpy.save_file(tensors, os.path.join(staging, 'encoder.safetensors'),
                                metadata={'format': 'pt', 'arch': model.arch})
    run_files.write_json_atomic(os.path.join(staging, 'encoder.json'), spec)
    if export_format == 'pcl':
      write_pcl_checkpoint(os.path.join(staging, 'checkpoint.pth.tar'), tensors, model.arch,
                           run.step)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def jax_to_numpy(tree):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(np.asarray, tree)


def write_pcl_checkpoint(path: str, tensors: dict, arch: str, epoch: int) -> None:
  """salesforce/PCL's checkpoint layout: {'epoch', 'arch', 'state_dict'} with every tensor of
  the query encoder under `module.encoder_q.` (what its eval scripts strip and load)."""
  import torch  # pylint: disable=g-import-not-at-top
  state_dict = {f'module.encoder_q.{name}': torch.from_numpy(value.copy())
                for name, value in tensors.items()}
  torch.save({'epoch': int(epoch), 'arch': arch, 'state_dict': state_dict}, path)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m pcl_jax.export',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='the run directory')
  parser.add_argument('--out', required=True, help='the folder to write')
  which = parser.add_mutually_exclusive_group()
  which.add_argument('--step', type=int, default=None,
                     help='the checkpoint (epochs done); default the latest')
  which.add_argument('--best', action='store_true', help='the best-by-validation checkpoint')
  parser.add_argument('--encoder', default=None, help='key or query (default: the run\'s '
                      'eval.encoder, the one evaluation uses)')
  parser.add_argument('--format', default='safetensors', choices=FORMATS,
                      help='pcl: also checkpoint.pth.tar in salesforce/PCL\'s layout')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  parser.add_argument('--verbose', action='store_true', help='tracebacks of user errors')
  args = parser.parse_args(argv)
  cli.setup_logging(args.verbose)

  def export():
    from pcl_jax.export import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
    run = encoder_lib.load(args.workdir, args.step, args.best, args.encoder)
    write_export(run, args.out, args.format, args.overwrite)
    print(f'wrote {os.path.abspath(args.out)}: the {run.encoder} encoder of checkpoint '
          f'{run.step} ({run.config.model.arch})')
  cli.run_reporting_errors(export, args.verbose)


if __name__ == '__main__':
  main(sys.argv[1:])
