"""Heatmap targets for keypoints, and keypoints from predicted heatmaps.

Sizes are (width, height). Keypoints are (x, y) pixels with integer coordinates at pixel centres. A codec
turns keypoints given in input-crop pixels (the network input, e.g. 192x256) into one heatmap per joint
(e.g. 48x64); :func:`decode` reads heatmap-pixel coordinates back and the codec's ``heatmap_to_image`` takes
them to image pixels through the inverse of the crop transform.

A codec owns its geometry: the crop transform (``crop_transform``), its inverse and whether the flip test
shifts the flipped heatmaps (``flip_shift``) all come from the codec object, so a dataset, the decoding
and the flip test built from one codec cannot disagree. Two codecs are offered:

- :class:`MSRAHeatmap`, HRNet's ``generate_target``: the crop is scaled by ``heatmap / input`` and the
  Gaussian sits on the rounded position, with :func:`~hgloss.pose.transforms.get_affine_transform`.
- :class:`UDPHeatmap`, unbiased data processing (Huang et al., CVPR 2020): the crop is scaled by
  ``(heatmap - 1) / (input - 1)`` and the Gaussian sits on the exact sub-pixel position, with
  :func:`~hgloss.pose.transforms.get_udp_transform`.
"""

from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any, TypeVar

import numpy as np
import torch
from numpy.typing import ArrayLike

from .transforms import affine_points, get_affine_transform, get_udp_transform

__all__ = ["MSRAHeatmap", "UDPHeatmap", "decode", "flip_back"]

_Heatmaps = TypeVar("_Heatmaps", np.ndarray, torch.Tensor)

# log() of the blurred heatmap is taken of at least this, so that zeros stay finite.
_LOG_FLOOR = 1e-10


def _size(name: str, value: Any, minimum: int) -> tuple[int, int]:
    size = tuple(value) if isinstance(value, (Sequence, np.ndarray)) else (value,)
    if len(size) != 2 or not all(
        isinstance(n, Integral) and not isinstance(n, bool) and n >= minimum for n in size
    ):
        raise ValueError(f"{name} must be two ints >= {minimum} (width, height), got {value!r}")
    return int(size[0]), int(size[1])


