"""A stand-in for MediaPipe Hands in the tests: it "detects" what an answer file says of each image.

``$FAKE_MEDIAPIPE_ANSWERS`` names a JSON file ``{"by_pixels": {sha1 of the RGB bytes: answer},
"default": answer or null}``; an answer is ``{"keypoints": 21 [x, y], "handedness": "Left",
"score": 0.9}`` (a hand is found when its score reaches min_detection_confidence), or
``{"crash": "message"}``: the message goes to stderr and the process exits with code 7.
Only the part of the API the worker uses exists.
"""
import hashlib
import json
import os
import sys
from types import SimpleNamespace

import numpy as np

__version__ = "0.10.21+fake"


def _answers() -> dict:
    with open(os.environ["FAKE_MEDIAPIPE_ANSWERS"], encoding="utf-8") as handle:
        return json.load(handle)


class Hands:
    def __init__(self, static_image_mode, max_num_hands, model_complexity, min_detection_confidence):
        assert static_image_mode and max_num_hands == 1
        self.threshold = min_detection_confidence
        self.answers = _answers()

    def process(self, rgb):
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        key = hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).hexdigest()
        answer = self.answers["by_pixels"].get(key, self.answers.get("default"))
        if answer and "crash" in answer:
            print(answer["crash"], file=sys.stderr, flush=True)
            os._exit(7)
        if not answer or answer["score"] < self.threshold:
            return SimpleNamespace(multi_hand_landmarks=None, multi_handedness=None)
        points = [SimpleNamespace(x=x, y=y, z=0.0) for x, y in answer["keypoints"]]
        label = SimpleNamespace(label=answer["handedness"], score=answer["score"])
        return SimpleNamespace(multi_hand_landmarks=[SimpleNamespace(landmark=points)],
                               multi_handedness=[SimpleNamespace(classification=[label])])

    def close(self):
        pass


solutions = SimpleNamespace(hands=SimpleNamespace(Hands=Hands))
