"""Signed-distance rasteriser of the procedural hand: capsules, a rounded palm, backgrounds.

A *scene* is a dict of per-sample tensors in pixel units (built by procedural_hands from the
posed 3D hand): finger capsules sorted far to near, the palm polygon and its place in that
order, the forearm and sleeve, light and colours. :func:`rasterize` turns a batch of scenes
into images with tensor operations over (batch, parts, pixels). Only element-wise arithmetic
touches per-sample values (no matmul, no reductions, no transcendental kernels), so a sample's
pixels never depend on the batch it is drawn in.

Shading is Lambertian: ``shade = ambient + (1 - ambient) * max(light . normal, 0)``. Parts
report ``light . normal`` (a tube's normal follows from the pixel's offset from its axis) and
the hand composites that before the clamp, so the clamp runs once per pixel, not per part.
"""
import torch

WARM_SHADOW = torch.tensor([0.10, -0.03, -0.08])  # shadowed skin leans red


def upsample(grid: torch.Tensor, size: int) -> torch.Tensor:
    """Smooth (smoothstep-weighted bilinear) upsampling of (B, g, g) grids to (B, size, size)."""
    g = grid.shape[-1]
    pos = (torch.arange(size, dtype=torch.float32) + 0.5) * ((g - 1) / size)
    i0 = pos.floor().long().clamp(max=g - 2)
    w = pos - i0
    w = w * w * (3.0 - 2.0 * w)
    rows = grid[:, i0] * (1.0 - w)[:, None] + grid[:, i0 + 1] * w[:, None]
    return rows[:, :, i0] * (1.0 - w) + rows[:, :, i0 + 1] * w


def background(kind, colors, cos_sin, noise, size: int) -> torch.Tensor:
    """(B, 3, size, size) in [0, 1]: kind 0 solid, 1 linear gradient, 2 two-octave value noise.

    colors (B, 2, 3); cos_sin (B, 2) gradient direction; noise (B, 25 + 81) grid values.
    """
    mix = torch.zeros(kind.shape[0], 1, size, size)
    pos = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    ramp = (kind == 1).nonzero().squeeze(1)
    if ramp.numel():
        c, s = cos_sin[ramp, 0, None, None] * 1.2, cos_sin[ramp, 1, None, None] * 1.2
        mix[ramp, 0] = ((pos.view(1, 1, size) * c + 0.5) + pos.view(1, size, 1) * s).clamp_(0.0, 1.0)
    noisy = (kind == 2).nonzero().squeeze(1)
    if noisy.numel():
        grid = noise[noisy]
        value = upsample(grid[:, :25].view(-1, 5, 5) * 1.43, size)
        value.add_(upsample(grid[:, 25:].view(-1, 9, 9) * 0.77, size))
        mix[noisy, 0] = value.sub_(0.6).clamp_(0.0, 1.0)
    c0, c1 = colors[:, 0, :, None, None], colors[:, 1, :, None, None]
    return mix.mul(c1 - c0).add_(c0)


def palm_sdf(qx, qy, verts, rounding):
    """Signed distance (pixels) to a convex polygon grown by ``rounding``.

    The maximum over the edge lines: exact inside, slightly short outside the corners.
    qx (.., 1, W) and qy (.., H, 1) broadcast against (B, H, W), or both (B, K) points;
    verts (B, K, 2) in either winding; rounding (B,).
    """
    a, b = verts, verts.roll(-1, dims=1)
    ex, ey = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    cross = a[..., 0] * b[..., 1] - b[..., 0] * a[..., 1]
    area = cross[:, 0]
    for k in range(1, verts.shape[1]):
        area = area + cross[:, k]
    length = torch.sqrt(ex * ex + ey * ey).clamp_min(1e-6) * torch.where(area < 0, -1.0, 1.0)[:, None]
    nx, ny = ey / length, -ex / length
    offset = nx * a[..., 0] + ny * a[..., 1] + rounding[:, None]
    shape = (-1,) + (1,) * (max(qx.dim(), qy.dim()) - 1)
    d = edge = None
    for k in range(verts.shape[1]):
        px, py = qx * nx[:, k].view(shape) - offset[:, k].view(shape), qy * ny[:, k].view(shape)
        if d is None:
            d = px + py
            edge = torch.empty_like(d)
        else:
            torch.maximum(d, torch.add(px, py, out=edge), out=d)
    return d


