"""Named handshapes as anatomical joint-angle templates, with the view each class is seen in.

Two class sets: ``hagrid`` (the 18 gestures of HaGRID v1, in HaGRID's label order, so a
classifier trained here can be scored on HaGRID directly) and ``fingerspelling`` (static
letters of the ASL manual alphabet). A template gives, in degrees, the thumb as
(splay, lift, twist, mcp, ip) and each finger as (mcp, pip, dip, abduction): splay and
abduction turn towards the thumb side in the palm plane (the thumb's splay is relative to the
flat hand's, :data:`kinematics.THUMB_REST_SPLAY`), lift raises the thumb out of the palm,
the rest flex towards the palm. :func:`anatomical` expands them to the (15, 3)
(bend, splay, twist) layout of :mod:`kinematics`, in MANO joint order.

A class's view (roll, yaw, pitch, degrees) is added to the random view: roll -90 turns the
thumb of a side-on fist up the image (like), 180 turns a hand upside down (the inverted
classes), yaw shows a hand from its side (mute).
"""
import torch

CURLED = (85.0, 100.0, 55.0, 0.0)
HALF_CURLED = (40.0, 60.0, 35.0, 0.0)


def straight(abduction=0.0):
    return (0.0, 3.0, 2.0, abduction)


# Thumb poses (splay, lift, twist, mcp, ip).
THUMB_OVER = (-15.0, 55.0, 10.0, 35.0, 35.0)  # folded over the curled fingers
THUMB_TUCKED = (-20.0, 55.0, 10.0, 40.0, 35.0)  # pressed on the curled ring and little finger
THUMB_ACROSS = (-35.0, 40.0, 10.0, 55.0, 45.0)  # folded across the palm under straight fingers
THUMB_OUT = (10.0, 15.0, 0.0, 5.0, 5.0)  # spread away from the palm
THUMB_ALONG = (-22.0, 5.0, 0.0, 5.0, 5.0)  # beside the index finger, in the palm plane
THUMB_UP = (25.0, 20.0, 0.0, 0.0, -5.0)  # at right angles to a fist (like / dislike)
THUMB_PINCH = (-13.0, 31.0, 15.0, 23.0, 24.0)  # tip on the index tip (fitted to the mean hand)
INDEX_PINCH = (45.0, 70.0, 40.0, 0.0)
FINGERS_TOGETHER = (straight(-4.0), straight(0.0), straight(3.5), straight(7.0))
FINGERS_SPREAD = (straight(12.0), straight(2.0), straight(-7.0), straight(-16.0))


def shape(thumb, index, middle, ring, pinky, view=(0.0, 0.0, 0.0)):
    return {"thumb": thumb, "fingers": (index, middle, ring, pinky), "view": view}


HAGRID = {
    "call": shape((15.0, 10.0, 0.0, 0.0, 0.0), CURLED, CURLED, CURLED, straight(-22.0)),
    "dislike": shape(THUMB_UP, CURLED, CURLED, CURLED, CURLED, view=(90.0, 0.0, 0.0)),
    "fist": shape(THUMB_OVER, CURLED, CURLED, CURLED, CURLED),
    "four": shape(THUMB_ACROSS, straight(8.0), straight(), straight(-5.0), straight(-12.0)),
    "like": shape(THUMB_UP, CURLED, CURLED, CURLED, CURLED, view=(-90.0, 0.0, 0.0)),
    "mute": shape(THUMB_OVER, straight(0.0), CURLED, CURLED, CURLED, view=(0.0, 45.0, 0.0)),
    # Thumb and index tips meet; the other three fan out.
    "ok": shape(THUMB_PINCH, INDEX_PINCH, (5.0, 8.0, 4.0, -2.0), (8.0, 10.0, 4.0, -9.0),
                (10.0, 12.0, 5.0, -18.0), view=(0.0, -30.0, 0.0)),
    "one": shape((-20.0, 55.0, 10.0, 40.0, 35.0), straight(2.0), CURLED, CURLED, CURLED),
    "palm": shape(THUMB_OUT, *FINGERS_SPREAD),
    "peace": shape(THUMB_TUCKED, straight(9.0), straight(-7.0), CURLED, CURLED),
    "peace_inverted": shape(THUMB_TUCKED, straight(9.0), straight(-7.0), CURLED, CURLED, view=(180.0, 0.0, 0.0)),
    "rock": shape(THUMB_OVER, straight(6.0), CURLED, CURLED, straight(-18.0)),
    "stop": shape(THUMB_ALONG, *FINGERS_TOGETHER),
    "stop_inverted": shape(THUMB_ALONG, *FINGERS_TOGETHER, view=(180.0, 0.0, 0.0)),
    "three": shape(THUMB_OUT, straight(8.0), straight(-5.0), CURLED, CURLED),  # thumb, index, middle
    "three2": shape(THUMB_OVER, straight(8.0), straight(-2.0), straight(-9.0), CURLED),
    "two_up": shape(THUMB_TUCKED, straight(-4.0), straight(0.0), CURLED, CURLED),
    "two_up_inverted": shape(THUMB_TUCKED, straight(-4.0), straight(0.0), CURLED, CURLED, view=(180.0, 0.0, 0.0)),
}

