"""PCL's losses: InfoNCE and its forms against the MoCo queue, ProtoNCE against the prototypes.

This package owns the loss formulas of DESIGN.md section 1 and nothing else: it never touches
parameters, optimizer state or the data. `instance` holds InfoNCE's forms (`pcl.instance_loss`),
`false_negatives` which queue keys they act on, `proto` ProtoNCE and its smoothing,
`cross_entropy` what both share, `pcl` the configured sum the step trains on. The names below
are the package's public interface (DESIGN.md section 3 lists `info_nce`, `proto_nce` and
`smoothing_factor`).
"""

from pcl_jax.losses.false_negatives import negative_keep_probability
from pcl_jax.losses.false_negatives import same_cluster
from pcl_jax.losses.false_negatives import select_negatives
from pcl_jax.losses.instance import attract_info_nce
from pcl_jax.losses.instance import attraction_target
from pcl_jax.losses.instance import debiased_info_nce
from pcl_jax.losses.instance import info_nce
from pcl_jax.losses.instance import masked_info_nce
from pcl_jax.losses.instance import selected_info_nce
from pcl_jax.losses.pcl import Attract
from pcl_jax.losses.pcl import Debiased
from pcl_jax.losses.pcl import INSTANCE_FORMS
from pcl_jax.losses.pcl import InfoNCE
from pcl_jax.losses.pcl import LossSettings
from pcl_jax.losses.pcl import Masked
from pcl_jax.losses.pcl import pcl_loss
from pcl_jax.losses.pcl import Selected
from pcl_jax.losses.proto import mean_proto_nce
from pcl_jax.losses.proto import proto_nce
from pcl_jax.losses.proto import reference_prototype_columns
from pcl_jax.losses.proto import select_prototype_columns
from pcl_jax.losses.proto import smoothing_factor

__all__ = ['info_nce', 'masked_info_nce', 'attract_info_nce', 'attraction_target',
           'debiased_info_nce', 'selected_info_nce', 'same_cluster', 'negative_keep_probability',
           'select_negatives', 'proto_nce', 'mean_proto_nce', 'select_prototype_columns',
           'reference_prototype_columns', 'smoothing_factor', 'INSTANCE_FORMS', 'InfoNCE',
           'Masked', 'Attract', 'Debiased', 'Selected', 'LossSettings', 'pcl_loss']
