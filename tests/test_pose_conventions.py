"""hgloss.pose conventions against their anchors: HRNet, DarkPose, mmpose and OpenCV.

Each anchor's rule is restated below in a few lines of numpy, following the anchor's source (the file and
function are named in each docstring), and compared with hgloss on many random inputs. Where hgloss departs
from an anchor on purpose, a test pins hgloss's rule and where the two differ. docs/pose-conventions.md lists
every convention with its test.

The restatements work in float64 where the anchors store float32 (HRNet's coordinates and targets, mmpose's
warp matrix); the rules are the same, only the last bits of rounding differ.
"""

import math

import numpy as np
import pytest

from hgloss.pose import codecs
from hgloss.pose.codecs import MSRAHeatmap, UDPHeatmap, decode
from hgloss.pose.evaluation import COCO_SIGMAS, heatmap_pck, oks_nms
from hgloss.pose.transforms import (
    COCO_FLIP_PAIRS,
    PIXEL_STD,
    affine_points,
    box_to_center_scale,
    get_affine_transform,
    get_udp_transform,
)

VISIBILITIES = (0.0, 0.3, 0.5, 0.7, 1.0)


# --------------------------------------------------------------------------------------------
# OpenCV: cv2.getGaussianKernel(ksize, sigma <= 0) and cv2.GaussianBlur(src, (k, k), 0)


def opencv_gaussian_kernel(ksize: int) -> np.ndarray:
    """OpenCV 4's getGaussianKernelBitExact (imgproc/src/smooth.dispatch.cpp) for sigma <= 0: fixed taps
    for ksize 1, 3, 5, 7 and 9, else the Gaussian of sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8 over
    x = i - (ksize - 1) / 2, normalised to sum 1. (Older releases had the tables up to 7 only.)"""
    tables = {
        1: [1.0],
        3: [0.25, 0.5, 0.25],
        5: [1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16],
        7: [1 / 32, 3.5 / 32, 7 / 32, 9 / 32, 7 / 32, 3.5 / 32, 1 / 32],
        9: [4 / 256, 13 / 256, 30 / 256, 51 / 256, 60 / 256, 51 / 256, 30 / 256, 13 / 256, 4 / 256],
    }
    if ksize in tables:
        return np.array(tables[ksize])
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    x = np.arange(ksize) - (ksize - 1) * 0.5
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def opencv_gaussian_blur(image: np.ndarray, ksize: int) -> np.ndarray:
    """cv2.GaussianBlur(image, (ksize, ksize), 0) on a 2-D float image: the separable kernel along x then
    y, with OpenCV's default border BORDER_REFLECT_101 (numpy's "reflect")."""
    radius = (ksize - 1) // 2
    taps = opencv_gaussian_kernel(ksize)
    height, width = image.shape
    padded = np.pad(image, radius, mode="reflect")
    rows = sum(tap * padded[:, i : i + width] for i, tap in enumerate(taps))
    return sum(tap * rows[i : i + height, :] for i, tap in enumerate(taps))


@pytest.mark.parametrize("kernel", [1, 3, 5, 7, 9, 11, 17])
def test_dark_blur_uses_opencvs_taps(kernel):
    np.testing.assert_allclose(codecs._opencv_gaussian_taps(kernel), opencv_gaussian_kernel(kernel), rtol=0, atol=1e-16)
    # The blur itself: random maps, zeros beyond the border (DarkPose pads with zeros before blurring).
    rng = np.random.default_rng(kernel)
    maps = rng.standard_normal((5, 13, 9))
    radius = (kernel - 1) // 2
    for plane, blurred in zip(maps, codecs._gaussian_blur(maps, kernel)):
        padded = np.pad(plane, radius)
        expected = opencv_gaussian_blur(padded, kernel)[radius : radius + 13, radius : radius + 9]
        np.testing.assert_allclose(blurred, expected, rtol=0, atol=1e-12)


def test_opencvs_nine_tap_table_is_not_the_sigma_formula():
    # The formula's taps for 9 (sigma 1.7) differ from OpenCV 4's table by up to 0.002: hgloss takes the table.
    sigma = 0.3 * (4 - 1) + 0.8
    formula = np.exp(-((np.arange(9) - 4.0) ** 2) / (2 * sigma**2))
    formula /= formula.sum()
    taps = codecs._opencv_gaussian_taps(9)
    assert np.abs(taps - formula).max() == pytest.approx(0.0020085, abs=1e-6)
    np.testing.assert_array_equal(taps * 256, [4, 13, 30, 51, 60, 51, 30, 13, 4])


@pytest.mark.parametrize("sigma, kernel", [(1.0, 5), (1.5, 7), (2.0, 11), (3.0, 17)])
def test_dark_kernel_matches_mmposes_blur_sizes(sigma, kernel):
    # mmpose's configs pair sigma 2 with blur_kernel_size 11 and sigma 3 with 17.
    assert codecs.dark_kernel(sigma) == kernel


@pytest.mark.parametrize("kernel", range(3, 32, 2))
def test_dark_kernel_inverts_opencvs_rule(kernel):
    # sigma = 0.3 * ((k - 1) / 2 - 1) + 0.8 is OpenCV's width for a k-tap Gaussian; nudged either way by less
    # than half a step of k, sigma still maps back to k.
    sigma = 0.3 * ((kernel - 1) / 2 - 1) + 0.8
    for nudge in (-0.14, 0.0, 0.14):
        assert codecs.dark_kernel(sigma + nudge) == kernel


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf"), True, "2"])
def test_dark_kernel_refuses_a_sigma_that_is_not_a_positive_number(sigma):
    with pytest.raises(ValueError, match="sigma must be a positive finite number"):
        codecs.dark_kernel(sigma)


