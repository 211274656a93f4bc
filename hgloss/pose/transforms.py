"""Box and affine geometry of HRNet-style top-down pose estimation.

Coordinates are (x, y) in pixels with x to the right and y down; integer coordinates are pixel centres (the
cv2 / HRNet convention). A person box is described by its centre and its ``scale``: the box size in units of
``PIXEL_STD`` pixels, as (width, height). Affine maps are 2x3 float64 matrices ``M`` acting on column vectors
``(x, y, 1)``. Where these maps follow HRNet or mmpose and where they depart: ``docs/pose-conventions.md``.
"""

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image

__all__ = [
    "COCO_FLIP_PAIRS",
    "MPII_FLIP_PAIRS",
    "PIXEL_STD",
    "affine_points",
    "box_to_center_scale",
    "flip_points",
    "get_affine_transform",
    "get_udp_transform",
    "warp_image",
]

PIXEL_STD = 200.0

# (left, right) joint indices of the 17 COCO keypoints and the 16 MPII joints.
COCO_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
MPII_FLIP_PAIRS = ((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13))


def _vector(
    name: str, value: ArrayLike, length: int = 2, positive: bool = False, scalar_ok: bool = False
) -> np.ndarray:
    """value as a finite float64 array of shape (length,); a scalar is repeated when scalar_ok."""
    array = np.asarray(value, dtype=np.float64)
    if scalar_ok and array.ndim == 0:
        array = np.full(length, float(array))
    if array.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    if positive and not np.all(array > 0):
        raise ValueError(f"{name} must be positive, got {array.tolist()}")
    return array


def _real(name: str, value: float) -> float:
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _matrix(name: str, matrix: ArrayLike) -> np.ndarray:
    array = np.asarray(matrix, dtype=np.float64)
    if array.shape != (2, 3):
        raise ValueError(f"{name} must have shape (2, 3), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite")
    return array


def _invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The inverse of an invertible 2x3 affine map."""
    linear_inverse = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear_inverse, -linear_inverse @ matrix[:, 2:]], axis=1)


def box_to_center_scale(
    box_xywh: ArrayLike, aspect_ratio: float, padding: float = 1.25
) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale of a person box, as HRNet's ``_box2cs``.

    Args:
        box_xywh: (4,) box ``(x, y, width, height)`` in image pixels; width and height >= 0, not both 0 (a
            box of zero width, e.g. around joints in a vertical line, gets its width from the height).
        aspect_ratio: network input width / input height, e.g. 192 / 256.
        padding: factor by which the box is enlarged around its centre.

    Returns:
        center: (2,) float32, the box centre ``(x + w / 2, y + h / 2)``.
        scale: (2,) float32, ``(w, h) / PIXEL_STD * padding`` after the shorter side (relative to
        aspect_ratio) was lengthened so that ``w / h == aspect_ratio``.
    """
    box = _vector("box_xywh", box_xywh, length=4)
    aspect_ratio = _real("aspect_ratio", aspect_ratio)
    padding = _real("padding", padding)
    if box[2] < 0 or box[3] < 0 or (box[2] == 0 and box[3] == 0):
        raise ValueError(f"box_xywh must have a non-negative width and height, not both 0, got {box.tolist()}")
    if aspect_ratio <= 0:
        raise ValueError(f"aspect_ratio must be positive, got {aspect_ratio}")
    if padding <= 0:
        raise ValueError(f"padding must be positive, got {padding}")
    x, y, width, height = box
    center = np.array([x + width * 0.5, y + height * 0.5], dtype=np.float32)
    if width > aspect_ratio * height:
        height = width / aspect_ratio
    elif width < aspect_ratio * height:
        width = height * aspect_ratio
    scale = np.array([width, height]) / PIXEL_STD * padding
    return center, scale.astype(np.float32)


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """b plus (a - b) turned by 90 degrees: a point that makes (a, b, result) a right angle at b."""
    direction = a - b
    return b + np.array([-direction[1], direction[0]])


def _rotate(vector: np.ndarray, radians: float) -> np.ndarray:
    sin, cos = np.sin(radians), np.cos(radians)
    return np.array([vector[0] * cos - vector[1] * sin, vector[0] * sin + vector[1] * cos])