def capsules(xs, ys, caps, light):
    """Squared distance, radius and light . normal of tapered capsules.

    xs (B or 1, P or 1, 1, W) and ys (.., H, 1) pixel centres; caps (B, P, 6) as (ax, ay, bx, by,
    ra, rb) in pixels; light (B, 3) unit vector towards the light in the camera frame (-z
    towards the viewer). Returns the squared distance to the segment, the radius there and
    light . normal, each (B, P, H, W). The normal is the offset from the axis over the mean
    radius in the image plane and 1 - (distance / radius)^2 towards the viewer (a quadratic
    stand-in for a tube's square root). Written to need no square root or division per pixel
    (both slow here) and few full-size temporaries.
    """
    ax, ay, bx, by, ra, rb = caps[..., None, None].unbind(2)
    bax, bay = bx - ax, by - ay
    inv_len2 = 1.0 / (bax * bax + bay * bay).clamp_min(1e-6)
    inv_len = torch.sqrt(inv_len2)
    ux, uy = bax * inv_len, bay * inv_len
    inv_r = 2.0 / (ra + rb)
    lx, ly, lz = (light[:, i, None, None, None] for i in range(3))
    # Position along the axis (0 at a, 1 at b) and signed distance across it.
    t = xs * (bax * inv_len2) + (ys * (bay * inv_len2) - (ax * bax + ay * bay) * inv_len2)
    h = t.clamp(0.0, 1.0)
    along = t.sub_(h).mul_(1.0 / inv_len)  # distance beyond an end
    across = xs * -uy + (ys * ux + (ax * uy - ay * ux))
    lit = across * ((ux * ly - uy * lx) * inv_r)
    scratch = along * ((ux * lx + uy * ly) * inv_r)
    lit.add_(scratch)
    dist2 = across.mul_(across).add_(along.mul_(along))
    radius = torch.mul(h, rb - ra, out=scratch).add_(ra)
    # (1 - d^2 / r^2) * lz, clamped where d > r; lz < 0: the light is on the viewer's side.
    facing = torch.mul(dist2, -lz * inv_r * inv_r, out=h).add_(lz).clamp_max_(0.0)
    return dist2, radius, lit.sub_(facing)


def coverage(dist2, radius, mean_radius):
    """Anti-aliased coverage of pixels sqrt(dist2) from an axis of the given radius (consumed).

    ((r + 1/2)^2 - d^2) / 2r is 1 at d = r - 1/2 and 0 at d = r + 1/2, like the exact
    r + 1/2 - d, without its square root; the part's mean radius is the r of the divisor.
    """
    outer = radius.add_(0.5)
    return outer.mul_(outer).sub_(dist2).mul_(0.5 / mean_radius).clamp_(0.0, 1.0)


def skin_colour(shade, skin, gain, out=None):
    """(B, 3, H, W) colour of skin under a (B, H, W) shade; shadows warmer."""
    k1 = (skin * (1.0 + WARM_SHADOW) * gain[:, None])[:, :, None, None]
    k2 = (skin * -WARM_SHADOW * gain[:, None])[:, :, None, None]
    s = shade[:, None]
    return torch.mul(s, k2, out=out).add_(k1).mul_(s)


def over(image, alpha, colour):
    """Composite ``colour`` (consumed) over ``image`` in place with (B, H, W) coverage ``alpha``."""
    return image.add_(colour.sub_(image).mul_(alpha[:, None]))