def test_dark_kernel_is_at_least_three_taps():
    assert codecs.dark_kernel(0.1) == 3


# --------------------------------------------------------------------------------------------
# HRNet: get_max_preds and get_final_preds (lib/core/inference.py)


def hrnet_get_max_preds(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HRNet's get_max_preds: (x, y) of the first maximum of each map, (0, 0) where the maximum is <= 0."""
    batch, joints, _, width = heatmaps.shape
    flat = heatmaps.reshape(batch, joints, -1)
    index = flat.argmax(axis=2)
    maxvals = flat.max(axis=2)
    preds = np.stack([index % width, np.floor(index / width)], axis=2).astype(np.float64)
    preds *= (maxvals > 0)[..., None]
    return preds, maxvals


def hrnet_final_coords(heatmaps: np.ndarray) -> np.ndarray:
    """HRNet's get_final_preds before transform_preds (TEST.POST_PROCESS): a quarter pixel towards the larger
    neighbour on both axes where 1 < px < W - 1 and 1 < py < H - 1, px = floor(x + 0.5)."""
    coords, _ = hrnet_get_max_preds(heatmaps)
    height, width = heatmaps.shape[2:]
    for n in range(coords.shape[0]):
        for p in range(coords.shape[1]):
            hm = heatmaps[n, p]
            px, py = int(math.floor(coords[n, p, 0] + 0.5)), int(math.floor(coords[n, p, 1] + 0.5))
            if 1 < px < width - 1 and 1 < py < height - 1:
                diff = np.array([hm[py, px + 1] - hm[py, px - 1], hm[py + 1, px] - hm[py - 1, px]])
                coords[n, p] += np.sign(diff) * 0.25
    return coords


def random_argmax_maps(rng: np.random.Generator, batch: int, joints: int, height: int, width: int) -> np.ndarray:
    """Maps with ties (few distinct values), peaks on every border, all-negative and all-zero maps."""
    maps = rng.integers(-3, 4, size=(batch, joints, height, width)).astype(np.float64) / 2
    maps[:, 0] = -np.abs(maps[:, 0]) - 0.5  # maxima below zero
    maps[:, 1] = 0.0  # maximum exactly zero
    return maps


def test_argmax_decode_follows_hrnet():
    rng = np.random.default_rng(0)
    for height, width in [(64, 48), (5, 5), (3, 4), (4, 3), (2, 7), (1, 1), (1, 6), (9, 2)]:
        maps = random_argmax_maps(rng, 6, 40, height, width)
        coords, scores = decode(maps, refine="argmax")
        np.testing.assert_array_equal(coords, hrnet_final_coords(maps))
        np.testing.assert_array_equal(scores, hrnet_get_max_preds(maps)[1])


def test_argmax_refinement_needs_both_axes_inside():
    # The argmax in column 1 (x = 1 is not > 1): HRNet moves neither axis; mmpose's refine_keypoints would
    # still move y, which is inside.
    maps = np.zeros((1, 1, 8, 8))
    maps[0, 0, 4, 1], maps[0, 0, 5, 1], maps[0, 0, 4, 2] = 1.0, 0.5, 0.5
    np.testing.assert_array_equal(decode(maps, refine="argmax")[0], [[[1.0, 4.0]]])
    maps = np.roll(maps, 1, axis=3)  # now at x = 2: both axes move
    np.testing.assert_array_equal(decode(maps, refine="argmax")[0], [[[2.25, 4.25]]])


# --------------------------------------------------------------------------------------------
# DarkPose: gaussian_blur, taylor and get_final_preds (ilovepose/DarkPose lib/core/inference.py)


def darkpose_gaussian_blur(heatmaps: np.ndarray, kernel: int) -> np.ndarray:
    """DarkPose's gaussian_blur: zero padding by (kernel - 1) // 2, cv2.GaussianBlur((kernel, kernel), 0),
    crop, and rescale so that the map's maximum is its original maximum."""
    border = (kernel - 1) // 2
    out = heatmaps.copy()
    height, width = heatmaps.shape[2:]
    for i in range(heatmaps.shape[0]):
        for j in range(heatmaps.shape[1]):
            origin_max = np.max(heatmaps[i, j])
            padded = np.zeros((height + 2 * border, width + 2 * border))
            padded[border : border + height, border : border + width] = heatmaps[i, j]
            blurred = opencv_gaussian_blur(padded, kernel)[border : border + height, border : border + width]
            out[i, j] = blurred * (origin_max / np.max(blurred))
    return out


def darkpose_taylor(hm: np.ndarray, coord: np.ndarray) -> np.ndarray:
    """DarkPose's taylor: one Newton step on the log map where 1 < px < W - 2 and 1 < py < H - 2."""
    height, width = hm.shape
    px, py = int(coord[0]), int(coord[1])
    if 1 < px < width - 2 and 1 < py < height - 2:
        dx = 0.5 * (hm[py, px + 1] - hm[py, px - 1])
        dy = 0.5 * (hm[py + 1, px] - hm[py - 1, px])
        dxx = 0.25 * (hm[py, px + 2] - 2 * hm[py, px] + hm[py, px - 2])
        dxy = 0.25 * (hm[py + 1, px + 1] - hm[py - 1, px + 1] - hm[py + 1, px - 1] + hm[py - 1, px - 1])
        dyy = 0.25 * (hm[py + 2, px] - 2 * hm[py, px] + hm[py - 2, px])
        if dxx * dyy - dxy**2 != 0:
            hessian = np.array([[dxx, dxy], [dxy, dyy]])
            coord = coord - np.linalg.inv(hessian) @ np.array([dx, dy])
    return coord


def darkpose_final_coords(heatmaps: np.ndarray, kernel: int) -> np.ndarray:
    """DarkPose's get_final_preds before transform_preds."""
    coords, _ = hrnet_get_max_preds(heatmaps)
    log_maps = np.log(np.maximum(darkpose_gaussian_blur(heatmaps, kernel), 1e-10))
    for n in range(coords.shape[0]):
        for p in range(coords.shape[1]):
            coords[n, p] = darkpose_taylor(log_maps[n, p], coords[n, p])
    return coords


def random_blob_maps(rng: np.random.Generator, batch: int, joints: int, height: int, width: int) -> np.ndarray:
    """Network-like maps: a Gaussian blob anywhere (borders included) over weak noise that may go negative."""
    rows, cols = np.mgrid[0:height, 0:width]
    centres = rng.uniform([-1, -1], [width, height], size=(batch, joints, 2))
    sigmas = rng.uniform(1.0, 3.0, size=(batch, joints))
    amplitudes = rng.uniform(0.2, 1.0, size=(batch, joints))
    blobs = amplitudes[..., None, None] * np.exp(
        -((cols - centres[..., 0, None, None]) ** 2 + (rows - centres[..., 1, None, None]) ** 2)
        / (2 * sigmas[..., None, None] ** 2)
    )
    return blobs + rng.normal(0.0, 0.01, size=blobs.shape)


@pytest.mark.parametrize("kernel", [3, 5, 7, 9, 11, 17])
def test_dark_decode_follows_darkpose(kernel):
    rng = np.random.default_rng(kernel)
    for height, width in [(64, 48), (16, 21), (5, 6), (4, 4)]:
        maps = random_blob_maps(rng, 4, 17, height, width)
        maps[0, 0] = -np.abs(maps[0, 0])  # a map with no positive value: (0, 0), unrefined
        blurred_maxima = darkpose_gaussian_blur(maps, kernel).reshape(-1, height * width).max(axis=1)
        assert blurred_maxima[1:].min() > 0  # DarkPose's domain: see the next test
        coords, scores = decode(maps, refine="dark", kernel=kernel)
        np.testing.assert_allclose(coords, darkpose_final_coords(maps, kernel), rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(scores, hrnet_get_max_preds(maps)[1])
        np.testing.assert_array_equal(coords[0, 0], [0.0, 0.0])


def test_dark_decode_leaves_a_map_with_a_non_positive_blurred_maximum_unrefined():
    # One positive pixel in a negative map: the blurred map is negative everywhere. DarkPose divides by its
    # maximum, which flips the map's sign, and moves the point; hgloss leaves it on the argmax.
    maps = np.full((1, 1, 11, 11), -1.0)
    maps[0, 0, 5, 5], maps[0, 0, 5, 6], maps[0, 0, 6, 5] = 1.0, -0.2, -0.5
    assert codecs._gaussian_blur(maps[0], 11).max() < 0
    np.testing.assert_array_equal(decode(maps, refine="dark")[0], [[[5.0, 5.0]]])
    assert not np.allclose(darkpose_final_coords(maps, 11), [[[5.0, 5.0]]])


# --------------------------------------------------------------------------------------------
# HRNet: generate_target (lib/dataset/JointsDataset.py); mmpose: generate_udp_gaussian_heatmaps
# (mmpose/codecs/utils/gaussian_heatmap.py)


def hrnet_generate_target(joints, joints_vis, image_size, heatmap_size, sigma):
    """HRNet's generate_target: weight = visibility; the window [int(mu - 3 sigma), int(mu + 3 sigma + 1))
    with mu = int(joint / stride + 0.5); weight 0 where the window misses the map; the Gaussian (centre at
    index size // 2 of a 2 * 3 sigma + 1 grid) painted only where the visibility is > 0.5."""
    width, height = heatmap_size
    target = np.zeros((len(joints), height, width))
    target_weight = np.array(joints_vis, dtype=np.float64)
    tmp_size = sigma * 3
    feat_stride = np.array(image_size) / np.array(heatmap_size)
    for joint_id in range(len(joints)):
        mu_x = int(joints[joint_id][0] / feat_stride[0] + 0.5)
        mu_y = int(joints[joint_id][1] / feat_stride[1] + 0.5)
        ul = [int(mu_x - tmp_size), int(mu_y - tmp_size)]
        br = [int(mu_x + tmp_size + 1), int(mu_y + tmp_size + 1)]
        if ul[0] >= width or ul[1] >= height or br[0] < 0 or br[1] < 0:
            target_weight[joint_id] = 0
            continue
        size = 2 * tmp_size + 1
        x = np.arange(0, size, 1)
        y = x[:, None]
        x0 = y0 = size // 2
        g = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))
        g_x = max(0, -ul[0]), min(br[0], width) - ul[0]
        g_y = max(0, -ul[1]), min(br[1], height) - ul[1]
        img_x = max(0, ul[0]), min(br[0], width)
        img_y = max(0, ul[1]), min(br[1], height)
        if target_weight[joint_id] > 0.5:
            target[joint_id, img_y[0] : img_y[1], img_x[0] : img_x[1]] = g[g_y[0] : g_y[1], g_x[0] : g_x[1]]
    return target, target_weight