class _GaussianHeatmap:
    """A Gaussian per visible joint on a (K, H, W) heatmap; subclasses choose the stride and the peak.

    The Gaussian is ``exp(-((x - cx)^2 + (y - cy)^2) / (2 sigma^2))`` on the pixels within ``int(3 sigma)``
    of the rounded position ``mu = int(keypoint / stride + 0.5)`` (Python's ``int``, which truncates towards
    zero), clipped to the heatmap.
    """

    _minimum_size = 1

    def __init__(
        self, input_size: Sequence[int] = (192, 256), heatmap_size: Sequence[int] = (48, 64), sigma: float = 2.0
    ) -> None:
        self.input_size = _size("input_size", input_size, self._minimum_size)
        self.heatmap_size = _size("heatmap_size", heatmap_size, self._minimum_size)
        if isinstance(sigma, bool) or not isinstance(sigma, Real) or not np.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        self.sigma = float(sigma)
        self.radius = int(3 * self.sigma)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, heatmap_size={self.heatmap_size}, "
            f"sigma={self.sigma})"
        )

    @property
    def stride(self) -> np.ndarray:
        """(2,) input-crop pixels per heatmap pixel along x and y."""
        raise NotImplementedError

    @staticmethod
    def _transform(center, scale, rotation, output_size, inverse=False) -> np.ndarray:
        """The crop's affine map for this codec's geometry (a transforms.get_*_transform)."""
        raise NotImplementedError

    # Whether the flip test shifts the flipped heatmaps one pixel (flip_back's shift).
    flip_shift: bool

    def crop_transform(self, center: ArrayLike, scale: ArrayLike, rotation: float = 0.0) -> np.ndarray:
        """The 2x3 affine map from image pixels to input-crop pixels for a person box."""
        return self._transform(center, scale, rotation, self.input_size)

    def heatmap_to_image(self, coords: ArrayLike, centers: ArrayLike, scales: ArrayLike) -> np.ndarray:
        """Heatmap-pixel keypoints to image pixels: the inverse of the crop transform with rotation 0
        and the heatmap as output (HRNet's ``transform_preds`` for MSRAHeatmap).

        Args:
            coords: (N, K, 2) (x, y) in heatmap pixels.
            centers: (N, 2) box centres in image pixels.
            scales: (N, 2) box scales (box size / PIXEL_STD).

        Returns:
            (N, K, 2) float64 (x, y) in image pixels.
        """
        coords = np.asarray(coords, dtype=np.float64)
        if coords.ndim != 3 or coords.shape[2] != 2:
            raise ValueError(f"coords must have shape (N, K, 2), got shape {coords.shape}")
        batch = coords.shape[0]
        centers = np.asarray(centers, dtype=np.float64)
        scales = np.asarray(scales, dtype=np.float64)
        if centers.shape != (batch, 2):
            raise ValueError(f"centers must have shape ({batch}, 2), got shape {centers.shape}")
        if scales.shape != (batch, 2):
            raise ValueError(f"scales must have shape ({batch}, 2), got shape {scales.shape}")
        image_coords = np.empty_like(coords)
        for n in range(batch):
            to_image = self._transform(centers[n], scales[n], 0.0, self.heatmap_size, inverse=True)
            image_coords[n] = affine_points(coords[n], to_image)
        return image_coords

    def _peak(self, scaled: np.ndarray, rounded: np.ndarray) -> np.ndarray:
        """(2,) where the Gaussian peaks, from the keypoint in heatmap pixels and its rounded position."""
        raise NotImplementedError

    def encode(self, keypoints: ArrayLike, visible: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Heatmap targets and target weights.

        Args:
            keypoints: (K, 2) keypoints (x, y) in input-crop pixels; only visible ones are read.
            visible: (K,) visibility; a joint is encoded when its value is > 0.

        Returns:
            heatmaps: (K, H, W) float32, zero for joints that are not encoded.
            weights: (K,) float32, 1 for visible joints, 0 for the others and for visible joints whose
            Gaussian window lies outside the heatmap by HRNet's rule (window start ``>= size`` or window end
            ``< 0``, the end being exclusive; a window that ends exactly at 0 keeps weight 1 with a zero
            map, as in HRNet).
        """
        keypoints = np.asarray(keypoints, dtype=np.float64)
        visible = np.asarray(visible)
        if keypoints.ndim != 2 or keypoints.shape[1] != 2:
            raise ValueError(f"keypoints must have shape (K, 2), got shape {keypoints.shape}")
        if visible.shape != (keypoints.shape[0],):
            raise ValueError(f"visible must have shape ({keypoints.shape[0]},), got shape {visible.shape}")
        encoded = visible > 0
        if not np.all(np.isfinite(keypoints[encoded])):
            raise ValueError("keypoints of visible joints must be finite")

        width, height = self.heatmap_size
        heatmaps = np.zeros((keypoints.shape[0], height, width), dtype=np.float32)
        weights = encoded.astype(np.float32)
        stride = self.stride
        for joint in np.flatnonzero(encoded):
            scaled = keypoints[joint] / stride
            rounded = np.array([int(scaled[0] + 0.5), int(scaled[1] + 0.5)])
            start = rounded - self.radius
            end = rounded + self.radius + 1
            if start[0] >= width or start[1] >= height or end[0] < 0 or end[1] < 0:
                weights[joint] = 0.0
                continue
            peak = self._peak(scaled, rounded)
            xs = np.arange(max(start[0], 0), min(end[0], width))
            ys = np.arange(max(start[1], 0), min(end[1], height))
            denominator = 2.0 * self.sigma**2
            gaussian_x = np.exp(-((xs - peak[0]) ** 2) / denominator)
            gaussian_y = np.exp(-((ys - peak[1]) ** 2) / denominator)
            heatmaps[joint, ys[:, None], xs[None, :]] = gaussian_y[:, None] * gaussian_x[None, :]
        return heatmaps, weights


class MSRAHeatmap(_GaussianHeatmap):
    """HRNet's Gaussian heatmap target (``generate_target``).

    stride = input_size / heatmap_size; the Gaussian of standard deviation ``sigma`` heatmap pixels peaks
    with value exactly 1 on the rounded position ``int(keypoint / stride + 0.5)``. A heatmap pixel ``h``
    corresponds to input-crop pixel ``h * stride``.
    """

    _transform = staticmethod(get_affine_transform)
    # The flipped image's pixel x lands on heatmap x' = W - 1/stride - x, not W - 1 - x; HRNet's
    # one-pixel shift makes up most of the difference.
    flip_shift = True

    @property
    def stride(self) -> np.ndarray:
        return np.array(self.input_size, dtype=np.float64) / np.array(self.heatmap_size, dtype=np.float64)

    def _peak(self, scaled: np.ndarray, rounded: np.ndarray) -> np.ndarray:
        return rounded.astype(np.float64)


class UDPHeatmap(_GaussianHeatmap):
    """The unbiased (UDP) Gaussian heatmap target.

    stride = (input_size - 1) / (heatmap_size - 1), so that the first and last pixel centres of the input crop
    and the heatmap coincide; the Gaussian peaks at the unrounded position ``keypoint / stride``. The window
    and the weights follow the rounded position as in :class:`MSRAHeatmap`. Sizes must exceed 1.
    """

    _minimum_size = 2
    _transform = staticmethod(get_udp_transform)
    # Pixel centres of crop and heatmap are aligned, so flipping the heatmap is exact.
    flip_shift = False

    @property
    def stride(self) -> np.ndarray:
        input_size = np.array(self.input_size, dtype=np.float64)
        heatmap_size = np.array(self.heatmap_size, dtype=np.float64)
        return (input_size - 1.0) / (heatmap_size - 1.0)

    def _peak(self, scaled: np.ndarray, rounded: np.ndarray) -> np.ndarray:
        return scaled


def _heatmaps_as_numpy(name: str, heatmaps: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(heatmaps, torch.Tensor):
        array = heatmaps.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        array = np.asarray(heatmaps, dtype=np.float64)
    if array.ndim != 4:
        raise ValueError(f"{name} must have shape (N, K, H, W), got shape {tuple(array.shape)}")
    return array


def _gaussian_blur(maps: np.ndarray, kernel: int) -> np.ndarray:
    """(M, H, W) maps blurred by a separable kernel x kernel Gaussian, zeros outside the maps.

    sigma = 0.3 * ((kernel - 1) / 2 - 1) + 0.8, the value OpenCV derives from the kernel size (and DARK uses).
    """
    radius = (kernel - 1) // 2
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1.0) + 0.8
    taps = np.exp(-((np.arange(kernel) - radius) ** 2) / (2.0 * sigma**2))
    taps /= taps.sum()
    _, height, width = maps.shape
    padded = np.pad(maps, ((0, 0), (radius, radius), (radius, radius)))
    along_x = sum(tap * padded[:, :, i : i + width] for i, tap in enumerate(taps))
    return sum(tap * along_x[:, i : i + height, :] for i, tap in enumerate(taps))


def _quarter_pixel_offsets(maps: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """HRNet's refinement: 0.25 px towards the larger of the two neighbours along each axis (by the sign
    of their difference), on the axes where the argmax has both neighbours. Returns (M, 2)."""
    _, height, width = maps.shape
    rows = np.arange(maps.shape[0])
    offsets = np.zeros((maps.shape[0], 2))
    inside_x = (xs > 0) & (xs < width - 1)
    r, x, y = rows[inside_x], xs[inside_x], ys[inside_x]
    offsets[inside_x, 0] = 0.25 * np.sign(maps[r, y, x + 1] - maps[r, y, x - 1])
    inside_y = (ys > 0) & (ys < height - 1)
    r, x, y = rows[inside_y], xs[inside_y], ys[inside_y]
    offsets[inside_y, 1] = 0.25 * np.sign(maps[r, y + 1, x] - maps[r, y - 1, x])
    return offsets


def _dark_offsets(maps: np.ndarray, xs: np.ndarray, ys: np.ndarray, kernel: int) -> np.ndarray:
    """DARK's refinement (Zhang et al., CVPR 2020): one Newton step ``-H^-1 g`` on the log of the blurred
    heatmap at its argmax, by central differences over +/-2 pixels. Argmaxes closer than 2 pixels to a border,
    or with a singular Hessian, get no offset. Returns (M, 2)."""
    offsets = np.zeros((maps.shape[0], 2))
    if maps.shape[0] == 0:
        return offsets
    _, height, width = maps.shape
    blurred = _gaussian_blur(maps, kernel)
    original_max = maps.reshape(maps.shape[0], -1).max(axis=1)
    blurred_max = blurred.reshape(maps.shape[0], -1).max(axis=1)
    # The blur lowers the peak; restoring it keeps the same floor relative to the peak as the input had.
    rescale = np.where(blurred_max > 0, original_max / np.where(blurred_max > 0, blurred_max, 1.0), 1.0)
    log_maps = np.log(np.maximum(blurred * rescale[:, None, None], _LOG_FLOOR))

    inside = (xs >= 2) & (xs <= width - 3) & (ys >= 2) & (ys <= height - 3)
    r, x, y = np.arange(maps.shape[0])[inside], xs[inside], ys[inside]
    centre = log_maps[r, y, x]
    dx = 0.5 * (log_maps[r, y, x + 1] - log_maps[r, y, x - 1])
    dy = 0.5 * (log_maps[r, y + 1, x] - log_maps[r, y - 1, x])
    dxx = 0.25 * (log_maps[r, y, x + 2] - 2 * centre + log_maps[r, y, x - 2])
    dyy = 0.25 * (log_maps[r, y + 2, x] - 2 * centre + log_maps[r, y - 2, x])
    dxy = 0.25 * (
        log_maps[r, y + 1, x + 1] - log_maps[r, y - 1, x + 1] - log_maps[r, y + 1, x - 1] + log_maps[r, y - 1, x - 1]
    )
    determinant = dxx * dyy - dxy**2
    invertible = determinant != 0
    safe = np.where(invertible, determinant, 1.0)
    step = np.stack([-(dyy * dx - dxy * dy) / safe, -(dxx * dy - dxy * dx) / safe], axis=1)
    offsets[inside] = np.where(invertible[:, None], step, 0.0)
    return offsets


def decode(
    heatmaps: np.ndarray | torch.Tensor, refine: str = "dark", kernel: int = 11
) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints and scores from heatmaps.

    Each location starts at the heatmap's integer argmax and its score is the heatmap's maximum. Then

    - ``refine="argmax"``: HRNet's quarter-pixel shift towards the larger neighbour, per axis where both
      neighbours exist;
    - ``refine="dark"``: DARK's sub-pixel Newton step on the log of the heatmap blurred by a
      ``kernel x kernel`` Gaussian (zeros beyond the border, peak rescaled to the original maximum), where the
      argmax is at least 2 pixels from every border and the Hessian is invertible.

    Joints whose maximum is <= 0 keep the integer argmax, unrefined.

    Args:
        heatmaps: (N, K, H, W) numpy array or torch tensor (read as float64).
        refine: "dark" or "argmax".
        kernel: odd positive blur size for "dark".

    Returns:
        coords: (N, K, 2) float64 (x, y) in heatmap pixels (integer = pixel centre).
        scores: (N, K) float64 maxima.
    """
    maps = _heatmaps_as_numpy("heatmaps", heatmaps)
    if refine not in ("dark", "argmax"):
        raise ValueError(f"refine must be 'dark' or 'argmax', got {refine!r}")
    if refine == "dark" and (
        isinstance(kernel, bool) or not isinstance(kernel, Integral) or kernel < 1 or kernel % 2 == 0
    ):
        raise ValueError(f"kernel must be an odd positive int, got {kernel!r}")
    batch, joints, height, width = maps.shape
    if height == 0 or width == 0:
        raise ValueError(f"heatmaps must have a positive height and width, got shape {maps.shape}")
    if not np.all(np.isfinite(maps)):
        raise ValueError("heatmaps must be finite")

    maps = maps.reshape(batch * joints, height, width)
    flat_index = maps.reshape(batch * joints, -1).argmax(axis=1)
    scores = maps.reshape(batch * joints, -1)[np.arange(batch * joints), flat_index]
    xs, ys = flat_index % width, flat_index // width
    coords = np.stack([xs, ys], axis=1).astype(np.float64)
    positive = scores > 0
    if refine == "argmax":
        coords[positive] += _quarter_pixel_offsets(maps[positive], xs[positive], ys[positive])
    else:
        coords[positive] += _dark_offsets(maps[positive], xs[positive], ys[positive], int(kernel))
    return coords.reshape(batch, joints, 2), scores.reshape(batch, joints)


