"""The values a setting may take, in one leaf module that imports nothing.

Checking a config (`configuration`) and the modules that implement each choice (models, kernels,
clustering, data) read them from here, so validation imports neither torch nor flax (a bad value
fails in about a second) and no implementation has to import the validator.
"""

ARCHS = ('conv4', 'resnet18', 'resnet34', 'resnet50')
CONV_IMPLS = ('auto', 'xla', 'torch', 'onednn')
DTYPES = ('float32', 'bfloat16')
# 'faiss-cpu' / 'faiss-gpu' force a faiss build (clustering.resolve_backend); checked at start-up.
BACKENDS = ('auto', 'faiss', 'jax', 'faiss-cpu', 'faiss-gpu')
DATASETS = ('digits', 'fake', 'image_folder', 'mini_imagenet')
SCHEDULE_MODES = ('plateau', 'fixed')
FEATURE_LAYERS = ('head', 'backbone')
# data.eval_resize: 'whole' (resize to the crop: all of a square image), 'center' (resize to 8/7
# of the crop, then the center crop: ImageNet's), 'auto' (pcl_jax/data/recipes.resolve_eval_resize).
EVAL_RESIZES = ('auto', 'whole', 'center')
# eval.encoder: the momentum (key) encoder, as the reference's feature pass, or the query encoder,
# as salesforce/PCL's eval_svm_voc.py / eval_cls_imagenet.py.
EVAL_ENCODERS = ('key', 'query')
PROTO_COLUMNS = ('unique', 'reference')  # pcl.proto_columns
MASK_LEVELS = ('finest', 'coarsest', 'graded')  # pcl.mask_level ('graded': attraction only)
# Per-epoch metrics the plateau detector can monitor (schedule.metric).
SCHEDULE_METRICS = ('acc_inst', 'loss_inst', 'loss', 'acc_proto', 'loss_proto', 'val_knn_top1')