def mmpose_udp_gaussian_heatmaps(keypoints, keypoints_visible, heatmap_size, sigma):
    """mmpose's generate_udp_gaussian_heatmaps for one instance (keypoints in heatmap pixels): joints with
    visibility < 0.5 skipped (weight left as it is); the window as HRNet's; the peak at the exact position."""
    width, height = heatmap_size
    heatmaps = np.zeros((len(keypoints), height, width))
    weights = np.array(keypoints_visible, dtype=np.float64)
    radius = sigma * 3
    gaussian_size = 2 * radius + 1
    x = np.arange(0, gaussian_size, 1)
    y = x[:, None]
    for k in range(len(keypoints)):
        if keypoints_visible[k] < 0.5:
            continue
        mu = (keypoints[k] + 0.5).astype(np.int64)
        left, top = (mu - radius).astype(np.int64)
        right, bottom = (mu + radius + 1).astype(np.int64)
        if left >= width or top >= height or right < 0 or bottom < 0:
            weights[k] = 0
            continue
        x0 = gaussian_size // 2 + keypoints[k, 0] - mu[0]
        y0 = gaussian_size // 2 + keypoints[k, 1] - mu[1]
        gaussian = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))
        g_x1, g_x2 = max(0, -left), min(width, right) - left
        g_y1, g_y2 = max(0, -top), min(height, bottom) - top
        region = heatmaps[k, max(0, top) : min(height, bottom), max(0, left) : min(width, right)]
        np.maximum(region, gaussian[g_y1:g_y2, g_x1:g_x2], out=region)
    return heatmaps, weights


