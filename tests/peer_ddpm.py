"""Import denoising-diffusion-pytorch (a benchmark-only extra) without torchvision, which the
package imports at module level for its Trainer only (unusable here): empty stand-ins suffice."""
import importlib.util
import sys
import types


def import_peer():
    """The peer package, or None when it is not installed."""
    if importlib.util.find_spec("denoising_diffusion_pytorch") is None:
        return None
    if "torchvision" not in sys.modules or not hasattr(sys.modules["torchvision"], "__file__"):
        stub = types.ModuleType("torchvision")
        stub.transforms, stub.utils = types.ModuleType("torchvision.transforms"), types.ModuleType("torchvision.utils")
        sys.modules.update({"torchvision": stub, "torchvision.transforms": stub.transforms,
                            "torchvision.utils": stub.utils})
    import denoising_diffusion_pytorch
    return denoising_diffusion_pytorch