def rasterize(scene: dict, size: int):
    """Images (B, 3, size, size) in [0, 1] and hand coverage (B, size, size) of a batch of scenes.

    Background, forearm and palm are evaluated over the whole image; each finger capsule only
    over a square tile around it (one side for all, enough for the largest) that lies inside
    the image.
    """
    b = scene["caps"].shape[0]
    light, skin, gain = scene["light"], scene["skin"], scene["gain"]
    amb = scene["ambient"][:, None, None]
    ys = (torch.arange(size, dtype=torch.float32) + 0.5).view(1, 1, size, 1)
    xs = ys.view(1, 1, 1, size)
    image = background(scene["bg_kind"], scene["bg_colors"], scene["bg_dir"], scene["bg_noise"], size)

    # Forearm, then the sleeve over it (a wider tube cut square across the axis), behind the hand.
    # arm: (B, 11) the tube (ax, ay, bx, by, ra, rb), how much wider the sleeve is (pixels),
    # sleeve on (1/0), and the cut: x * arm[8] + y * arm[9] + arm[10] > 0 on the sleeve.
    arm = scene["arm"]
    dist2, radius, lit = (v[:, 0] for v in capsules(xs, ys, arm[:, None, :6], light))
    mean_radius = ((arm[:, 4] + arm[:, 5]) * 0.5)[:, None, None]
    shade = lit.clamp_min_(0.0).mul_(1.0 - amb).add_(amb)
    colour = skin_colour(shade, skin, gain)
    sleeve_radius = radius + arm[:, 6, None, None]
    over(image, coverage(dist2, radius, mean_radius), colour)
    sleeve = coverage(dist2, sleeve_radius, mean_radius + arm[:, 6, None, None]).mul_(arm[:, 7, None, None])
    cut = xs[0] * arm[:, 8, None, None] + (ys[0] * arm[:, 9, None, None] + arm[:, 10, None, None])
    sleeve.mul_(cut.clamp_(0.0, 1.0))
    shade.mul_(gain[:, None, None])
    over(image, sleeve, torch.mul(shade[:, None], scene["sleeve_color"][:, :, None, None], out=colour))

    # The palm: a slab lit by its normal, brighter towards the light, darker at its rim.
    sdf = palm_sdf(xs[0], ys[0], scene["palm_verts"], scene["palm_round"])
    palm_alpha = (0.5 - sdf).clamp_(0.0, 1.0)
    rim = sdf.mul_(-1.0 / scene["palm_round"][:, None, None]).clamp_(0.0, 1.0)
    rim.mul_(rim.neg().add_(2.0)).mul_(0.45).add_(0.55)
    cx, cy = (scene["palm_centre"][:, i, None, None] for i in range(2))
    k = 0.35 / scene["palm_extent"][:, None, None]
    palm_lit = xs[0] * (light[:, 0, None, None] * k) + (ys[0] * (light[:, 1, None, None] * k) + (
        scene["palm_lit"][:, None, None] - (cx * light[:, 0, None, None] + cy * light[:, 1, None, None]) * k))
    palm_lit.mul_(rim)

    # Finger capsules on tiles. Every layer goes over a canvas of (light . normal, coverage)
    # as canvas * keep + layer, keep = 1 - coverage: back to front, the palm at its rank.
    caps = scene["caps"]
    n = caps.shape[1]
    x0, y0, side = _tiles(caps, size)
    steps = torch.arange(side, dtype=torch.float32) + 0.5
    dist2, radius, lit = capsules((x0[..., None] + steps)[:, :, None], (y0[..., None] + steps)[..., None],
                                  caps, light)
    alpha = coverage(dist2, radius, ((caps[..., 4] + caps[..., 5]) * 0.5)[..., None, None]).view(b, n, 1, -1)
    layer = torch.cat([lit.view(b, n, 1, -1).mul_(alpha), alpha], 2)
    keep = alpha.neg().add_(1.0)
    palm_alpha = palm_alpha.view(b, 1, -1)
    palm_layer = torch.cat([palm_lit.view(b, 1, -1).mul_(palm_alpha), palm_alpha], 1)
    palm_keep = palm_alpha.neg().add_(1.0)
    offsets = (torch.arange(side).view(side, 1) * size + torch.arange(side)).view(1, 1, -1)
    corner = y0.long() * size + x0.long()
    canvas = torch.zeros(b, 2, size * size)
    ranks = scene["palm_rank"].tolist()
    palm_at = {r: torch.tensor([i for i in range(b) if ranks[i] == r]) for r in set(ranks)}
    for r in range(n + 1):
        if r in palm_at:
            here = palm_at[r]
            canvas[here] = canvas[here].mul_(palm_keep[here]).add_(palm_layer[here])
        if r < n:
            index = (corner[:, r, None, None] + offsets).expand(b, 2, side * side)
            canvas.scatter_(2, index, canvas.gather(2, index).mul_(keep[:, r]).add_(layer[:, r]))
    lit, cover = canvas.view(b, 2, size, size).unbind(1)
    shade = lit.div_(cover.clamp_min(1e-6)).clamp_min_(0.0).mul_(1.0 - amb).add_(amb)
    over(image, cover, skin_colour(shade, skin, gain, out=colour))
    return image.clamp_(0.0, 1.0), cover