def random_keypoints(rng, count, input_size, margin):
    """Keypoints over the input crop and up to `margin` input pixels beyond every border."""
    return rng.uniform([-margin, -margin], [input_size[0] + margin, input_size[1] + margin], size=(count, 2))


def assert_targets_equal(heatmaps, expected):
    """Equal support exactly, values to float32 rounding (HRNet and mmpose compute the Gaussian in float32)."""
    np.testing.assert_array_equal(heatmaps > 0, expected > 0)
    np.testing.assert_allclose(heatmaps, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0])
@pytest.mark.parametrize(
    ("input_size", "heatmap_size"), [((192, 256), (48, 64)), ((100, 70), (33, 29)), ((24, 24), (6, 6))]
)
def test_msra_targets_equal_hrnets_when_3_sigma_is_an_integer(sigma, input_size, heatmap_size):
    rng = np.random.default_rng(int(sigma * 10) + heatmap_size[0])
    codec = MSRAHeatmap(input_size, heatmap_size, sigma)
    stride = np.array(input_size) / np.array(heatmap_size)
    for _ in range(20):
        keypoints = random_keypoints(rng, 50, input_size, margin=(3 * sigma + 3) * stride.max())
        visible = rng.choice(VISIBILITIES, size=50)
        heatmaps, weights = codec.encode(keypoints, visible)
        expected, expected_weights = hrnet_generate_target(keypoints, visible, input_size, heatmap_size, sigma)
        assert_targets_equal(heatmaps, expected)
        np.testing.assert_array_equal(weights, expected_weights.astype(np.float32))


