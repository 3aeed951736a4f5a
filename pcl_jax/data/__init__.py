"""From files on disk to batches: sources, the decoded-image cache, transforms, loaders, and the
same transforms on the device.

`sources` (which images a split holds), `cache` (decoded once, memory-mapped), `recipes` (the
numbers host and device transforms share), `transforms` (torchvision/PIL), `loaders` (torch
datasets and numpy batches), `device_transforms` and `device_augment` (the eval transform and the
augmentation inside jitted code).
"""
