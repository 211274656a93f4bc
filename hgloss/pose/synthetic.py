"""A synthetic COCO-keypoints dataset of articulated figures, generated from a seed.

Each image holds one to `max_people` stick figures with the 17 COCO joints, drawn over a
cluttered background: a head with eyes, nose and ears, a torso, arms and legs of random pose,
size and limb width. The person's left limbs are drawn in warm colours and the right ones in cool
colours, so that left and right can be told apart, as in a real photograph of a person facing the
camera. Occluders hide parts of some figures (joints under them are labelled v=1, as COCO labels
occluded joints) and figures may stand partly outside the image (those joints are unlabelled,
v=0). Bounding boxes and areas come from each figure's own rendered mask, less what occluders
and later figures cover.

Everything is written to disk in the COCO format (PNG images and a json file), so the data goes
through the same loader and the same COCOeval as real COCO. The same seed gives the same files.

Example::

    paths = write_synthetic_coco("/tmp/synthetic", {"train": 800, "val": 200}, seed=0)
    # paths["train"] = (image folder, annotation json)
"""

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .datasets import write_atomically

KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
# COCO's skeleton, 1-based as in the annotation files.
SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
    (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)  # fmt: skip
# Limbs drawn as thick lines, (joint, joint, side): side -1 is the person's left, +1 the right.
LIMBS = ((5, 7, -1), (7, 9, -1), (6, 8, 1), (8, 10, 1), (11, 13, -1), (13, 15, -1), (12, 14, 1), (14, 16, 1))
LEFT_COLOURS = ((230, 80, 40), (240, 160, 30), (200, 40, 90))
RIGHT_COLOURS = ((40, 110, 230), (30, 190, 170), (110, 60, 210))


