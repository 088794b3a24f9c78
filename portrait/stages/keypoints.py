"""The five-point face keypoint map InstantID's IdentityNet and InfiniteYou's InfuseNet read.

Both reference implementations draw it with the same `draw_kps` (InfiniteYou's is marked
"modified from InstantID" and is the same drawing): limbs from each eye and mouth corner to
the nose as ellipse polygons of half-width 4 on black, dimmed to 0.6, then filled circles of
radius 10, in fixed RGB colors (docs/ARCHITECTURE.md#instantid-keypoints). Kept in a stage
module so both backends use one copy (a backend never imports another backend).
"""

from __future__ import annotations

import math

import numpy as np

KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
KPS_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
KPS_STICK_WIDTH = 4
KPS_LIMB_DIM = 0.6
KPS_RADIUS = 10


def draw_kps(width: int, height: int, kps: np.ndarray) -> np.ndarray:
    """The keypoint condition image (HxWx3 uint8 RGB) for 5 points in (x, y) pixels."""
    import cv2

    kps = np.asarray(kps, dtype=np.float64)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for a, b in KPS_LIMBS:
        xs, ys = kps[[a, b], 0], kps[[a, b], 1]
        length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), KPS_STICK_WIDTH),
                                   int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, KPS_COLORS[a])
    canvas = (canvas * KPS_LIMB_DIM).astype(np.uint8)
    for (x, y), color in zip(kps, KPS_COLORS):
        cv2.circle(canvas, (int(x), int(y)), KPS_RADIUS, color, -1)
    return canvas