@pytest.mark.parametrize("sigma", [1.5, 1.4])
def test_msra_targets_depart_from_hrnets_when_3_sigma_is_not_an_integer(sigma):
    # hgloss: the window mu -/+ int(3 sigma), the peak on mu. HRNet: the window [int(mu - 3 sigma),
    # int(mu + 3 sigma + 1)) and the peak at its pixel floor(3 sigma + 0.5), counted from 0. Inside the map the
    # window starts ceil(3 sigma) before mu, so the peak is on mu when 3 sigma's fraction is >= 0.5 (1.5: 4.5)
    # and one pixel before it when the fraction is < 0.5 (1.4: 4.2); where mu - 3 sigma < 0, int() truncates
    # towards zero, the window starts floor(3 sigma) before mu, and the peak moves one pixel further on.
    tmp = 3 * sigma
    below, above, centre = math.floor(tmp), math.ceil(tmp), math.floor(tmp + 0.5)
    codec = MSRAHeatmap((192, 256), (48, 64), sigma=sigma)
    width, row = 48, 30
    mus = np.arange(-12, width + 12)
    # int(x + 0.5) truncates towards zero, so a negative mu comes from x = mu - 1 (int(mu - 0.5) = mu).
    scaled = np.where(mus >= 0, mus, mus - 1.0)
    keypoints = np.stack([scaled * 4.0, np.full(len(mus), row * 4.0)], axis=1)
    heatmaps, weights = codec.encode(keypoints, np.ones(len(mus)))
    expected, expected_weights = hrnet_generate_target(keypoints, np.ones(len(mus)), (192, 256), (48, 64), sigma)
    for joint, mu in enumerate(mus):
        ours, theirs = heatmaps[joint], expected[joint]
        if ours.any():
            assert np.unravel_index(ours.argmax(), ours.shape) == (row, np.clip(mu, 0, width - 1))
            columns = np.flatnonzero(ours.any(axis=0))
            assert (columns.min(), columns.max()) == (max(mu - below, 0), min(mu + below, width - 1))
            assert np.flatnonzero(ours.any(axis=1)).min() == row - below
        if theirs.any():
            start = mu - above if mu >= tmp else mu - below
            assert np.flatnonzero(theirs.any(axis=0)).min() == max(start, 0)
            assert np.flatnonzero(theirs.any(axis=1)).min() == row - above  # one row more above than hgloss
            peak_row, peak_column = np.unravel_index(theirs.argmax(), theirs.shape)
            assert peak_row == row - above + centre
            if 0 <= start + centre < width:
                assert peak_column == start + centre
            if mu >= tmp and centre == above:  # the same Gaussian, on HRNet's larger window
                np.testing.assert_allclose(theirs[ours > 0], ours[ours > 0], rtol=1e-6)
    # The weights differ where HRNet's window just touches the map and hgloss's does not: on the left HRNet's
    # window end int(mu + 3 sigma + 1) truncates to 0, not < 0 (weight 1 on a zero map); on the right its start
    # int(mu - 3 sigma) = W - 1 keeps one faint column at distance ceil(3 sigma) > 3 sigma.
    differ = mus[weights != expected_weights]
    np.testing.assert_array_equal(differ, [-(below + 2), width + below])
    np.testing.assert_array_equal(weights[np.isin(mus, differ)], [0, 0])
    assert not expected[mus == -(below + 2)].any() and expected[mus == width + below][0, row, width - 1] > 0


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0])
def test_udp_targets_equal_mmposes_with_hrnets_visibility_rule(sigma):
    rng = np.random.default_rng(int(sigma))
    input_size, heatmap_size = (192, 256), (48, 64)
    codec = UDPHeatmap(input_size, heatmap_size, sigma)
    for _ in range(20):
        keypoints = random_keypoints(rng, 50, input_size, margin=(3 * sigma + 3) * 4.1)
        visible = rng.choice(VISIBILITIES, size=50)
        heatmaps, weights = codec.encode(keypoints, visible)
        on_heatmap = keypoints / codec.stride
        expected, expected_weights = mmpose_udp_gaussian_heatmaps(on_heatmap, visible, heatmap_size, sigma)
        # HRNet's visibility rule, as MSRAHeatmap: painted above 0.5, weight 0 wherever the window misses.
        _, hrnet_weights = hrnet_generate_target(on_heatmap, visible, heatmap_size, heatmap_size, sigma)
        np.testing.assert_array_equal(weights, hrnet_weights.astype(np.float32))
        # mmpose paints at exactly 0.5 too, and keeps the weight of a joint it skips (< 0.5) even where its
        # window misses the map; elsewhere the targets are the same.
        at_half = visible == 0.5
        assert_targets_equal(heatmaps[~at_half], expected[~at_half])
        assert not heatmaps[at_half].any()
        skipped_outside = (visible > 0) & (visible < 0.5) & (weights == 0)
        np.testing.assert_array_equal(expected_weights[skipped_outside], visible[skipped_outside])
        np.testing.assert_array_equal(weights[~skipped_outside], expected_weights[~skipped_outside].astype(np.float32))


def test_encode_refuses_negative_or_non_finite_visibility():
    for visible in ([1.0, -1.0], [1.0, np.nan]):
        with pytest.raises(ValueError, match="visible must be finite and >= 0"):
            MSRAHeatmap().encode(np.zeros((2, 2)), visible)


# --------------------------------------------------------------------------------------------
# UDP geometry: hgloss's get_udp_transform vs mmpose's get_udp_warp_matrix
# (mmpose/structures/bbox/transforms.py), decoding (mmpose/codecs/udp_heatmap.py,
# refine_keypoints_dark_udp in mmpose/codecs/utils/refinement.py) and the input -> image step of
# TopdownPoseEstimator.add_pred_to_datasample (mmpose/models/pose_estimators/topdown.py)


def mmpose_udp_warp_matrix(center, scale, rotation, output_size):
    """mmpose's get_udp_warp_matrix; scale is the box size in pixels."""
    rad = np.deg2rad(rotation)
    scale_x, scale_y = (output_size[0] - 1) / scale[0], (output_size[1] - 1) / scale[1]
    cos, sin = math.cos(rad), math.sin(rad)
    return np.array(
        [
            [cos * scale_x, -sin * scale_x, scale_x * (-center[0] * cos + center[1] * sin + 0.5 * scale[0])],
            [sin * scale_y, cos * scale_y, scale_y * (-center[0] * sin - center[1] * cos + 0.5 * scale[1])],
        ]
    )


def mmpose_refine_keypoints_dark_udp(keypoints: np.ndarray, heatmaps: np.ndarray, kernel: int) -> np.ndarray:
    """mmpose's refine_keypoints_dark_udp for (K, 2) keypoints on (K, H, W) heatmaps: blur as DarkPose, clip
    to [1e-3, 50], log, edge-pad by 1, and one Newton step with one-pixel differences and eps on the diagonal."""
    num, height, width = heatmaps.shape
    logs = np.log(np.clip(darkpose_gaussian_blur(heatmaps[None], kernel)[0], 1e-3, 50.0))
    padded = np.pad(logs, ((0, 0), (1, 1), (1, 1)), mode="edge")
    refined = keypoints.copy()
    for k in range(num):
        x, y = int(keypoints[k, 0]) + 1, int(keypoints[k, 1]) + 1
        p = padded[k]
        dx, dy = 0.5 * (p[y, x + 1] - p[y, x - 1]), 0.5 * (p[y + 1, x] - p[y - 1, x])
        dxx = p[y, x + 1] - 2 * p[y, x] + p[y, x - 1]
        dyy = p[y + 1, x] - 2 * p[y, x] + p[y - 1, x]
        dxy = 0.5 * (
            p[y + 1, x + 1] - p[y, x + 1] - p[y + 1, x] + 2 * p[y, x] - p[y, x - 1] - p[y - 1, x] + p[y - 1, x - 1]
        )
        hessian = np.array([[dxx, dxy], [dxy, dyy]]) + np.finfo(np.float32).eps * np.eye(2)
        refined[k] -= np.linalg.inv(hessian) @ np.array([dx, dy])
    return refined


