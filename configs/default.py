r"""Base configuration: every field of DESIGN.md section 3, with the reference defaults.

Other configs import this one and override a few fields. Launch (on digits, the embedded data):

  python -m pcl_jax.main --config=configs/default.py --workdir=/tmp/pcl_default

Any field can be overridden on the command line, e.g. `--config.optim.lr=0.03`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the base configuration (the salesforce/PCL defaults where they exist)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = 'digits'  # digits | fake | image_folder | mini_imagenet
  config.data.root = ''  # dataset directory (image_folder, mini_imagenet)
  config.data.image_size = 32  # crop size fed to the network
  config.data.train_split = 'train'  # e.g. 'train', 'train+val+test'
  config.data.eval_split = 'test'  # split used by --mode=eval
  config.data.val_split = 'val'  # split of the over-fitting monitor (eval.val_every)
  # image_folder: False reads every image under data.root at any depth, folder names ignored,
  # as one unlabelled split (a root holding image files directly is one already).
  config.data.labels = True
  config.data.aug_plus = True  # MoCo v2 augmentation (False: MoCo v1)
  # The augmentation (either recipe) inside the jitted step, Pillow-exact (pcl_jax/device_augment):
  # the loader only draws the random choices. For a GPU run that waits on its loader; costs
  # step time on a CPU.
  config.data.augment_on_device = False
  # The decoded uint8 training set on the devices (replicated, or split over them when needed to
  # fit): each step gathers its batch by index and draws and applies its augmentation there
  # (jax.random, torchvision's distributions), and the E-step's feature pass reads the same copy.
  # No host loader in the epoch; augment_on_device is then implied. For accelerators.
  config.data.device_resident = False
  config.data.num_workers = 2  # torch DataLoader worker processes
  config.data.cache_dir = ''  # where decoded-image caches go ('' = next to the data)
  config.data.cache_size = 0  # side of the decoded-image cache (0: 84 for mini_imagenet, else the
  # eval transform's resize: the crop under eval_resize=whole, 8/7 of it under center)
  # What the eval transform (E-step feature pass and evaluation) keeps of an image: whole (short
  # side resized to the crop, center crop: all of a square image, the PyTorch reference's
  # Resize(size) + CenterCrop(size)) | center (short side resized to 8/7 of the crop, center
  # crop: ImageNet's 256 -> 224) | auto (whole when the stored images are not larger than 8/7 of
  # the crop: digits, fake, mini-ImageNet at 84, small patches; center for larger photos).
  config.data.eval_resize = 'auto'
  config.data.fake_size = 512  # number of images of data.name=fake
  config.data.fake_classes = 10  # number of classes of data.name=fake

  config.model = ml_collections.ConfigDict()
  config.model.arch = 'resnet18'  # conv4 | resnet18 | resnet34 | resnet50
  config.model.dim = 128  # output embedding dimension
  config.model.mlp = False  # 2-layer MLP head (MoCo v2) instead of one linear layer
  config.model.small_stem = False  # 3x3 stride-1 stem without max-pool (small images)
  config.model.width = 64  # channels of Conv4 / first ResNet stage

  # How the run computes, not what it computes: a checkpoint resumes and evaluates under any of
  # these (pcl_jax/kernels/__init__.py).
  config.runtime = ml_collections.ConfigDict()
  # Kernels: xla | torch (PyTorch's oneDNN CPU convolutions via host callbacks; single CPU
  # device only) | onednn (oneDNN itself as XLA custom calls, float32, for a ResNet's BN + ReLU,
  # stem pool and residual joins too: pcl_jax/kernels/onednn/; needs a C++ compiler) |
  # auto (on a single CPU device onednn where it builds, else torch; else xla).
  config.runtime.conv_impl = 'auto'
  # XLA's CPU thread pool: 0 chooses (1 when torch or oneDNN runs a ResNet's convolutions, so one
  # OpenMP team serves them; else a thread per core; pcl_jax/kernels/host_threads.py), N > 0 sets
  # N threads.
  config.runtime.xla_cpu_threads = 0

  config.train = ml_collections.ConfigDict()
  config.train.epochs = 200
  config.train.batch_size = 256
  config.train.log_every_steps = 50
  config.train.steps_per_epoch = 0  # quick-run switch: cap on steps per epoch (0: full epoch)
  config.train.dtype = 'float32'  # float32 | bfloat16 (compute dtype; params stay float32)
  # Shuffle-BN emulation: BN statistics are computed per group of the batch, as if each group
  # sat on its own device; keys are permuted across groups first (DESIGN.md, M-step).
  config.train.shuffle_bn_groups = 4

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 0.03
  config.optim.momentum = 0.9
  config.optim.weight_decay = 1e-4
  config.optim.cos = True  # cosine decay; False: step decay x0.1 at `schedule` milestones
  config.optim.schedule = '120,160'  # milestone epochs of the step decay (comma string)
  config.optim.schedule_per = 'epoch'  # epoch (as the reference) | step

  config.pcl = ml_collections.ConfigDict()
  config.pcl.temperature = 0.2
  config.pcl.moco_m = 0.999
  config.pcl.num_negatives = 16384  # r: queue length and number of negative prototypes
  config.pcl.warmup_epochs = 20  # epochs of InfoNCE only, before the first E-step
  config.pcl.smoothing_cap = 0.2
  config.pcl.max_clusters = 0  # 0: the largest entry of schedule.all_clusters
  # InfoNCE's form (docs/remedies.md has what each measured): infonce (PCL as published) |
  # masked (queue keys of the query's cluster leave the negatives) | attract (they become extra
  # positives, Huynh et al. 2022) | debiased (Chuang et al. 2020) | selected (HCSC's negatives
  # drawn per level, Guo et al. 2022). Only the section of that name below is read; the others
  # must keep their defaults.
  config.pcl.instance_loss = 'infonce'
  config.pcl.infonce = ml_collections.ConfigDict()
  config.pcl.infonce.smoothed = False  # label-smoothed with ProtoNCE's epsilon too
  config.pcl.masked = ml_collections.ConfigDict()
  config.pcl.masked.level = 'finest'  # finest | coarsest: the active level whose clusters mask
  config.pcl.masked.smoothed = False
  config.pcl.attract = ml_collections.ConfigDict()
  # finest | coarsest | graded (each key weighted by the fraction of active levels that put it
  # in the query's cluster)
  config.pcl.attract.level = 'finest'
  config.pcl.attract.share = 0.0  # the attracted keys' share of InfoNCE's target; 0: uniform
  config.pcl.attract.smoothed = False
  config.pcl.debiased = ml_collections.ConfigDict()
  config.pcl.debiased.prior = 0.1  # tau+: the chance that a negative is of the query's class
  config.pcl.selected = ml_collections.ConfigDict()
  config.pcl.selected.smoothed = False
  config.pcl.proto_weight = 1.0  # ProtoNCE's weight against InfoNCE (0: InfoNCE only)
  config.pcl.proto_columns = 'unique'  # unique | reference (the official code's, per sample)

  config.clustering = ml_collections.ConfigDict()
  config.clustering.backend = 'auto'  # auto | faiss | jax
  config.clustering.niter = 20
  config.clustering.nredo = 5
  config.clustering.spherical = True
  config.clustering.use_float16 = True  # faiss GPU index in float16
  config.clustering.max_points_factor = 5 / 3  # max_points_per_centroid = int(N * f / k)
  config.clustering.min_points_factor = 1 / 3  # min_points_per_centroid = int(N * f / k)
  # The jax k-means's shapes: 'max' computes every k of the run with the largest k's centroid
  # rows (one compiled program per run, results equal to exact k to float rounding), 'exact'
  # with k rows, 'auto' pads on GPU and TPU (where a compilation costs 10-85 s), not on a CPU.
  config.clustering.pad_k = 'auto'  # auto | max | exact
  # What each level clusters: flat (the samples, each level on its own: PCL as published) |
  # hierarchical (the finer level's centroids, so a coarse cluster is a union of fine ones) |
  # balanced (flat, then made equal-sized: SwAV's Sinkhorn-Knopp over k-means' centroids).
  config.clustering.levels = 'flat'
  # Read with levels=balanced only; SwAV's epsilon and iterations.
  config.clustering.sinkhorn_epsilon = 0.05
  config.clustering.sinkhorn_iterations = 3

  config.schedule = ml_collections.ConfigDict()
  config.schedule.all_clusters = '25000,50000,100000'
  config.schedule.num_levels = 3
  config.schedule.mode = 'plateau'  # plateau | fixed
  config.schedule.metric = 'acc_inst'
  config.schedule.window = 5
  config.schedule.min_delta = 0.5
  config.schedule.init_threshold = 0.0
  config.schedule.threshold_step = 1.0
  config.schedule.patience = 0  # 0: no cap on epochs per stage
  config.schedule.every = 10  # epochs per stage in mode=fixed

  config.eval = ml_collections.ConfigDict()
  config.eval.knn_k = 20
  config.eval.knn_t = 0.07
  config.eval.fewshot_episodes = 2000
  config.eval.fewshot_queries = 15
  config.eval.val_every = 0  # epochs between validation kNN checks (0: off)
  config.eval.save_features = False
  # k-means of the clustering metrics (NMI, AMI, ARI, Hungarian acc): runs averaged (seeds
  # EVAL_SEED + i) and L2 or spherical; fixed by the evaluation, never the run's clustering.*.
  config.eval.kmeans_runs = 10
  config.eval.kmeans_spherical = False
  config.eval.feature_layer = 'head'  # head | backbone
  # The encoder evaluated: key (the momentum encoder, as the reference's feature pass and
  # clustering) | query (as salesforce/PCL's eval_svm_voc.py and eval_cls_imagenet.py).
  config.eval.encoder = 'key'
  # The clustering stage on frozen features (pcl_jax/evaluation/cluster_head.py: SCAN heads
  # trained so that nearest neighbours agree), scored beside k-means as results' cluster_head.
  # On: it beat the evaluation's k-means by 0.04-0.05 NMI on both the project's and the
  # reference's features of the development patches (docs/evaluation.md), in seconds.
  config.eval.cluster_head = True
  # Its number of clusters: the eval split's class count when it has labels; without labels
  # this setting, 0 meaning the run's coarsest cluster level.
  config.eval.cluster_head_k = 0

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_epochs = 1
  config.checkpoint.max_to_keep = 3
  return config
