"""Heatmap targets for keypoints, and keypoints from predicted heatmaps.

Sizes are (width, height). Keypoints are (x, y) pixels with integer coordinates at pixel centres. A codec
turns keypoints given in input-crop pixels (the network input, e.g. 192x256) into one heatmap per joint
(e.g. 48x64); :func:`decode` reads heatmap-pixel coordinates back and the codec's ``heatmap_to_image`` takes
them to image pixels through the inverse of the crop transform. ``encode_keypoints`` gives the keypoints in
heatmap pixels instead, for ``hgloss.keypoint_heatmap_loss``, which builds the same heatmaps inside the loss
(its ``encoding`` is the codec's ``encoding``).

A codec owns its geometry: the crop transform (``crop_transform``), its inverse and whether the flip test
shifts the flipped heatmaps (``flip_shift``) all come from the codec object, so a dataset, the decoding
and the flip test built from one codec cannot disagree. Two codecs are offered:

- :class:`MSRAHeatmap`, HRNet's ``generate_target``: the crop is scaled by ``heatmap / input`` and the
  Gaussian sits on the rounded position, with :func:`~hgloss.pose.transforms.get_affine_transform`.
- :class:`UDPHeatmap`, unbiased data processing (Huang et al., CVPR 2020): the crop is scaled by
  ``(heatmap - 1) / (input - 1)`` and the Gaussian sits on the exact sub-pixel position, with
  :func:`~hgloss.pose.transforms.get_udp_transform`.

Where hgloss follows HRNet, DarkPose, mmpose or OpenCV and where it departs from them, with the reason and
the test that checks it, is listed in ``docs/pose-conventions.md``.
"""

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any, TypeVar

import numpy as np
import torch
from numpy.typing import ArrayLike

from .transforms import affine_points, get_affine_transform, get_udp_transform