def _tiles(caps, size: int):
    """Integer tile origins (B, P) x 2, inside the image, and one tile side for all capsules
    that covers each one's in-image part."""
    ax, ay, bx, by, ra, rb = caps.unbind(-1)
    lo_x = torch.minimum(ax - ra, bx - rb).floor().clamp_min(0.0)
    lo_y = torch.minimum(ay - ra, by - rb).floor().clamp_min(0.0)
    hi_x = torch.maximum(ax + ra, bx + rb).ceil().clamp_max(size)
    hi_y = torch.maximum(ay + ra, by + rb).ceil().clamp_max(size)
    side = int(torch.maximum(hi_x - lo_x, hi_y - lo_y).max().clamp(1, size)) + 2
    side = min(side, size)
    return lo_x.clamp_max(size - side), lo_y.clamp_max(size - side), side


def keypoint_visibility(kp, kp_depth, kp_radius, caps, caps_depth, adjacent, palm_verts, palm_round,
                        palm_point, palm_normal, focal, size, palm_exempt):
    """(B, 21) bool: inside the image and not clearly hidden behind another part.

    kp (B, 21, 2) pixels, kp_depth/kp_radius (B, 21) metres; caps (B, P, 6) unsorted capsules
    (ax, ay, bx, by, ra, rb pixels), caps_depth (B, P, 2) depth of a and b, metres; adjacent (21, P):
    capsules that end at a keypoint never hide it. A keypoint is hidden where another capsule's
    axis, or the palm's visible surface, lies in front of the keypoint's own surface.
    """
    inside = (kp >= 0).all(-1) & (kp <= size).all(-1)
    qx, qy = kp[..., 0, None], kp[..., 1, None]
    ax, ay, bx, by, ra, rb = (caps[:, None, :, i] for i in range(6))
    za, zb = caps_depth[:, None, :, 0], caps_depth[:, None, :, 1]
    bax, bay = bx - ax, by - ay
    len2 = (bax * bax + bay * bay).clamp_min(1e-6)
    h = (((qx - ax) * bax + (qy - ay) * bay) / len2).clamp(0.0, 1.0)
    ex, ey = qx - ax - h * bax, qy - ay - h * bay
    reach = 0.8 * (ra + h * (rb - ra))
    covered = ex * ex + ey * ey < reach * reach
    axis_depth = za + h * (zb - za)
    in_front = axis_depth < (kp_depth - kp_radius)[..., None]
    hidden = (covered & in_front & ~adjacent).any(-1)
    # Palm: ray through the keypoint's pixel against the plane of the palm's visible surface.
    sdf = palm_sdf(kp[..., 0], kp[..., 1], palm_verts, palm_round)
    rx, ry = (kp[..., 0] - size / 2.0) / focal, (kp[..., 1] - size / 2.0) / focal
    nx, ny, nz = (palm_normal[:, i, None] for i in range(3))
    plane = (palm_normal[:, 0] * palm_point[:, 0] + palm_normal[:, 1] * palm_point[:, 1]
             + palm_normal[:, 2] * palm_point[:, 2])[:, None]
    denom = nx * rx + ny * ry + nz
    palm_depth = plane / torch.where(denom.abs() < 1e-6, torch.full_like(denom, 1e-6), denom)
    behind_palm = (sdf < -0.5 * palm_round[:, None]) & (palm_depth < kp_depth - kp_radius) & ~palm_exempt
    return inside & ~hidden & ~behind_palm