def _solve_affine(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 affine map taking the three (3, 2) source points onto the three target points.

    Each point pair gives two linear equations, ``[x, y, 1] @ M.T = [u, v]``; the three pairs give the six
    unknowns as one 3x3 system with two right-hand sides.
    """
    homogeneous = np.concatenate([source, np.ones((3, 1))], axis=1)
    return np.linalg.solve(homogeneous, target).T


def get_affine_transform(
    center: ArrayLike,
    scale: ArrayLike,
    rotation_deg: float,
    output_size: Sequence[float],
    shift: Sequence[float] = (0.0, 0.0),
    inverse: bool = False,
) -> np.ndarray:
    """HRNet's ``get_affine_transform``: image -> crop of a rotated box (solved in float64; HRNet passes
    the three point pairs to ``cv2.getAffineTransform`` as float32).

    The box ``scale * PIXEL_STD`` pixels wide around ``center + scale * PIXEL_STD * shift`` is mapped onto an
    output of ``output_size = (width, height)`` pixels, the box centre onto ``output_size / 2``. As in HRNet
    the zoom is ``output width / box width`` along both axes (the box height is not used), and the map is
    fixed by three point pairs: the centre, a point half a box width along the box's rotated 'up' direction
    (onto the point half an output width above the output centre), and a third point at a right angle to
    those two.

    ``rotation_deg > 0`` turns the box clockwise as seen on screen (y down): its 'up' direction is
    ``(sin r, -cos r)``, so the content appears turned counter-clockwise in the output.

    Args:
        center: (2,) box centre in image pixels.
        scale: (2,) or scalar, box size / PIXEL_STD, positive.
        rotation_deg: rotation of the box in degrees.
        output_size: (2,) output (width, height) in pixels, positive.
        shift: (2,) offset of the box centre in units of the box size.
        inverse: return the output -> image map instead.

    Returns:
        (2, 3) float64 affine matrix, image -> output (output -> image when inverse).
    """
    center = _vector("center", center)
    box_size = _vector("scale", scale, positive=True, scalar_ok=True) * PIXEL_STD
    rotation_deg = _real("rotation_deg", rotation_deg)
    output_size = _vector("output_size", output_size, positive=True)
    shift = _vector("shift", shift)

    source_up = _rotate(np.array([0.0, box_size[0] * -0.5]), np.deg2rad(rotation_deg))
    target_up = np.array([0.0, output_size[0] * -0.5])
    source = np.zeros((3, 2))
    target = np.zeros((3, 2))
    source[0] = center + box_size * shift
    source[1] = source[0] + source_up
    target[0] = output_size * 0.5
    target[1] = target[0] + target_up
    source[2] = _third_point(source[0], source[1])
    target[2] = _third_point(target[0], target[1])
    if inverse:
        return _solve_affine(target, source)
    return _solve_affine(source, target)


def get_udp_transform(
    center: ArrayLike,
    scale: ArrayLike,
    rotation_deg: float,
    output_size: Sequence[float],
    inverse: bool = False,
) -> np.ndarray:
    """The unbiased (UDP, Huang et al., CVPR 2020) image -> crop map of a rotated box.

    UDP measures sizes between the centres of the first and the last pixel: a row of ``n`` pixels spans
    ``n - 1``. The box ``scale * PIXEL_STD`` pixels in size around ``center`` therefore spans
    ``scale * PIXEL_STD - 1`` from its first to its last pixel centre, and those pixel centres
    (``center -/+ (scale * PIXEL_STD - 1) / 2`` along the box axes) map onto the output pixel centres 0 and
    ``output_size - 1``; the box centre maps onto ``(output_size - 1) / 2``. The zoom is
    ``(output_size - 1) / (scale * PIXEL_STD - 1)``, separately along x and y.

    ``rotation_deg`` turns the box as in :func:`get_affine_transform` (clockwise on screen for positive
    values), so the two functions produce the same orientation for the same angle.

    This departs from mmpose's ``get_udp_warp_matrix``, which takes ``scale`` in pixels, zooms by
    ``(output_size - 1) / scale`` (the box's pixel count, not the span between its first and last pixel
    centres) and turns the other way (its ``rotation`` equals hgloss's ``-rotation``, and is opposite to
    mmpose's own ``get_warp_matrix``). Each map is consistent with its own inverse: mmpose decodes UDP
    heatmaps to ``heatmap / (heatmap_size - 1) * input_size`` and then to
    ``/ input_size * scale + center - scale / 2``, which undoes its zoom exactly. hgloss keeps its own
    map, which is self-consistent (the round trip is measured in ``docs/pose-conventions.md``) and
    orients the crop as :func:`get_affine_transform` does.

    Args:
        center: (2,) box centre in image pixels.
        scale: (2,) or scalar, box size / PIXEL_STD; ``scale * PIXEL_STD`` must exceed 1.
        rotation_deg: rotation of the box in degrees.
        output_size: (2,) output (width, height) in pixels, each greater than 1.
        inverse: return the output -> image map instead.

    Returns:
        (2, 3) float64 affine matrix, image -> output (output -> image when inverse).
    """
    center = _vector("center", center)
    box_size = _vector("scale", scale, positive=True, scalar_ok=True) * PIXEL_STD
    rotation_deg = _real("rotation_deg", rotation_deg)
    output_size = _vector("output_size", output_size)
    if not np.all(box_size > 1):
        raise ValueError(f"scale * PIXEL_STD must exceed 1 pixel for UDP, got {box_size.tolist()}")
    if not np.all(output_size > 1):
        raise ValueError(f"output_size must exceed 1 pixel for UDP, got {output_size.tolist()}")

    radians = np.deg2rad(rotation_deg)
    sin, cos = np.sin(radians), np.cos(radians)
    # Takes the box's 'up' direction (sin r, -cos r) onto the output's (0, -1).
    box_to_axes = np.array([[cos, sin], [-sin, cos]])
    zoom = (output_size - 1.0) / (box_size - 1.0)
    linear = zoom[:, None] * box_to_axes
    offset = (output_size - 1.0) * 0.5 - linear @ center
    matrix = np.concatenate([linear, offset[:, None]], axis=1)
    return _invert_affine(matrix) if inverse else matrix


def affine_points(points: ArrayLike, matrix: ArrayLike) -> np.ndarray:
    """Apply a 2x3 affine matrix to (N, 2) points (x, y); returns (N, 2) float64."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got shape {points.shape}")
    matrix = _matrix("matrix", matrix)
    return points @ matrix[:, :2].T + matrix[:, 2]