def udp_round_trip_errors(count: int, seed: int) -> dict[tuple[str, str], np.ndarray]:
    """Image -> crop -> perfect UDP heatmap (sigma 2) -> decode -> image for random boxes, rotations and
    keypoints, by each geometry and each decoding. Geometry "hgloss": get_udp_transform, UDPHeatmap.encode
    and the inverse transform; "mmpose": get_udp_warp_matrix, generate_udp_gaussian_heatmaps and mmpose's
    way back (heatmap / (size - 1) * input_size, then / input_size * scale + center - scale / 2, with the
    rotation undone in mmpose's sense). Decoding "hgloss": decode(refine="dark"), DarkPose's; "mmpose":
    refine_keypoints_dark_udp, as mmpose's UDPHeatmap decodes. Returns {(geometry, decoding): (count * 17,)
    errors in heatmap pixels} (image pixels / ((box width - 1) / (heatmap width - 1)))."""
    rng = np.random.default_rng(seed)
    input_size, heatmap_size, joints = (192, 256), (48, 64), 17
    codec = UDPHeatmap(input_size, heatmap_size, sigma=2.0)
    decoders = {
        "hgloss": lambda maps: decode(maps[None], refine="dark")[0][0],
        "mmpose": lambda maps: mmpose_refine_keypoints_dark_udp(hrnet_get_max_preds(maps[None])[0][0], maps, 11),
    }
    errors: dict[tuple[str, str], list[np.ndarray]] = {}
    for _ in range(count):
        box_width = rng.uniform(40.0, 600.0)
        box_pixels = np.array([box_width, box_width * 256 / 192])
        scale = box_pixels / PIXEL_STD
        center = rng.uniform(0.0, 1000.0, size=2)
        rotation = rng.uniform(-45.0, 45.0)
        # Within 0.35 box widths of the centre: at least 4 heatmap pixels inside the map at any rotation.
        radius = 0.35 * box_width * np.sqrt(rng.uniform(size=joints))
        angle = rng.uniform(0.0, 2 * np.pi, size=joints)
        keypoints = center + np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
        heatmap_pixel = (box_width - 1) / (heatmap_size[0] - 1)

        ours, _ = codec.encode(affine_points(keypoints, codec.crop_transform(center, scale, rotation)), np.ones(joints))
        to_image = get_udp_transform(center, scale, rotation, heatmap_size, inverse=True)
        in_crop = affine_points(keypoints, mmpose_udp_warp_matrix(center, box_pixels, rotation, input_size))
        on_heatmap = in_crop / ((np.array(input_size) - 1) / (np.array(heatmap_size) - 1))
        theirs, _ = mmpose_udp_gaussian_heatmaps(on_heatmap, np.ones(joints), heatmap_size, 2.0)
        cos, sin = math.cos(np.deg2rad(rotation)), math.sin(np.deg2rad(rotation))

        def mmpose_to_image(coords):
            in_input = coords / (np.array(heatmap_size) - 1) * np.array(input_size)
            in_box_axes = in_input / np.array(input_size) * box_pixels - 0.5 * box_pixels
            return center + in_box_axes @ np.array([[cos, -sin], [sin, cos]])  # R^T applied to row vectors

        for decoding, decoder in decoders.items():
            for geometry, back in (
                ("hgloss", affine_points(decoder(ours), to_image)),
                ("mmpose", mmpose_to_image(decoder(theirs))),
            ):
                error = np.linalg.norm(back - keypoints, axis=1) / heatmap_pixel
                errors.setdefault((geometry, decoding), []).append(error)
    return {key: np.concatenate(value) for key, value in errors.items()}


def test_udp_round_trip_of_hgloss_and_mmpose():
    errors = udp_round_trip_errors(count=200, seed=0)
    for (geometry, decoding), error in errors.items():
        print(f"UDP round trip, {geometry} geometry, {decoding} decoding, {len(error)} keypoints: "
              f"mean {error.mean():.5f}, max {error.max():.5f} heatmap px")
    # hgloss's convention end to end.
    assert errors["hgloss", "hgloss"].mean() < 0.001 and errors["hgloss", "hgloss"].max() < 0.002
    # Both geometries invert exactly: with the same decoding they round-trip alike; what differs is the
    # decoding (DarkPose's +/-2 pixel differences against mmpose's one-pixel UDP variant).
    for decoding in ("hgloss", "mmpose"):
        assert abs(errors["hgloss", decoding].mean() - errors["mmpose", decoding].mean()) < 1e-4