def flip_back(
    heatmaps: _Heatmaps, flip_pairs: Sequence[tuple[int, int]], shift: bool = True
) -> _Heatmaps:
    """Heatmaps predicted for a horizontally flipped image, brought back to the unflipped image.

    Flips along W, swaps the channels of each (left, right) joint pair, and when ``shift`` moves every column
    one pixel to the right (column 0 kept), as HRNet's flip test does to align the flipped maps.

    Args:
        heatmaps: (N, K, H, W) numpy array or torch tensor; not modified.
        flip_pairs: (left, right) joint indices, each in [0, K).
        shift: apply HRNet's one-pixel shift.

    Returns:
        (N, K, H, W) of the same type, dtype and device as heatmaps.
    """
    if not isinstance(heatmaps, (np.ndarray, torch.Tensor)):
        raise ValueError(f"heatmaps must be a numpy array or a torch tensor, got {type(heatmaps).__name__}")
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must have shape (N, K, H, W), got shape {tuple(heatmaps.shape)}")
    joints = heatmaps.shape[1]
    pairs = np.asarray(flip_pairs, dtype=np.int64).reshape(-1, 2)
    if pairs.size and (pairs.min() < 0 or pairs.max() >= joints):
        raise ValueError(f"flip_pairs must index joints of heatmaps (K = {joints}), got {pairs.tolist()}")
    order = np.arange(joints)
    order[pairs[:, 0]], order[pairs[:, 1]] = pairs[:, 1], pairs[:, 0]

    if isinstance(heatmaps, torch.Tensor):
        flipped = torch.flip(heatmaps, dims=[3])[:, torch.as_tensor(order, device=heatmaps.device)]
        if shift and heatmaps.shape[3] > 1:
            flipped = torch.cat([flipped[..., :1], flipped[..., :-1]], dim=3)
        return flipped
    flipped = heatmaps[:, order, :, ::-1].copy()
    if shift:
        flipped[..., 1:] = flipped[..., :-1].copy()
    return flipped
