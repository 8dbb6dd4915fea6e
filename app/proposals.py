"""Region proposals for Set-of-Mark without the model: OpenCV contours of what stands out.

Edges (Canny on each channel of a blurred CIELAB image) are closed into blobs, and each external contour's
bounding box is a candidate; tiny specks, near-whole-image frames and duplicates (non-max
suppression through supervision) are dropped, and the largest remaining ones are kept.
This finds the objects of plain or smoothly shaded backgrounds well (the demo's scenes);
on busy photos it proposes more, smaller regions than the model's detections do.
"""
from __future__ import annotations

import cv2
import numpy as np
import supervision as sv
from PIL import Image

MIN_AREA = 0.002     # of the image
MAX_AREA = 0.6
NMS_IOU = 0.5


def propose_regions(image: Image.Image, max_regions: int = 12) -> list[tuple[int, int, int, int]]:
    """Up to `max_regions` boxes (x0, y0, x1, y1) in pixels, largest first."""
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    lab = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB), (5, 5), 0)
    edges = np.zeros((h, w), dtype=np.uint8)
    for c in range(3):   # colour edges too: yellow on light grey has almost no grey-level edge
        edges |= cv2.Canny(np.ascontiguousarray(lab[:, :, c]), 20, 60)
    k = max(3, (min(h, w) // 40) | 1)
    closed = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    contours, _ = cv2.findContours(closed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    boxes, scores = [], []
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        area = bw * bh / float(w * h)
        if MIN_AREA <= area <= MAX_AREA:
            boxes.append([x, y, x + bw, y + bh])
            scores.append(area)
    if not boxes:
        return []
    det = sv.Detections(xyxy=np.array(boxes, dtype=float), confidence=np.array(scores),
                        class_id=np.zeros(len(boxes), dtype=int)).with_nms(threshold=NMS_IOU)
    order = np.argsort(-det.confidence)[:max_regions]
    return [tuple(int(v) for v in det.xyxy[i]) for i in order]