def warp_image(image: np.ndarray, matrix: ArrayLike, output_size: Sequence[int]) -> np.ndarray:
    """Bilinear affine warp of an RGB image, pixels outside the image filled with 0.

    Args:
        image: (H, W, 3) uint8.
        matrix: (2, 3) input -> output map with integer pixel-centre coordinates, as from
            :func:`get_affine_transform`; it must be invertible.
        output_size: (width, height) of the output in pixels.

    Returns:
        (height, width, 3) uint8.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be a (H, W, 3) uint8 array, got shape {image.shape} and dtype {image.dtype}")
    matrix = _matrix("matrix", matrix)
    size = tuple(output_size)
    if len(size) != 2 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in size):
        raise ValueError(f"output_size must be two positive ints (width, height), got {output_size!r}")
    if abs(np.linalg.det(matrix[:, :2])) == 0:
        raise ValueError("matrix must be invertible")
    output_to_input = _invert_affine(matrix)
    # PIL puts pixel centres at half-integers (it applies the map to x + 0.5 and samples at the result - 0.5),
    # so the map q(u) = p(u - 0.5) + 0.5 reproduces the pixel-centre map p.
    linear = output_to_input[:, :2]
    translation = output_to_input[:, 2] + 0.5 - linear.sum(axis=1) * 0.5
    coefficients = (linear[0, 0], linear[0, 1], translation[0], linear[1, 0], linear[1, 1], translation[1])
    warped = Image.fromarray(image).transform(
        (int(size[0]), int(size[1])),
        Image.Transform.AFFINE,
        data=tuple(float(c) for c in coefficients),
        resample=Image.Resampling.BILINEAR,
        fillcolor=(0, 0, 0),
    )
    return np.asarray(warped, dtype=np.uint8)


def flip_points(points: ArrayLike, image_width: float, flip_pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Mirror keypoints horizontally: ``x -> image_width - 1 - x`` and swap each (left, right) pair of rows.

    Args:
        points: (N, 2) or (N, 3) keypoints (x, y[, visibility]); columns after x are carried along.
        image_width: width in pixels of the image being flipped.
        flip_pairs: (left, right) row indices, each in [0, N).

    Returns:
        A flipped float64 copy of points.
    """
    flipped = np.array(points, dtype=np.float64)
    if flipped.ndim != 2 or flipped.shape[1] not in (2, 3):
        raise ValueError(f"points must have shape (N, 2) or (N, 3), got shape {flipped.shape}")
    pairs = np.asarray(flip_pairs, dtype=np.int64).reshape(-1, 2)
    if pairs.size and (pairs.min() < 0 or pairs.max() >= flipped.shape[0]):
        raise ValueError(f"flip_pairs must index rows of points (N = {flipped.shape[0]}), got {pairs.tolist()}")
    flipped[:, 0] = _real("image_width", image_width) - 1.0 - flipped[:, 0]
    left, right = pairs[:, 0], pairs[:, 1]
    flipped[np.concatenate([left, right])] = flipped[np.concatenate([right, left])]
    return flipped