__all__ = ["MSRAHeatmap", "UDPHeatmap", "dark_kernel", "decode", "flip_back"]

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

    When ``3 sigma`` is an integer this is HRNet's and mmpose's window exactly. When it is not, hgloss departs
    from them. They take the window ``[int(mu - 3 sigma), int(mu + 3 sigma + 1))``, which reaches one pixel
    further up and left than down and right, and put the peak at its pixel ``floor(3 sigma + 0.5)`` (counted
    from 0): inside the map that is on ``mu`` when the fraction of ``3 sigma`` is >= 0.5 (sigma 1.5) and one
    pixel up or left of ``mu`` when it is < 0.5 (sigma 1.4); where ``mu - 3 sigma < 0`` the truncation towards
    zero moves the window, and with it the peak, one pixel right or down. Their larger window also keeps the
    weight where hgloss's misses the map: at ``mu = -(int(3 sigma) + 2)`` (a window ending at 0, nothing
    painted) and at ``mu = size + int(3 sigma)`` (one faint column or row at the edge). hgloss keeps the
    window symmetric about ``mu``, so the peak is always on ``mu`` (the fused-target kernels rely on a
    symmetric window).
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
    # The name hgloss.keypoint_heatmap_loss gives this codec's targets (its `encoding`).
    encoding: str

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
        """Heatmap targets and target weights, with HRNet's rule for the visibility (``generate_target``).

        Args:
            keypoints: (K, 2) keypoints (x, y) in input-crop pixels; only joints with visibility > 0 are read.
            visible: (K,) visibility, finite and >= 0; fractional values are allowed. As in HRNet the value
                itself becomes the weight, so COCO's v = 2 ("labelled and visible") should be clipped to 1
                first, as HRNet's loaders and :mod:`hgloss.pose.datasets` do.

        Returns:
            heatmaps: (K, H, W) float32; a joint's Gaussian is painted only where its visibility is > 0.5.
            weights: (K,) float32, the visibility, set to 0 where the Gaussian window lies outside the
            heatmap by HRNet's rule (window start ``>= size`` or window end ``< 0``, the end being exclusive;
            a window that ends exactly at 0 keeps its weight with a zero map, as in HRNet). A joint with
            ``0 < visibility <= 0.5`` thus keeps its weight on an all-zero map, as in HRNet. (mmpose's
            codecs skip joints with visibility ``< 0.5`` instead: they paint at exactly 0.5, and they leave
            the weight of a skipped joint as it is even where its window is outside the heatmap.)
        """
        keypoints, visible = self._checked(keypoints, visible)
        labelled = visible > 0
        width, height = self.heatmap_size
        heatmaps = np.zeros((keypoints.shape[0], height, width), dtype=np.float32)
        weights = visible.astype(np.float32)
        stride = self.stride
        for joint in np.flatnonzero(labelled):
            scaled = keypoints[joint] / stride
            rounded = np.array([int(scaled[0] + 0.5), int(scaled[1] + 0.5)])
            start = rounded - self.radius
            end = rounded + self.radius + 1
            if start[0] >= width or start[1] >= height or end[0] < 0 or end[1] < 0:
                weights[joint] = 0.0
                continue
            if visible[joint] <= 0.5:
                continue
            peak = self._peak(scaled, rounded)
            xs = np.arange(max(start[0], 0), min(end[0], width))
            ys = np.arange(max(start[1], 0), min(end[1], height))
            denominator = 2.0 * self.sigma**2
            gaussian_x = np.exp(-((xs - peak[0]) ** 2) / denominator)
            gaussian_y = np.exp(-((ys - peak[1]) ** 2) / denominator)
            heatmaps[joint, ys[:, None], xs[None, :]] = gaussian_y[:, None] * gaussian_x[None, :]
        return heatmaps, weights

    def encode_keypoints(self, keypoints: ArrayLike, visible: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """What ``encode`` paints its heatmaps from, for losses that build the Gaussians themselves.

        ``hgloss.keypoint_heatmap_loss(pred, heatmap_keypoints, weights, sigma=codec.sigma,
        encoding=codec.encoding)`` builds the heatmaps and weights of ``encode(keypoints, visible)``
        inside the loss, so it equals ``hgloss.heatmap_gradient_loss`` on them, wherever every
        visibility is 0 or > 0.5 (the datasets' 0 or 1). The two rules differ for
        ``0 < visibility <= 0.5``: ``encode`` keeps the weight on an all-zero map, the loss paints the
        Gaussian of every joint whose weight is not 0.

        Args:
            keypoints, visible: as in ``encode``, and checked as it checks them.

        Returns:
            heatmap_keypoints: (K, 2) float64 (x, y) in heatmap pixels, the keypoints divided by
            ``stride`` as ``encode`` divides them, so that the loss rounds them as ``encode`` does.
            weights: (K,) float32, the visibility; the loss sets the weight of a joint whose window
            misses the heatmap to 0, as ``encode`` does.
        """
        keypoints, visible = self._checked(keypoints, visible)
        return keypoints / self.stride, visible.astype(np.float32)

    def heatmap_peaks(self, heatmap_keypoints: ArrayLike, visible: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Where the heatmaps of ``encode`` peak, from the keypoints of ``encode_keypoints``, without
        painting them: training accuracy (evaluation.heatmap_pck) needs only the peaks.

        The peak is the pixel argmax finds on the painted float32 heatmap: its first maximum in
        row-major order, which decides between two equal pixels (a UDPHeatmap keypoint half way
        between them, or two values that round to one float32). Only the pixels next to the rounded
        position can be a maximum (for sigma below about 1000 heatmap pixels), so only those nine are
        evaluated, with the arithmetic of ``encode``.

        Args:
            heatmap_keypoints: (..., K, 2) (x, y) in heatmap pixels; read only where ``visible`` is
                > 0.5, the joints ``encode`` paints.
            visible: (..., K) visibility.

        Returns:
            peaks: (..., K, 2) int64 (x, y) of each heatmap's first maximum; 0 where nothing is painted.
            painted: (..., K) bool, whether the heatmap's maximum is > 0.
        """
        heatmap_keypoints = np.asarray(heatmap_keypoints, dtype=np.float64)
        visible = np.asarray(visible, dtype=np.float64)
        if heatmap_keypoints.shape[-1:] != (2,) or visible.shape != heatmap_keypoints.shape[:-1]:
            raise ValueError(
                f"heatmap_keypoints must have shape (..., K, 2) and visible (..., K), got shapes "
                f"{heatmap_keypoints.shape} and {visible.shape}"
            )
        labelled = visible > 0.5
        scaled = np.where(labelled[..., None], heatmap_keypoints, 0.0)
        rounded = np.trunc(scaled + 0.5)
        peak = self._peak(scaled, rounded)
        first = np.maximum(rounded - self.radius, 0.0)
        last = np.minimum(rounded + self.radius, np.array(self.heatmap_size, dtype=np.float64) - 1.0)
        # (..., K, 2, 3): along x and y, the pixels next to the rounded position clipped to the
        # painted window, in increasing order so that the first maximum among them is argmax's.
        pixels = np.clip(rounded[..., None] + np.array([-1.0, 0.0, 1.0]), first[..., None], last[..., None])
        gaussian = np.exp(-((pixels - peak[..., None]) ** 2) / (2.0 * self.sigma**2))
        values = (gaussian[..., 1, :, None] * gaussian[..., 0, None, :]).astype(np.float32)
        best = values.reshape(*values.shape[:-2], 9).argmax(axis=-1)
        xs = np.take_along_axis(pixels[..., 0, :], (best % 3)[..., None], axis=-1)[..., 0]
        ys = np.take_along_axis(pixels[..., 1, :], (best // 3)[..., None], axis=-1)[..., 0]
        painted = labelled & np.all(first <= last, axis=-1) & (values.max(axis=(-2, -1)) > 0)
        peaks = np.where(painted[..., None], np.stack([xs, ys], axis=-1), 0.0).astype(np.int64)
        return peaks, painted

    def _checked(self, keypoints: ArrayLike, visible: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """(keypoints, visible) as float64, with the checks of ``encode``."""
        keypoints = np.asarray(keypoints, dtype=np.float64)
        visible = np.asarray(visible, dtype=np.float64)
        if keypoints.ndim != 2 or keypoints.shape[1] != 2:
            raise ValueError(f"keypoints must have shape (K, 2), got shape {keypoints.shape}")
        if visible.shape != (keypoints.shape[0],):
            raise ValueError(f"visible must have shape ({keypoints.shape[0]},), got shape {visible.shape}")
        if not np.all(np.isfinite(visible) & (visible >= 0)):
            raise ValueError(f"visible must be finite and >= 0, got {visible.tolist()}")
        if not np.all(np.isfinite(keypoints[visible > 0])):
            raise ValueError("keypoints of visible joints must be finite")
        return keypoints, visible


class MSRAHeatmap(_GaussianHeatmap):
    """HRNet's Gaussian heatmap target (``generate_target``).

    stride = input_size / heatmap_size; the Gaussian of standard deviation ``sigma`` heatmap pixels peaks
    with value exactly 1 on the rounded position ``int(keypoint / stride + 0.5)``. A heatmap pixel ``h``
    corresponds to input-crop pixel ``h * stride``. Equal to HRNet's target and weight when ``3 sigma`` is an
    integer (sigma 1, 2, 3, ...); otherwise the window departs as described in ``_GaussianHeatmap``.
    """

    _transform = staticmethod(get_affine_transform)
    # The flipped image's pixel x lands on heatmap x' = W - 1/stride - x, not W - 1 - x; HRNet's
    # one-pixel shift makes up most of the difference.
    flip_shift = True
    encoding = "msra"

    @property
    def stride(self) -> np.ndarray:
        return np.array(self.input_size, dtype=np.float64) / np.array(self.heatmap_size, dtype=np.float64)

    def _peak(self, scaled: np.ndarray, rounded: np.ndarray) -> np.ndarray:
        return rounded.astype(np.float64)


class UDPHeatmap(_GaussianHeatmap):
    """The unbiased (UDP) Gaussian heatmap target.

    stride = (input_size - 1) / (heatmap_size - 1), so that the first and last pixel centres of the input crop
    and the heatmap coincide; the Gaussian peaks at the unrounded position ``keypoint / stride``. The window,
    the weights and the visibility rule follow the rounded position as in :class:`MSRAHeatmap` (mmpose's
    ``generate_udp_gaussian_heatmaps`` has the same window; its visibility rule differs as ``encode`` says).
    Sizes must exceed 1.
    """

    _minimum_size = 2
    _transform = staticmethod(get_udp_transform)
    # Pixel centres of crop and heatmap are aligned, so flipping the heatmap is exact.
    flip_shift = False
    encoding = "udp"

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


# OpenCV's getGaussianKernel(ksize, sigma <= 0) takes these fixed taps for the small sizes (OpenCV 4's
# getGaussianKernelBitExact; older releases had the tables up to 7 only and computed 9 from the formula).
_OPENCV_SMALL_GAUSSIAN_TAPS = {
    1: np.array([1.0]),
    3: np.array([1.0, 2.0, 1.0]) / 4.0,
    5: np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0,
    7: np.array([2.0, 7.0, 14.0, 18.0, 14.0, 7.0, 2.0]) / 64.0,
    9: np.array([4.0, 13.0, 30.0, 51.0, 60.0, 51.0, 30.0, 13.0, 4.0]) / 256.0,
}


def _opencv_gaussian_taps(kernel: int) -> np.ndarray:
    """(kernel,) the taps ``cv2.GaussianBlur(..., (kernel, kernel), 0)`` uses along each axis: OpenCV's fixed
    tables for kernel <= 9, else the Gaussian of sigma = 0.3 * ((kernel - 1) / 2 - 1) + 0.8, normalised."""
    if kernel in _OPENCV_SMALL_GAUSSIAN_TAPS:
        return _OPENCV_SMALL_GAUSSIAN_TAPS[kernel]
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1.0) + 0.8
    taps = np.exp(-((np.arange(kernel) - (kernel - 1) // 2) ** 2) / (2.0 * sigma**2))
    return taps / taps.sum()


def dark_kernel(sigma: float) -> int:
    """The DARK blur size that matches targets of width ``sigma``: the odd size nearest to what OpenCV's rule
    ``sigma = 0.3 * ((kernel - 1) / 2 - 1) + 0.8`` gives (mmpose's ``blur_kernel_size`` advice), at least 3.
    Sigma 1, 1.5, 2 and 3 give 5, 7, 11 and 17. A blur much wider than the heatmap's peak flattens it, and
    on a weak, near-flat map the Newton step then lands far from the maximum."""
    if isinstance(sigma, bool) or not isinstance(sigma, Real) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    exact = 2.0 * ((sigma - 0.8) / 0.3 + 1.0) + 1.0
    return max(3, 2 * round((exact - 1.0) / 2.0) + 1)


def _gaussian_blur(maps: np.ndarray, kernel: int) -> np.ndarray:
    """(M, H, W) maps blurred as DarkPose's ``gaussian_blur`` does before its rescaling: zeros outside the
    maps, and OpenCV's separable taps for ``cv2.GaussianBlur(map, (kernel, kernel), 0)``."""
    radius = (kernel - 1) // 2
    taps = _opencv_gaussian_taps(kernel)
    _, height, width = maps.shape
    padded = np.pad(maps, ((0, 0), (radius, radius), (radius, radius)))
    along_x = sum(tap * padded[:, :, i : i + width] for i, tap in enumerate(taps))
    return sum(tap * along_x[:, i : i + height, :] for i, tap in enumerate(taps))


def _quarter_pixel_offsets(maps: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """HRNet's refinement (``get_final_preds``): 0.25 px along each axis towards the larger of the two
    neighbours (by the sign of their difference, so none on a tie), only where the argmax satisfies HRNet's
    ``1 < x < W - 1 and 1 < y < H - 1``, one test for both axes. Returns (M, 2)."""
    _, height, width = maps.shape
    offsets = np.zeros((maps.shape[0], 2))
    inside = (xs > 1) & (xs < width - 1) & (ys > 1) & (ys < height - 1)
    r, x, y = np.arange(maps.shape[0])[inside], xs[inside], ys[inside]
    offsets[inside, 0] = 0.25 * np.sign(maps[r, y, x + 1] - maps[r, y, x - 1])
    offsets[inside, 1] = 0.25 * np.sign(maps[r, y + 1, x] - maps[r, y - 1, x])
    return offsets


def _dark_offsets(maps: np.ndarray, xs: np.ndarray, ys: np.ndarray, kernel: int) -> np.ndarray:
    """DARK's refinement (Zhang et al., CVPR 2020) as DarkPose's ``get_final_preds``: blur (``_gaussian_blur``),
    rescale each map so that its blurred maximum equals its original maximum, floor at 1e-10, take the log, and
    add one Newton step ``-H^-1 g`` by DarkPose's central differences (over +/-2 pixels for the second ones)
    where the argmax satisfies ``1 < x < W - 2 and 1 < y < H - 2`` and the Hessian's determinant is not 0.

    Departure: a map whose blurred maximum is <= 0 (possible only with negative values) gets no offset;
    DarkPose divides by that maximum, which flips the map's sign or, at 0, makes it NaN. Returns (M, 2)."""
    offsets = np.zeros((maps.shape[0], 2))
    if maps.shape[0] == 0:
        return offsets
    _, height, width = maps.shape
    blurred = _gaussian_blur(maps, kernel)
    original_max = maps.reshape(maps.shape[0], -1).max(axis=1)
    blurred_max = blurred.reshape(maps.shape[0], -1).max(axis=1)
    rescalable = blurred_max > 0
    # The blur lowers the peak; restoring it keeps the same floor relative to the peak as the input had.
    rescale = original_max / np.where(rescalable, blurred_max, 1.0)
    log_maps = np.log(np.maximum(blurred * rescale[:, None, None], _LOG_FLOOR))

    inside = rescalable & (xs > 1) & (xs < width - 2) & (ys > 1) & (ys < height - 2)
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

    Each location starts at the heatmap's integer argmax (the first maximum in row-major order) and its score
    is the heatmap's maximum. Where the maximum is <= 0 the location is (0, 0), unrefined, as HRNet's
    ``get_max_preds`` sets it (mmpose's ``get_heatmap_maximum`` sets -1 instead). Then

    - ``refine="argmax"``: HRNet's quarter-pixel shift towards the larger neighbour along each axis, only
      where ``1 < x < W - 1 and 1 < y < H - 1`` (one test for both axes, as HRNet; mmpose's
      ``refine_keypoints`` tests each axis on its own);
    - ``refine="dark"``: DarkPose's sub-pixel Newton step on the log of the heatmap blurred as
      ``cv2.GaussianBlur((kernel, kernel), 0)`` with zeros beyond the border and the peak rescaled to the
      original maximum, where ``1 < x < W - 2 and 1 < y < H - 2`` and the Hessian is invertible (a map whose
      blurred maximum is <= 0 stays unrefined, where DarkPose would divide by it).

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
    positive = scores > 0
    xs = np.where(positive, flat_index % width, 0)
    ys = np.where(positive, flat_index // width, 0)
    coords = np.stack([xs, ys], axis=1).astype(np.float64)
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