def test_udp_transform_departs_from_mmposes_in_zoom_and_rotation_sense():
    rng = np.random.default_rng(3)
    for _ in range(50):
        center = rng.uniform(0, 500, size=2)
        box_pixels = rng.uniform(20, 400, size=2)
        rotation = rng.uniform(-180, 180)
        output_size = (48, 64)
        ours = get_udp_transform(center, box_pixels / PIXEL_STD, rotation, output_size)
        theirs = mmpose_udp_warp_matrix(center, box_pixels, -rotation, output_size)
        # Same orientation with the opposite angle, zoom (out - 1) / (box - 1) against (out - 1) / box ...
        zoom_ratio = box_pixels / (box_pixels - 1)
        np.testing.assert_allclose(ours[:, :2], theirs[:, :2] * zoom_ratio[:, None], rtol=1e-12, atol=1e-12)
        # ... and both take the box centre to the output centre (out - 1) / 2.
        for matrix in (ours, theirs):
            np.testing.assert_allclose(affine_points(center[None], matrix)[0], (np.array(output_size) - 1) / 2,
                                       atol=1e-9)


# --------------------------------------------------------------------------------------------
# HRNet: get_affine_transform (lib/utils/transforms.py)


def hrnet_affine_transform(center, scale, rot, output_size, inv=False):
    """HRNet's get_affine_transform without its float32 rounding of the points: three point pairs (the
    centre, half a box width along the rotated 'up' direction, and a third at a right angle)."""
    src_w = scale[0] * 200.0
    rad = np.pi * rot / 180
    sin, cos = np.sin(rad), np.cos(rad)
    src_dir = np.array([-(src_w * -0.5) * sin, src_w * -0.5 * cos])
    dst_dir = np.array([0, output_size[0] * -0.5])
    src = np.zeros((3, 2))
    dst = np.zeros((3, 2))
    src[0], src[1] = center, center + src_dir
    dst[0] = [output_size[0] * 0.5, output_size[1] * 0.5]
    dst[1] = dst[0] + dst_dir
    for points in (src, dst):
        direction = points[0] - points[1]
        points[2] = points[1] + np.array([-direction[1], direction[0]])
    a, b = (dst, src) if inv else (src, dst)
    return np.linalg.solve(np.concatenate([a, np.ones((3, 1))], axis=1), b).T


def test_affine_transform_is_hrnets():
    rng = np.random.default_rng(4)
    for _ in range(100):
        center, scale = rng.uniform(-50, 700, size=2), rng.uniform(0.05, 3.0, size=2)
        rotation, output_size = rng.uniform(-180, 180), rng.integers(8, 300, size=2)
        for inverse in (False, True):
            np.testing.assert_allclose(
                get_affine_transform(center, scale, rotation, output_size, inverse=inverse),
                hrnet_affine_transform(center, scale, rotation, output_size, inv=inverse),
                rtol=1e-9,
                atol=1e-9,
            )


def hrnet_box2cs(box, aspect_ratio):
    """HRNet's COCODataset._box2cs / _xywh2cs (lib/dataset/coco.py), for a centre x that is not -1 (HRNet's
    sentinel that skips the 1.25 padding; hgloss always pads)."""
    x, y, w, h = box
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    if w > aspect_ratio * h:
        h = w * 1.0 / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    return center, np.array([w / 200.0, h / 200.0], dtype=np.float32) * 1.25


def test_box_to_center_scale_is_hrnets():
    rng = np.random.default_rng(7)
    for _ in range(200):
        box = [*rng.uniform(0, 600, size=2), *rng.uniform(1, 400, size=2)]
        center, scale = box_to_center_scale(box, 192 / 256)
        expected_center, expected_scale = hrnet_box2cs(box, 192 / 256)
        np.testing.assert_array_equal(center, expected_center)
        np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)


def hrnet_flip_back(output_flipped, matched_parts):
    """HRNet's flip_back (lib/utils/transforms.py) followed by the TEST.SHIFT_HEATMAP step of validate
    (lib/core/function.py): flip along W, swap each pair's channels, move every column one to the right."""
    output_flipped = output_flipped[:, :, :, ::-1].copy()
    for pair in matched_parts:
        tmp = output_flipped[:, pair[0]].copy()
        output_flipped[:, pair[0]] = output_flipped[:, pair[1]]
        output_flipped[:, pair[1]] = tmp
    output_flipped[:, :, :, 1:] = output_flipped.copy()[:, :, :, 0:-1]
    return output_flipped


def test_flip_back_with_shift_is_hrnets():
    maps = np.random.default_rng(8).standard_normal((3, 17, 16, 12))
    np.testing.assert_array_equal(codecs.flip_back(maps, COCO_FLIP_PAIRS), hrnet_flip_back(maps, COCO_FLIP_PAIRS))


# --------------------------------------------------------------------------------------------
# HRNet: oks_iou and oks_nms (lib/nms/nms.py)


def hrnet_oks_nms(kpts_db, thresh, sigmas):
    """HRNet's oks_nms: order = scores.argsort()[::-1]; keep the first, drop those with OKS > thresh."""
    scores = np.array([instance["score"] for instance in kpts_db])
    kpts = np.array([instance["keypoints"].flatten() for instance in kpts_db])
    areas = np.array([instance["area"] for instance in kpts_db])
    variances = (sigmas * 2) ** 2
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        ious = np.zeros(order.size - 1)
        for n, d in enumerate(order[1:]):
            dx, dy = kpts[d, 0::3] - kpts[i, 0::3], kpts[d, 1::3] - kpts[i, 1::3]
            e = (dx**2 + dy**2) / variances / ((areas[i] + areas[d]) / 2 + np.spacing(1)) / 2
            ious[n] = np.sum(np.exp(-e)) / e.shape[0]
        order = order[np.where(ious <= thresh)[0] + 1]
    return keep


