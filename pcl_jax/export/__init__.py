"""A trained encoder out of pcl_jax and official weights in.

- `python -m pcl_jax.export`: a run's encoder as PyTorch weights (safetensors, and with
  --format=pcl salesforce/PCL's .pth.tar) with its description (`__main__`);
- `python -m pcl_jax.export.from_pcl`: an official PCL/MoCo checkpoint as a run directory that
  `--mode=eval` scores (`from_pcl`);
- `encoder.feature_fn(workdir)`: a jitted function from uint8 images to a run's features.
Modules: `torch_names` (names and layouts, numpy only), `torch_models` (the PyTorch modules),
`encoder` (a run's encoder: load, describe, feature_fn). Tools beside the algorithm: nothing in
training imports them.
"""
