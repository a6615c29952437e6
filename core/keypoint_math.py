"""2D keypoint accuracy: PCK, AUC of the PCK curve and end-point error, in MMPose's conventions.

Keypoints are (N, K, 2) x,y normalized to [0, 1] of the image (0 = left/top edge); errors are
Euclidean distances in pixels of the evaluated image. Only visible joints count.

Conventions, as MMPose's ``mmpose.evaluation.functional.keypoint_eval``:

- a joint is correct when its error is strictly below the threshold;
- PCK is the mean over joints of each joint's PCK (joints never visible are left out), not the
  pooled fraction over all visible (sample, joint) pairs; the two agree when every joint is
  visible equally often (FreiHAND, procedural_hands);
- AUC is ``keypoint_auc``: the mean PCK at thresholds ``i / steps * max_px`` for i in
  range(steps), i.e. 0, 1.5, ..., 28.5 px for 20 steps over 30 px: 0 is included and 30 is not
  (a left Riemann sum of the PCK curve, normalized by its width);
- EPE is the mean error over all visible (sample, joint) pairs, pooled;
- PCK@0.2 bbox normalizes by the longer side of the ground-truth bounding box. MMPose takes the
  annotated box; samples here carry none, so it is the box of the visible keypoints, and samples
  whose box is empty (fewer than two distinct visible points) are left out, as MMPose leaves out
  a zero normalizer.

Nothing to measure (no visible joint) gives NaN rather than an error or 0: a 0 would read as a
terrible model, and an evaluation over a split should report the hole, not stop.
"""
import math

import torch

from .errors import HandforgeError


def _image_hw(image_size) -> tuple[int, int]:
    """An int (square images) or (height, width) -> (height, width)."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def _check_points(name: str, points: torch.Tensor) -> None:
    if points.ndim != 3 or points.shape[-1] < 2:
        raise HandforgeError(f"keypoint metrics: {name} must be (N, K, 2) normalized x,y, got {tuple(points.shape)}")


def _check_mask(errors_px: torch.Tensor, visible: torch.Tensor) -> None:
    if errors_px.shape != visible.shape or errors_px.ndim != 2:
        raise HandforgeError(f"keypoint metrics: errors {tuple(errors_px.shape)} and visibility "
                             f"{tuple(visible.shape)} must both be (N, K)")


def keypoint_errors_px(pred: torch.Tensor, target: torch.Tensor, image_size) -> torch.Tensor:
    """(N, K) Euclidean distances in pixels between normalized (N, K, 2) predictions and targets
    (extra columns such as visibility are ignored); ``image_size`` is an int or (height, width)."""
    _check_points("pred", pred)
    _check_points("target", target)
    if pred.shape[:2] != target.shape[:2]:
        raise HandforgeError(f"keypoint metrics: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                             f"have different numbers of samples or joints")
    height, width = _image_hw(image_size)
    scale = torch.tensor([width, height], dtype=torch.float64, device=pred.device)
    return ((pred[..., :2].double() - target[..., :2].double()) * scale).norm(dim=-1)


def _per_joint_pck(correct: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Mean over joints of each joint's fraction correct among its visible samples.

    ``correct`` is (..., N, K) (leading dims: several thresholds at once); returns (...). Joints
    with no visible sample are left out; with none left at all the result is NaN.
    """
    counts = visible.sum(dim=0)  # (K,)
    hits = (correct & visible).sum(dim=-2)  # (..., K)
    seen = counts > 0
    per_joint = hits[..., seen].double() / counts[seen].double()
    if per_joint.shape[-1] == 0:
        return torch.full(per_joint.shape[:-1], math.nan, dtype=torch.float64)
    return per_joint.mean(dim=-1)


def pck(errors_px: torch.Tensor, visible: torch.Tensor, thresholds) -> float:
    """Percentage of correct keypoints: errors strictly below ``thresholds`` (a number of pixels,
    or an (N,) tensor, one per sample), averaged per joint over visible joints (module docstring).
    NaN when nothing is visible."""
    _check_mask(errors_px, visible)
    thresholds = torch.as_tensor(thresholds, dtype=errors_px.dtype, device=errors_px.device)
    if thresholds.ndim == 1:
        if thresholds.shape[0] != errors_px.shape[0]:
            raise HandforgeError(f"keypoint metrics: {thresholds.shape[0]} thresholds for "
                                 f"{errors_px.shape[0]} samples")
        thresholds = thresholds[:, None]
    return _per_joint_pck(errors_px < thresholds, visible.bool()).item()