def test_oks_nms_follows_hrnet_with_tied_scores():
    rng = np.random.default_rng(6)
    for trial in range(200):
        count = int(rng.integers(1, 40))
        people = rng.uniform(0, 300, size=(3, 17, 3))
        instances = []
        for _ in range(count):
            keypoints = people[rng.integers(3)] + rng.normal(0, rng.choice([0.5, 5.0, 20.0]), size=(17, 3))
            # Many ties: all-zero scores in every fourth trial, else a few distinct values.
            score = 0.0 if trial % 4 == 0 else float(rng.choice([0.0, 0.25, 0.5, 1.0]))
            instances.append({"keypoints": keypoints, "score": score, "area": float(rng.uniform(500, 20000))})
        threshold = float(rng.choice([0.3, 0.5, 0.9]))
        assert oks_nms(instances, threshold) == hrnet_oks_nms(instances, threshold, COCO_SIGMAS)


def test_oks_nms_takes_the_later_of_tied_instances_first():
    # HRNet's argsort()[::-1] on equal scores: numpy's sort keeps small tied arrays in order, reversed here.
    instances = [{"keypoints": np.ones((17, 3)), "score": 0.0, "area": 100.0} for _ in range(5)]
    assert oks_nms(instances) == [4]


# --------------------------------------------------------------------------------------------
# HRNet: accuracy, calc_dists and dist_acc (lib/core/evaluate.py)


def hrnet_accuracy(output, target, thr=0.5):
    """HRNet's accuracy(output, target, hm_type='gaussian', thr): per-joint accuracies, their average over
    joints with any counted sample, and the count of such joints."""
    pred, _ = hrnet_get_max_preds(output)
    target, _ = hrnet_get_max_preds(target)
    h, w = output.shape[2], output.shape[3]
    norm = np.ones((pred.shape[0], 2)) * np.array([h, w]) / 10
    dists = np.zeros((pred.shape[1], pred.shape[0]))
    for n in range(pred.shape[0]):
        for c in range(pred.shape[1]):
            if target[n, c, 0] > 1 and target[n, c, 1] > 1:
                dists[c, n] = np.linalg.norm(pred[n, c] / norm[n] - target[n, c] / norm[n])
            else:
                dists[c, n] = -1
    acc = np.zeros(pred.shape[1])
    avg_acc, cnt = 0.0, 0
    for i in range(pred.shape[1]):
        counted = dists[i] != -1
        acc[i] = np.less(dists[i][counted], thr).sum() * 1.0 / counted.sum() if counted.sum() > 0 else -1
        if acc[i] >= 0:
            avg_acc += acc[i]
            cnt += 1
    return acc, (avg_acc / cnt if cnt != 0 else 0), cnt


@pytest.mark.parametrize(("height", "width"), [(64, 48), (48, 64), (20, 37), (7, 5), (16, 16)])
def test_heatmap_pck_hrnet_convention_is_hrnets_accuracy(height, width):
    rng = np.random.default_rng(height * width)
    for threshold in (0.5, 0.2, 1.0):
        target = random_blob_maps(rng, 8, 17, height, width)
        # Predictions near the targets, so that some are right; some maps are all negative or all zero.
        predicted = np.roll(target, rng.integers(-2, 3), axis=3) + rng.normal(0, 0.3, size=target.shape)
        target[0, :3] = -np.abs(target[0, :3])
        target[1, 3:5] = 0.0
        predicted[2, 5:7] = -1.0
        per_joint, mean, counted = heatmap_pck(predicted, target, threshold, convention="hrnet")
        expected_per_joint, expected_mean, expected_counted = hrnet_accuracy(predicted, target, threshold)
        np.testing.assert_array_equal(per_joint, expected_per_joint)
        assert mean == pytest.approx(expected_mean, rel=1e-12, abs=1e-12)
        assert counted == expected_counted


def test_heatmap_pck_conventions_differ_on_non_square_maps():
    # H = 20, W = 40; the target peak at row 5, column 5, the prediction one column to the right.
    target, predicted = np.zeros((1, 1, 20, 40)), np.zeros((1, 1, 20, 40))
    target[0, 0, 5, 5], predicted[0, 0, 5, 6] = 1.0, 1.0
    # hgloss: 1 column / (W / 10) = 0.25 < 0.5, correct. HRNet: 1 / (H / 10) = 0.5, not below 0.5.
    assert heatmap_pck(predicted, target)[0].tolist() == [1.0]
    assert heatmap_pck(predicted, target, convention="hrnet")[0].tolist() == [0.0]
    # HRNet never counts a target in the first two columns (or rows); hgloss does.
    target, predicted = np.roll(target, -4, axis=3), np.roll(predicted, -4, axis=3)  # columns 1 and 2
    assert heatmap_pck(predicted, target)[2] == 1
    assert heatmap_pck(predicted, target, convention="hrnet")[2] == 0


def test_heatmap_pck_names_a_bad_convention():
    with pytest.raises(ValueError, match="convention must be 'hgloss' or 'hrnet', got 'mmpose'"):
        heatmap_pck(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 4)), convention="mmpose")