FINGERSPELLING = {
    "A": shape(THUMB_ALONG, CURLED, CURLED, CURLED, CURLED),
    "B": shape(THUMB_ACROSS, *FINGERS_TOGETHER),
    "C": shape((0.0, 45.0, 20.0, 15.0, 15.0), *(HALF_CURLED,) * 4, view=(0.0, 65.0, 0.0)),
    "D": shape((-20.0, 50.0, 15.0, 30.0, 20.0), straight(0.0), (50.0, 70.0, 40.0, 0.0),
               (50.0, 70.0, 40.0, 0.0), (50.0, 70.0, 40.0, 0.0)),
    "E": shape(THUMB_ACROSS, *((70.0, 100.0, 70.0, 0.0),) * 4),
    "F": shape(THUMB_PINCH, INDEX_PINCH, straight(2.0), straight(-6.0), straight(-14.0)),
    "I": shape(THUMB_OVER, CURLED, CURLED, CURLED, straight(-5.0)),
    "K": shape((-10.0, 45.0, 10.0, 10.0, 0.0), straight(10.0), straight(-12.0), CURLED, CURLED),
    "L": shape((40.0, 5.0, 0.0, 0.0, 0.0), straight(0.0), CURLED, CURLED, CURLED),
    "O": shape((0.0, 50.0, 20.0, 20.0, 20.0), *((40.0, 60.0, 35.0, 0.0),) * 4, view=(0.0, 60.0, 0.0)),
    "S": shape(THUMB_OVER, CURLED, CURLED, CURLED, CURLED),
    "U": shape(THUMB_TUCKED, straight(-4.0), straight(0.0), CURLED, CURLED),
    "V": shape(THUMB_TUCKED, straight(10.0), straight(-8.0), CURLED, CURLED),
    "W": shape((-30.0, 50.0, 10.0, 45.0, 40.0), straight(10.0), straight(0.0), straight(-10.0), CURLED),
    "X": shape(THUMB_OVER, (10.0, 80.0, 45.0, 0.0), CURLED, CURLED, CURLED),
    "Y": shape((35.0, 10.0, 0.0, 0.0, 0.0), CURLED, CURLED, CURLED, straight(-20.0)),
}

CLASS_SETS = {"hagrid": HAGRID, "fingerspelling": FINGERSPELLING}
# The palm view's one class: the open, spread hand with the palm to the camera (see `view`).
PALM_VIEW = {"palm": HAGRID["palm"]}
# Gestures that hide no finger behind the palm: the detector-judged set of the README.
OPEN_CLASSES = ("palm", "stop", "four", "three", "three2", "peace", "two_up", "ok", "call", "rock", "one")


def anatomical(template: dict) -> torch.Tensor:
    """(15, 3) (bend, splay, twist) degrees of one template, MANO joint order."""
    splay, lift, twist, mcp, ip = template["thumb"]
    index, middle, ring, pinky = template["fingers"]
    rows = []
    for mcp_f, pip, dip, abduction in (index, middle, pinky, ring):  # MANO digit order
        rows += [(mcp_f, abduction, 0.0), (pip, 0.0, 0.0), (dip, 0.0, 0.0)]
    rows += [(lift, splay, twist), (mcp, 0.0, 0.0), (ip, 0.0, 0.0)]
    return torch.tensor(rows)


# Joint limits and per-sample noise (standard deviation) in the (15, 3) layout, degrees.
_FINGER_LO = ((-25.0, -25.0, -10.0), (-5.0, -5.0, -5.0), (-10.0, -5.0, -5.0))
_FINGER_HI = ((95.0, 25.0, 10.0), (115.0, 5.0, 5.0), (85.0, 5.0, 5.0))
_THUMB_LO = ((-15.0, -50.0, -20.0), (-10.0, -10.0, -10.0), (-20.0, -5.0, -5.0))
_THUMB_HI = ((80.0, 40.0, 60.0), (75.0, 10.0, 10.0), (90.0, 5.0, 5.0))
_FINGER_NOISE = ((6.0, 3.0, 2.0), (7.0, 1.0, 1.0), (7.0, 1.0, 1.0))
_THUMB_NOISE = ((6.0, 5.0, 4.0), (6.0, 2.0, 2.0), (8.0, 1.0, 1.0))
ANGLE_LO = torch.tensor(_FINGER_LO * 4 + _THUMB_LO)
ANGLE_HI = torch.tensor(_FINGER_HI * 4 + _THUMB_HI)
ANGLE_NOISE = torch.tensor(_FINGER_NOISE * 4 + _THUMB_NOISE)


class ClassSet:
    """One class set as tensors: names, (C, 15, 3) templates, (C, 3) views."""

    def __init__(self, name: str, shapes: dict | None = None):
        shapes = CLASS_SETS[name] if shapes is None else shapes
        self.name = name
        self.names = tuple(shapes)
        self.templates = torch.stack([anatomical(s) for s in shapes.values()])
        self.views = torch.tensor([s["view"] for s in shapes.values()])
        if (self.templates < ANGLE_LO).any() or (self.templates > ANGLE_HI).any():
            raise ValueError(f"handshape templates of {name!r} break the joint limits")