def bbox_size_px(target: torch.Tensor, visible: torch.Tensor, image_size) -> torch.Tensor:
    """(N,) longer side in pixels of each sample's box around its visible target keypoints
    (0 when it has fewer than two distinct visible points)."""
    _check_points("target", target)
    height, width = _image_hw(image_size)
    points = target[..., :2].double() * torch.tensor([width, height], dtype=torch.float64, device=target.device)
    mask = visible.bool()[..., None]
    low = torch.where(mask, points, math.inf).amin(dim=1)  # (N, 2)
    high = torch.where(mask, points, -math.inf).amax(dim=1)
    side = (high - low).amax(dim=1)
    return torch.where(mask.any(dim=(1, 2)), side, 0.0)


def auc(errors_px: torch.Tensor, visible: torch.Tensor, max_px: float = 30.0, steps: int = 20) -> float:
    """Area under the PCK curve over [0, ``max_px``], normalized to [0, 1]: MMPose's
    ``keypoint_auc``, the mean PCK at thresholds i / steps * max_px for i in range(steps)."""
    _check_mask(errors_px, visible)
    if steps < 1 or max_px <= 0:
        raise HandforgeError(f"keypoint metrics: auc needs steps >= 1 and max_px > 0, got {steps} and {max_px}")
    thresholds = torch.arange(steps, dtype=torch.float64, device=errors_px.device) * (max_px / steps)
    correct = errors_px[None] < thresholds[:, None, None]  # (steps, N, K)
    return _per_joint_pck(correct, visible.bool()).mean().item()


def epe(errors_px: torch.Tensor, visible: torch.Tensor) -> float:
    """Mean end-point error in pixels over all visible (sample, joint) pairs; NaN when none."""
    _check_mask(errors_px, visible)
    visible = visible.bool()
    if not visible.any():
        return math.nan
    return errors_px[visible].double().mean().item()


def keypoint_report(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, image_size) -> dict[str, float]:
    """The keypoint metrics of a split: ``pck@0.05`` (threshold 0.05 of the image side, the longer
    one if not square), ``pck@0.2bbox``, ``auc@30px`` (20 thresholds) and ``epe_px``."""
    errors = keypoint_errors_px(pred, target, image_size)
    _check_mask(errors, visible)
    visible = visible.bool()
    bbox = bbox_size_px(target, visible, image_size)
    in_box = visible & (bbox > 0)[:, None]
    return {
        "pck@0.05": pck(errors, visible, 0.05 * max(_image_hw(image_size))),
        "pck@0.2bbox": pck(errors, in_box, 0.2 * bbox),
        "auc@30px": auc(errors, visible, max_px=30.0, steps=20),
        "epe_px": epe(errors, visible),
    }


# -- hand boxes: the region the hand metrics score and the pose-transfer loss weights --------------


def hand_boxes(keypoints: torch.Tensor, height: int, width: int, margin: float = 0.25,
               min_size: float = 16.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Square boxes (N, 4) ``x0, y0, x1, y1`` in pixels around each image's visible keypoints
    (N, 21, 3; normalised x, y and a visibility): centred on the points' bounding box, its longer
    side grown by ``margin`` on each side (fingers have width beyond their joints), at least
    ``min_size`` pixels, and moved (not shrunk) to lie inside the image where it fits. Also (N,)
    whether the image has any visible point; boxes of those without are all zero."""
    visible = keypoints[..., 2] > 0
    has = visible.any(dim=1)
    big = torch.tensor(float("inf"), dtype=keypoints.dtype, device=keypoints.device)
    xs, ys = keypoints[..., 0] * width, keypoints[..., 1] * height
    x_min = torch.where(visible, xs, big).amin(dim=1)
    x_max = torch.where(visible, xs, -big).amax(dim=1)
    y_min = torch.where(visible, ys, big).amin(dim=1)
    y_max = torch.where(visible, ys, -big).amax(dim=1)
    side = torch.maximum(x_max - x_min, y_max - y_min) * (1 + 2 * margin)
    side = side.clamp_min(min_size).clamp_max(float(min(height, width)))
    cx, cy = (x_min + x_max) / 2, (y_min + y_max) / 2
    x0 = (cx - side / 2).clamp(min=torch.zeros_like(side), max=width - side)
    y0 = (cy - side / 2).clamp(min=torch.zeros_like(side), max=height - side)
    boxes = torch.stack([x0, y0, x0 + side, y0 + side], dim=1)
    return torch.where(has[:, None], boxes, torch.zeros_like(boxes)), has


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 1, H, W) float: 1 where a pixel's centre lies in its image's box."""
    cx = torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5
    cy = torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5
    inside_x = (cx[None] >= boxes[:, 0:1]) & (cx[None] < boxes[:, 2:3])
    inside_y = (cy[None] >= boxes[:, 1:2]) & (cy[None] < boxes[:, 3:4])
    return (inside_y[:, :, None] & inside_x[:, None, :]).unsqueeze(1).to(boxes.dtype)

