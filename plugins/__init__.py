"""Built-in handforge components. Each module below is a plugin registered through the same
hooks a third-party package uses; the core loads them by this list and names none of them."""

BUILTIN_MODULES = (
    "handforge.plugins.datasets.procedural_hands",
    "handforge.plugins.datasets.keypoint_json",
    "handforge.plugins.datasets.freihand",
    "handforge.plugins.backbones.deep_conv",
    "handforge.plugins.backbones.resnet",
    "handforge.plugins.backbones.big_resnet",
    "handforge.plugins.backbones.stylegan2",
    "handforge.plugins.backbones.stylegan3",
    "handforge.plugins.backbones.classifiers",
    "handforge.plugins.backbones.keypoint_nets",
    "handforge.plugins.conditioners.label",
    "handforge.plugins.conditioners.pose",
    "handforge.plugins.conditioners.auxiliary",
    "handforge.plugins.augmentations.diffaug",
    "handforge.plugins.augmentations.ada",
    "handforge.plugins.augmentations.keypoint_affine",
    "handforge.plugins.losses.adversarial",
    "handforge.plugins.tasks.gan",
    "handforge.plugins.tasks.classifier",
    "handforge.plugins.tasks.keypoints",
    "handforge.plugins.metrics",
    "handforge.plugins.export",
)