def _figure(rng: np.random.Generator, height: float) -> np.ndarray:
    """The 17 joints of a figure `height` pixels tall, in a body frame centred on the hips (x to
    the image's right, y down), before rotation and placement."""
    joints = np.zeros((17, 2))
    torso = 0.30 * height
    shoulder_half = rng.uniform(0.09, 0.14) * height
    hip_half = rng.uniform(0.06, 0.09) * height
    lean = rng.normal(0.0, 0.15)
    up = np.array([math.sin(lean), -math.cos(lean)])  # from the hips towards the neck
    across = np.array([-up[1], up[0]])  # the person's left, on the image's right when facing us
    neck = torso * up
    joints[5], joints[6] = neck + shoulder_half * across, neck - shoulder_half * across
    joints[11], joints[12] = hip_half * across, -hip_half * across
    head = neck + 0.12 * height * up
    turn = rng.uniform(-0.4, 0.4)  # how far the head is turned: moves the face sideways
    eye_half, ear_half = 0.035 * height, 0.065 * height
    joints[0] = head + turn * eye_half * across - 0.01 * height * up
    joints[1] = head + (turn + 1) * eye_half * across + 0.02 * height * up
    joints[2] = head + (turn - 1) * eye_half * across + 0.02 * height * up
    joints[3] = head + (0.5 * turn + 1) * ear_half * across
    joints[4] = head + (0.5 * turn - 1) * ear_half * across
    down_angle = math.atan2(-up[1], -up[0])
    for shoulder, elbow, wrist, side in ((5, 7, 9, 1), (6, 8, 10, -1)):
        upper = down_angle + side * rng.uniform(-0.4, 2.6)
        bend = side * rng.uniform(0.0, 2.2)
        joints[elbow] = joints[shoulder] + 0.17 * height * np.array([math.cos(upper), math.sin(upper)])
        joints[wrist] = joints[elbow] + 0.15 * height * np.array([math.cos(upper + bend), math.sin(upper + bend)])
    for hip, knee, ankle, side in ((11, 13, 15, 1), (12, 14, 16, -1)):
        thigh = down_angle + side * rng.uniform(-0.3, 1.0)
        bend = -side * rng.uniform(0.0, 1.6)
        joints[knee] = joints[hip] + 0.24 * height * np.array([math.cos(thigh), math.sin(thigh)])
        joints[ankle] = joints[knee] + 0.23 * height * np.array([math.cos(thigh + bend), math.sin(thigh + bend)])
    return joints


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A colour gradient with random shapes and thin lines as clutter."""
    width, height = size
    corners = rng.uniform(40, 215, size=(2, 2, 3))
    ys = np.linspace(0, 1, height)[:, None, None]
    xs = np.linspace(0, 1, width)[None, :, None]
    base = (1 - ys) * ((1 - xs) * corners[0, 0] + xs * corners[0, 1]) + ys * ((1 - xs) * corners[1, 0] + xs * corners[1, 1])
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 12)):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        x1, y1 = x0 + rng.uniform(-60, 60), y0 + rng.uniform(-60, 60)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(3)
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        if shape == 0:
            draw.rectangle(box, fill=colour)
        elif shape == 1:
            draw.ellipse(box, fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 6)))
    return image


def _draw_figure(draw: ImageDraw.ImageDraw, mask: ImageDraw.ImageDraw, joints: np.ndarray, limb_width: int,
                 rng: np.random.Generator) -> None:
    """The figure on the image, and its silhouette on its own mask."""
    skin = tuple(int(c) for c in rng.integers(120, 240, 3))
    shirt = tuple(int(c) for c in rng.integers(0, 256, 3))
    left = LEFT_COLOURS[int(rng.integers(len(LEFT_COLOURS)))]
    right = RIGHT_COLOURS[int(rng.integers(len(RIGHT_COLOURS)))]
    torso = [tuple(joints[i]) for i in (5, 6, 12, 11)]
    draw.polygon(torso, fill=shirt)
    mask.polygon(torso, fill=255)
    for start, end, side in LIMBS:
        colour = left if side < 0 else right
        for target, fill in ((draw, colour), (mask, 255)):
            target.line((*joints[start], *joints[end]), fill=fill, width=limb_width)
            for joint in (start, end):
                x, y = joints[joint]
                r = limb_width / 2
                target.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    neck = (joints[5] + joints[6]) / 2
    head = (joints[3] + joints[4]) / 2
    radius = 0.6 * np.linalg.norm(joints[3] - joints[4]) + 1
    for target, fill in ((draw, skin), (mask, 255)):
        target.line((*neck, *head), fill=fill, width=max(2, limb_width))
        target.ellipse((head[0] - radius, head[1] - 1.2 * radius, head[0] + radius, head[1] + 1.2 * radius), fill=fill)
    dot = max(1.0, radius / 6)
    for joint, colour in ((1, (20, 20, 20)), (2, (20, 20, 20)), (0, (150, 40, 40))):
        x, y = joints[joint]
        draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=colour)
    for joint, colour in ((3, left), (4, right)):
        x, y = joints[joint]
        draw.ellipse((x - 1.5 * dot, y - 1.5 * dot, x + 1.5 * dot, y + 1.5 * dot), fill=colour)


def _render_image(rng: np.random.Generator, size: tuple[int, int], max_people: int):
    """One image and, per figure, its joints (17, 2) and the boolean mask of what stays visible."""
    width, height = size
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    figures = []
    for _ in range(int(rng.integers(1, max_people + 1))):
        person_height = rng.uniform(0.45, 0.95) * height
        joints = _figure(rng, person_height)
        rotation = rng.normal(0.0, 0.35)
        rotate = np.array([[math.cos(rotation), -math.sin(rotation)], [math.sin(rotation), math.cos(rotation)]])
        joints = joints @ rotate.T
        # Place the figure so that its joints mostly fall inside; some stand partly outside.
        low, high = joints.min(axis=0), joints.max(axis=0)
        margin = 0.15 * (high - low)
        offset = rng.uniform(-low - margin, np.array([width, height]) - high + margin)
        joints = joints + offset
        limb_width = max(2, int(rng.uniform(0.025, 0.06) * person_height))
        mask_image = Image.new("L", size, 0)
        _draw_figure(draw, ImageDraw.Draw(mask_image), joints, limb_width, rng)
        mask = np.asarray(mask_image) > 0
        for earlier in figures:  # this figure hides what it covers of earlier ones
            earlier["visible"] &= ~mask
        figures.append({"joints": joints, "visible": mask, "occluded": np.zeros(17, dtype=bool)})
    for figure in figures:
        if rng.random() < 0.35:
            low, high = figure["joints"].min(axis=0), figure["joints"].max(axis=0)
            centre = rng.uniform(low, high)
            half = rng.uniform(0.08, 0.25, size=2) * (high - low).max()
            box = (*(centre - half), *(centre + half))
            draw.rectangle(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            covered = np.zeros((height, width), dtype=bool)
            x0, y0 = np.clip(np.floor(centre - half), 0, [width, height]).astype(int)
            x1, y1 = np.clip(np.ceil(centre + half), 0, [width, height]).astype(int)
            covered[y0:y1, x0:x1] = True
            for other in figures:
                other["visible"] &= ~covered
            inside = np.all((figure["joints"] >= centre - half) & (figure["joints"] <= centre + half), axis=1)
            figure["occluded"] |= inside
    noise = rng.normal(0.0, 6.0, size=(height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return pixels, figures


def _annotation(figure: dict, size: tuple[int, int], image_id: int, annotation_id: int) -> dict | None:
    """The COCO annotation of one figure, or None when too little of it is visible to label."""
    width, height = size
    mask = figure["visible"]
    area = int(mask.sum())
    if area < 64:
        return None
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    keypoints = []
    labelled = 0
    for (x, y), occluded in zip(figure["joints"], figure["occluded"]):
        if 0 <= x < width and 0 <= y < height:
            keypoints += [round(float(x), 2), round(float(y), 2), 1 if occluded else 2]
            labelled += 1
        else:
            keypoints += [0, 0, 0]
    if labelled == 0:
        return None
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": 1,
        "iscrowd": 0,
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "area": float(area),
        "num_keypoints": labelled,
        "keypoints": keypoints,
    }


def write_synthetic_coco(
    root: str | Path,
    splits: dict[str, int],
    seed: int = 0,
    image_size: tuple[int, int] = (256, 256),
    max_people: int = 2,
) -> dict[str, tuple[Path, Path]]:
    """Writes each split's images to root/<split>/ and its annotations to
    root/annotations/person_keypoints_<split>.json. Image i of a split is drawn from a generator
    seeded with (seed, split name, i), so splits never share images and every file is
    reproducible. Each file is renamed into place whole, so that processes generating the same
    set at once never read half a file. Returns {split: (image folder, annotation file)}.

    Args:
        root: output folder, created if needed.
        splits: number of images per split, e.g. {"train": 800, "val": 200}.
        seed: the dataset's seed.
        image_size: (width, height) of every image.
        max_people: the most figures in one image.
    """
    if not splits or any(int(count) < 1 for count in splits.values()):
        raise ValueError(f"splits must map split names to positive image counts, got {splits!r}")
    if max_people < 1 or min(image_size) < 32:
        raise ValueError(f"need max_people >= 1 and images at least 32x32, got {max_people} and {image_size}")
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    written = {}
    for split_index, (split, count) in enumerate(sorted(splits.items())):
        image_dir = root / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(int(count)):
            rng = np.random.default_rng([seed, split_index, i])
            image_id = i + 1
            pixels, figures = _render_image(rng, image_size, max_people)
            file_name = f"{image_id:012d}.png"
            write_atomically(image_dir / file_name, lambda temporary: Image.fromarray(pixels).save(temporary, "PNG"))
            images.append({"id": image_id, "file_name": file_name, "width": image_size[0], "height": image_size[1]})
            for figure in figures:
                annotation = _annotation(figure, image_size, image_id, len(annotations) + 1)
                if annotation is not None:
                    annotations.append(annotation)
        categories = [{
            "id": 1, "name": "person", "supercategory": "person",
            "keypoints": list(KEYPOINT_NAMES), "skeleton": [list(pair) for pair in SKELETON],
        }]  # fmt: skip
        annotation_file = root / "annotations" / f"person_keypoints_{split}.json"
        contents = json.dumps({"images": images, "annotations": annotations, "categories": categories})
        write_atomically(annotation_file, lambda temporary: temporary.write_text(contents))
        written[split] = (image_dir, annotation_file)
    return written
