"""hgloss.pose.transforms and hgloss.pose.codecs: affine geometry, heatmap encoding and decoding, flip
test, and the encode -> decode round trip scored with COCO keypoint AP on real annotations."""

import contextlib
import io
import math
import os

import numpy as np
import pytest
import torch

from hgloss.pose.codecs import MSRAHeatmap, UDPHeatmap, decode, flip_back
from hgloss.pose.evaluation import evaluate_coco
from hgloss.pose.transforms import (
    COCO_FLIP_PAIRS,
    affine_points,
    box_to_center_scale,
    flip_points,
    get_affine_transform,
    get_udp_transform,
    warp_image,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_SAMPLE = os.path.join(ROOT, "..", "shared", "data", "coco_sample")

INPUT_SIZE = (192, 256)
HEATMAP_SIZE = (48, 64)


def as_3x3(matrix: np.ndarray) -> np.ndarray:
    return np.vstack([matrix, [0.0, 0.0, 1.0]])


# --------------------------------------------------------------------------------------------
# transforms


@pytest.mark.parametrize("transform", [get_affine_transform, get_udp_transform], ids=["plain", "udp"])
def test_transform_and_inverse_compose_to_identity(transform):
    rng = np.random.default_rng(0)
    for _ in range(50):
        center = rng.uniform(-100, 700, size=2)
        scale = rng.uniform(0.05, 3.0, size=2)
        rotation = rng.uniform(-180, 180)
        output_size = tuple(int(n) for n in rng.integers(8, 300, size=2))
        forward = transform(center, scale, rotation, output_size)
        backward = transform(center, scale, rotation, output_size, inverse=True)
        assert forward.shape == backward.shape == (2, 3)
        np.testing.assert_allclose(as_3x3(backward) @ as_3x3(forward), np.eye(3), atol=1e-9)
        np.testing.assert_allclose(as_3x3(forward) @ as_3x3(backward), np.eye(3), atol=1e-9)


def test_box_to_center_scale_hand_computed():
    # Wide box: 60 > 0.75 * 40, so the height grows to 60 / 0.75 = 80; scale = (60, 80) / 200 * 1.25.
    center, scale = box_to_center_scale([10.0, 20.0, 60.0, 40.0], aspect_ratio=192 / 256)
    assert center.dtype == scale.dtype == np.float32
    np.testing.assert_allclose(center, [40.0, 40.0])
    np.testing.assert_allclose(scale, [0.375, 0.5])
    # Tall box: 30 < 0.75 * 100, so the width grows to 75; scale = (75, 100) / 200 * 1.25.
    center, scale = box_to_center_scale([0.0, 0.0, 30.0, 100.0], aspect_ratio=0.75)
    np.testing.assert_allclose(center, [15.0, 50.0])
    np.testing.assert_allclose(scale, [0.46875, 0.625])
    # No padding and a matching aspect ratio leave the box as it is.
    center, scale = box_to_center_scale([5.0, 5.0, 30.0, 40.0], aspect_ratio=0.75, padding=1.0)
    np.testing.assert_allclose(center, [20.0, 25.0])
    np.testing.assert_allclose(scale, [0.15, 0.2])
    # Zero width (joints in a vertical line): the width comes from the height, 0.75 * 40 = 30.
    center, scale = box_to_center_scale([5.0, 5.0, 0.0, 40.0], aspect_ratio=0.75)
    np.testing.assert_allclose(center, [5.0, 25.0])
    np.testing.assert_allclose(scale, [0.1875, 0.25])


def test_affine_transform_hand_computed_points():
    center, scale = np.array([300.0, 200.0]), np.array([0.96, 1.28])  # a 192 x 256 pixel box
    matrix = get_affine_transform(center, scale, 0.0, (96, 128))
    # Half size: the centre goes to the output centre and the top-left corner to the origin.
    np.testing.assert_allclose(
        affine_points([[300.0, 200.0], [204.0, 72.0], [396.0, 328.0]], matrix),
        [[48.0, 64.0], [0.0, 0.0], [96.0, 128.0]],
        atol=1e-9,
    )
    # Rotated by 90 degrees, the box's 'up' direction (sin r, -cos r) is +x: half a box width to the right of
    # the centre lands half an output width above the output centre.
    rotated = get_affine_transform(center, scale, 90.0, (96, 128))
    np.testing.assert_allclose(affine_points([[396.0, 200.0]], rotated), [[48.0, 64.0 - 48.0]], atol=1e-9)
    # The shift moves the box centre by shift * box size.
    shifted = get_affine_transform(center, scale, 0.0, (96, 128), shift=(0.25, -0.5))
    np.testing.assert_allclose(affine_points([[348.0, 72.0]], shifted), [[48.0, 64.0]], atol=1e-9)


def test_udp_transform_maps_first_and_last_pixel_centres():
    center, scale = np.array([300.0, 200.0]), np.array([0.96, 1.28])  # 192 x 256 pixels
    matrix = get_udp_transform(center, scale, 0.0, (48, 64))
    # The first and last pixel centres of the box, centre -/+ (size - 1) / 2, go to 0 and size - 1.
    np.testing.assert_allclose(
        affine_points([[300.0 - 95.5, 200.0 - 127.5], [300.0 + 95.5, 200.0 + 127.5], [300.0, 200.0]], matrix),
        [[0.0, 0.0], [47.0, 63.0], [23.5, 31.5]],
        atol=1e-9,
    )
    # Same orientation as get_affine_transform: the box's 'up' direction points up in the output.
    for rotation in (30.0, -75.0, 140.0):
        radians = math.radians(rotation)
        up = np.array([[300.0 + 50 * math.sin(radians), 200.0 - 50 * math.cos(radians)]])
        for transform in (get_udp_transform, get_affine_transform):
            moved = affine_points(up, transform(center, scale, rotation, (48, 64)))[0]
            centre = affine_points(center[None], transform(center, scale, rotation, (48, 64)))[0]
            assert abs(moved[0] - centre[0]) < 1e-9 and moved[1] < centre[1]


def test_warp_image_moves_a_bright_pixel_where_affine_points_says():
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    bright = np.array([37.0, 22.0])
    image[int(bright[1]), int(bright[0])] = 255
    # A box of 20 x 26.7 pixels onto 48 x 64: the pixel is magnified into a blob whose centre is measurable.
    matrix = get_affine_transform([38.0, 24.0], [0.1, 0.1333], 30.0, (48, 64))
    expected = affine_points(bright[None], matrix)[0]
    warped = warp_image(image, matrix, (48, 64))
    assert warped.shape == (64, 48, 3) and warped.dtype == np.uint8
    intensity = warped[..., 0].astype(np.float64)
    peak_y, peak_x = np.unravel_index(intensity.argmax(), intensity.shape)
    assert np.hypot(peak_x - expected[0], peak_y - expected[1]) <= 1.0
    ys, xs = np.mgrid[0:64, 0:48]
    centroid = np.array([(intensity * xs).sum(), (intensity * ys).sum()]) / intensity.sum()
    # Tighter than a pixel, so that a half-pixel convention slip would show.
    np.testing.assert_allclose(centroid, expected, atol=0.2)
    # Outside the source image is filled with 0.
    far = get_affine_transform([500.0, 500.0], [0.1, 0.1333], 0.0, (48, 64))
    assert not warp_image(np.full((60, 80, 3), 200, dtype=np.uint8), far, (48, 64)).any()


def test_flip_points():
    points = np.array([[10.0, 5.0, 2.0], [3.0, 6.0, 1.0], [90.0, 7.0, 0.0]])
    flipped = flip_points(points, image_width=100, flip_pairs=[(1, 2)])
    np.testing.assert_allclose(flipped, [[89.0, 5.0, 2.0], [9.0, 7.0, 0.0], [96.0, 6.0, 1.0]])
    np.testing.assert_allclose(points[0], [10.0, 5.0, 2.0])


# --------------------------------------------------------------------------------------------
# codecs


def test_msra_encode_peak_window_and_weights():
    codec = MSRAHeatmap(INPUT_SIZE, HEATMAP_SIZE, sigma=2.0)
    keypoints = np.array(
        [
            [50.3, 101.9],  # / 4 = (12.575, 25.475), rounded (13, 25)
            [60.0, 60.0],  # invisible
            [-100.0, -100.0],  # window far above and left
            [1000.0, 50.0],  # window far to the right
            [-10.0, 50.0],  # / 4 = -2.5: int(-2.0) = -2; window columns -8..4, partly inside
            [5.0, 300.0],  # y / 4 = 75: window rows 69..81, below the 64 rows
        ]
    )
    visible = np.array([2, 0, 1, 1, 1, 1])
    heatmaps, weights = codec.encode(keypoints, visible)
    assert heatmaps.shape == (6, 64, 48) and heatmaps.dtype == np.float32
    assert weights.dtype == np.float32
    # The weight is the visibility itself, as HRNet's target_weight (COCO's 2 is clipped by the loaders).
    np.testing.assert_array_equal(weights, [2, 0, 0, 0, 1, 0])

    assert heatmaps[0, 25, 13] == 1.0 and heatmaps[0].max() == 1.0
    np.testing.assert_allclose(heatmaps[0, 25, 14], math.exp(-1 / 8), rtol=1e-6)
    np.testing.assert_allclose(heatmaps[0, 27, 12], math.exp(-5 / 8), rtol=1e-6)
    rows, cols = np.nonzero(heatmaps[0])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (19, 31, 7, 19)  # radius 3 sigma = 6

    for joint in (1, 2, 3, 5):
        assert not heatmaps[joint].any()
    rows, cols = np.nonzero(heatmaps[4])
    assert cols.min() == 0 and cols.max() == 4
    np.testing.assert_allclose(heatmaps[4, 13, 0], math.exp(-4 / 8), rtol=1e-6)  # (0, 13) is 2 from (-2, 13)


def test_udp_encode_peaks_at_the_sub_pixel_position():
    codec = UDPHeatmap(INPUT_SIZE, HEATMAP_SIZE, sigma=2.0)
    stride = np.array([191.0 / 47.0, 255.0 / 63.0])
    target = np.array([20.3, 30.8])
    heatmaps, weights = codec.encode((target * stride)[None], np.array([1]))
    assert weights[0] == 1.0
    # Pixel (21, 31) is (0.7, 0.2) from the peak; the window is centred on the rounded (20, 31).
    np.testing.assert_allclose(heatmaps[0, 31, 21], math.exp(-(0.7**2 + 0.2**2) / 8), rtol=1e-6)
    rows, cols = np.nonzero(heatmaps[0])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (25, 37, 14, 26)


def synthetic_udp_maps(count: int, margin: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(1, count, 64, 48) UDP targets at random sub-pixel heatmap positions at least margin from the border,
    and those positions (count, 2)."""
    codec = UDPHeatmap(INPUT_SIZE, HEATMAP_SIZE, sigma=2.0)
    rng = np.random.default_rng(seed)
    width, height = HEATMAP_SIZE
    positions = rng.uniform([margin, margin], [width - 1 - margin, height - 1 - margin], size=(count, 2))
    heatmaps, weights = codec.encode(positions * codec.stride, np.ones(count))
    assert weights.all()
    return heatmaps[None], positions


def test_decode_recovers_sub_pixel_positions():
    # DARK works on the log of a Gaussian; closer than ~4 px to the border the heatmap cuts the Gaussian off
    # and biases it, so the positions stay 4 px inside.
    heatmaps, positions = synthetic_udp_maps(200, margin=4.0, seed=1)
    coords, scores = decode(heatmaps, refine="dark")
    assert coords.shape == (1, 200, 2) and scores.shape == (1, 200)
    assert np.abs(coords[0] - positions).max() < 0.05
    # The score is the raw maximum, below 1 by the sub-pixel distance of the nearest pixel.
    nearest = np.round(positions)
    np.testing.assert_allclose(
        scores[0], np.exp(-((nearest - positions) ** 2).sum(axis=1) / 8), rtol=1e-6
    )
    coords, _ = decode(heatmaps, refine="argmax")
    argmax_error = np.abs(coords[0] - positions).max()
    assert argmax_error <= 0.5
    # A plain argmax is off by up to 0.5 px; the quarter shift must do better on average.
    assert np.abs(coords[0] - positions).mean() < np.abs(np.round(positions) - positions).mean()


def test_decode_accepts_torch_and_matches_numpy():
    heatmaps, _ = synthetic_udp_maps(17, margin=4.0, seed=2)
    for refine in ("dark", "argmax"):
        from_numpy = decode(heatmaps, refine=refine)
        from_torch = decode(torch.from_numpy(heatmaps), refine=refine)
        for a, b in zip(from_numpy, from_torch):
            np.testing.assert_array_equal(a, b)


def test_decode_leaves_non_positive_and_border_maxima():
    heatmaps = np.full((1, 3, 10, 12), -5.0)
    heatmaps[0, 0, 7, 5] = -1.0  # maximum below zero
    heatmaps[0, 1] = 0.0  # flat zero: argmax is the first pixel
    heatmaps[0, 2, 4, 1] = 1.0  # positive, 1 px from the left border
    heatmaps[0, 2, 4, 2] = 0.5
    heatmaps[0, 2, 5, 1] = 0.3
    coords, scores = decode(heatmaps, refine="dark")
    # A maximum <= 0 puts the location at (0, 0), as HRNet's get_max_preds; the score stays the maximum.
    np.testing.assert_array_equal(coords[0, :2], [[0.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(scores[0], [-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(coords[0, 2], [1.0, 4.0])  # DARK needs 2 px on every side
    coords, _ = decode(heatmaps, refine="argmax")
    np.testing.assert_array_equal(coords[0, :2], [[0.0, 0.0], [0.0, 0.0]])
    # HRNet shifts only where 1 < x < W - 1 and 1 < y < H - 1: x = 1 leaves both axes unshifted.
    np.testing.assert_array_equal(coords[0, 2], [1.0, 4.0])


def test_heatmap_to_image_centres():
    centers, scales = np.array([[300.0, 200.0]]), np.array([[0.96, 1.28]])
    # The heatmap centre is size / 2 for MSRA, (size - 1) / 2 for UDP; both go back to the box centre,
    # and one heatmap pixel is box width / heatmap width (MSRA) or (box - 1) / (heatmap - 1) (UDP) pixels.
    msra = MSRAHeatmap(INPUT_SIZE, HEATMAP_SIZE).heatmap_to_image([[[24.0, 32.0], [25.0, 32.0]]], centers, scales)
    np.testing.assert_allclose(msra[0], [[300.0, 200.0], [304.0, 200.0]], atol=1e-9)
    udp = UDPHeatmap(INPUT_SIZE, HEATMAP_SIZE).heatmap_to_image([[[23.5, 31.5], [23.5, 32.5]]], centers, scales)
    np.testing.assert_allclose(udp[0], [[300.0, 200.0], [300.0, 200.0 + 255.0 / 63.0]], atol=1e-9)


def test_each_codec_owns_its_crop_geometry_and_flip_shift():
    center, scale = np.array([300.0, 200.0]), np.array([0.96, 1.28])
    msra, udp = MSRAHeatmap(INPUT_SIZE, HEATMAP_SIZE), UDPHeatmap(INPUT_SIZE, HEATMAP_SIZE)
    np.testing.assert_array_equal(msra.crop_transform(center, scale, 30.0),
                                  get_affine_transform(center, scale, 30.0, INPUT_SIZE))
    np.testing.assert_array_equal(udp.crop_transform(center, scale, 30.0),
                                  get_udp_transform(center, scale, 30.0, INPUT_SIZE))
    assert msra.flip_shift and not udp.flip_shift


@pytest.mark.parametrize("codec", [MSRAHeatmap(INPUT_SIZE, HEATMAP_SIZE, 2.0), UDPHeatmap(INPUT_SIZE, HEATMAP_SIZE, 2.0)],
                         ids=["msra", "udp"])
def test_the_codecs_flip_shift_keeps_a_perfect_flip_test_unbiased(codec):
    # A perfect model predicts the targets. For the flipped crop it predicts the targets of the
    # mirrored keypoints (pixel x -> width - 1 - x); brought back with the codec's flip_shift they
    # must decode where the unflipped prediction does, and closer than with the other choice.
    rng = np.random.default_rng(5)
    width = INPUT_SIZE[0]
    keypoints = rng.uniform([16, 16], [width - 17, INPUT_SIZE[1] - 17], size=(200, 2))
    mirrored = keypoints.copy()
    mirrored[:, 0] = width - 1 - keypoints[:, 0]
    visible = np.ones(len(keypoints))
    straight, _ = codec.encode(keypoints, visible)
    flipped, _ = codec.encode(mirrored, visible)
    reference, _ = decode(straight[None], refine="dark")

    def bias(shift):
        restored = flip_back(flipped[None], [], shift=shift)
        coords, _ = decode(restored, refine="dark")
        return np.abs(coords[0, :, 0] - reference[0, :, 0]).mean()

    assert bias(codec.flip_shift) < bias(not codec.flip_shift)
    if isinstance(codec, UDPHeatmap):
        assert bias(codec.flip_shift) < 0.05  # exact up to the Gaussian's clipped window
    else:
        assert bias(codec.flip_shift) <= 0.5  # HRNet's shift leaves MSRA's rounding to the pixel


def test_flip_back():
    rng = np.random.default_rng(3)
    heatmaps = rng.standard_normal((2, 17, 8, 6)).astype(np.float32)
    original = heatmaps.copy()
    twice = flip_back(flip_back(heatmaps, [], shift=False), [], shift=False)
    np.testing.assert_array_equal(twice, heatmaps)
    twice = flip_back(flip_back(heatmaps, COCO_FLIP_PAIRS, shift=False), COCO_FLIP_PAIRS, shift=False)
    np.testing.assert_array_equal(twice, heatmaps)

    once = flip_back(heatmaps, COCO_FLIP_PAIRS, shift=False)
    assert once.dtype == np.float32
    np.testing.assert_array_equal(once[:, 0], heatmaps[:, 0, :, ::-1])  # the nose has no pair
    for left, right in COCO_FLIP_PAIRS:
        np.testing.assert_array_equal(once[:, left], heatmaps[:, right, :, ::-1])
        np.testing.assert_array_equal(once[:, right], heatmaps[:, left, :, ::-1])

    shifted = flip_back(heatmaps, COCO_FLIP_PAIRS, shift=True)
    np.testing.assert_array_equal(shifted[..., 1:], once[..., :-1])
    np.testing.assert_array_equal(shifted[..., 0], once[..., 0])
    np.testing.assert_array_equal(heatmaps, original)

    tensor = torch.from_numpy(heatmaps).double()
    for shift in (False, True):
        result = flip_back(tensor, COCO_FLIP_PAIRS, shift=shift)
        assert isinstance(result, torch.Tensor) and result.dtype == torch.float64
        np.testing.assert_array_equal(result.numpy(), flip_back(heatmaps, COCO_FLIP_PAIRS, shift=shift))
    twice = flip_back(flip_back(tensor, COCO_FLIP_PAIRS, shift=False), COCO_FLIP_PAIRS, shift=False)
    assert torch.equal(twice, tensor)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: box_to_center_scale([0, 0, 10], 0.75), "box_xywh must have shape"),
        (lambda: box_to_center_scale([0, 0, -1, 10], 0.75), "box_xywh must have a non-negative"),
        (lambda: box_to_center_scale([0, 0, 0, 0], 0.75), "box_xywh must have a non-negative"),
        (lambda: box_to_center_scale([0, 0, 10, 10], -1.0), "aspect_ratio"),
        (lambda: get_affine_transform([1, 2, 3], [1, 1], 0, (4, 4)), r"center must have shape \(2,\)"),
        (lambda: get_affine_transform([1, 2], [0, 1], 0, (4, 4)), "scale must be positive"),
        (lambda: get_udp_transform([1, 2], [1, 1], 0, (1, 4)), "output_size must exceed 1"),
        (lambda: affine_points(np.zeros((3, 3)), np.eye(2, 3)), r"points must have shape \(N, 2\)"),
        (lambda: affine_points(np.zeros((3, 2)), np.eye(3)), r"matrix must have shape \(2, 3\)"),
        (lambda: warp_image(np.zeros((4, 4), np.uint8), np.eye(2, 3), (4, 4)), "image must be"),
        (lambda: flip_points(np.zeros((3, 2)), 10, [(0, 3)]), "flip_pairs"),
        (lambda: MSRAHeatmap(sigma=0.0), "sigma"),
        (lambda: UDPHeatmap(heatmap_size=(1, 64)), "heatmap_size"),
        (lambda: MSRAHeatmap().encode(np.zeros((3, 3)), np.ones(3)), r"keypoints must have shape \(K, 2\)"),
        (lambda: MSRAHeatmap().encode(np.zeros((3, 2)), np.ones(4)), r"visible must have shape \(3,\)"),
        (lambda: MSRAHeatmap().encode(np.full((1, 2), np.nan), np.ones(1)), "finite"),
        (lambda: decode(np.zeros((2, 3, 4))), r"heatmaps must have shape \(N, K, H, W\)"),
        (lambda: decode(np.zeros((1, 1, 4, 4)), refine="soft"), "refine"),
        (lambda: decode(np.zeros((1, 1, 4, 4)), kernel=4), "kernel"),
        (lambda: MSRAHeatmap().heatmap_to_image(np.zeros((2, 3, 2)), np.zeros((1, 2)), np.ones((2, 2))), "centers"),
        (lambda: flip_back(np.zeros((1, 2, 3, 4)), [(0, 2)]), "flip_pairs"),
        (lambda: flip_back(np.zeros((2, 3, 4)), []), "heatmaps must have shape"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------------------------
# round trip on real annotations, scored by COCO keypoint AP


@pytest.fixture(scope="module")
def coco_ground_truth():
    path = os.path.join(COCO_SAMPLE, "test_coco.json")
    if not os.path.isfile(path):
        pytest.skip(f"COCO sample annotations not found at {os.path.normpath(path)}")
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def round_trip_results(coco, codec, refine: str) -> list[dict]:
    """COCO keypoint results from encoding every annotated person into its crop and decoding it back."""
    results = []
    for annotation in coco.loadAnns(coco.getAnnIds()):
        if annotation["num_keypoints"] <= 0:
            continue
        keypoints = np.array(annotation["keypoints"], dtype=np.float64).reshape(-1, 3)
        labelled = keypoints[:, 2] > 0
        center, scale = box_to_center_scale(annotation["bbox"], INPUT_SIZE[0] / INPUT_SIZE[1])
        in_crop = affine_points(keypoints[:, :2], codec.crop_transform(center, scale))
        heatmaps, weights = codec.encode(in_crop, keypoints[:, 2])
        np.testing.assert_array_equal(weights > 0, labelled)  # every labelled joint is inside its crop
        coords, _ = decode(heatmaps[None], refine=refine)
        in_image = codec.heatmap_to_image(coords, center[None], scale[None])[0]
        scored = np.concatenate([in_image, labelled[:, None].astype(np.float64)], axis=1)
        results.append(
            {
                "image_id": annotation["image_id"],
                "category_id": annotation["category_id"],
                "keypoints": scored.reshape(-1).tolist(),
                "score": 1.0,
            }
        )
    return results


def keypoint_ap(coco, results: list[dict]) -> float:
    return evaluate_coco(results, coco)["AP"]


@pytest.mark.parametrize("codec", [MSRAHeatmap(INPUT_SIZE, HEATMAP_SIZE), UDPHeatmap(INPUT_SIZE, HEATMAP_SIZE)],
                         ids=["msra", "udp"])
def test_round_trip_on_coco_annotations(coco_ground_truth, codec):
    dark_results = round_trip_results(coco_ground_truth, codec, refine="dark")
    assert dark_results, "no annotation with keypoints in the sample"
    dark_ap = keypoint_ap(coco_ground_truth, dark_results)
    argmax_ap = keypoint_ap(coco_ground_truth, round_trip_results(coco_ground_truth, codec, refine="argmax"))
    print(f"{type(codec).__name__}: {len(dark_results)} persons, AP dark {dark_ap:.4f}, argmax {argmax_ap:.4f}")
    assert dark_ap >= 0.99
    assert argmax_ap <= dark_ap
