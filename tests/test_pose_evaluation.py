"""hgloss.pose.evaluation: COCO keypoint AP with rescoring and OKS-NMS, MPII PCKh, heatmap PCK.

Expected values are worked out by hand in the comments, or are properties of the metric (ground
truth scores AP 1, worse predictions score lower).
"""

import contextlib
import io
import json
import math
import os
import re
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools", reason="the pose evaluation needs pycocotools (pip install hgloss[pose])")

from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import Params  # noqa: E402

from conftest import ROOT  # noqa: E402
from hgloss.pose.evaluation import (  # noqa: E402
    COCO_SIGMAS,
    COCO_STAT_NAMES,
    coco_results,
    evaluate_coco,
    gaussian_fit,
    head_sizes_from_boxes,
    heatmap_pck,
    load_mpii_head_boxes,
    localisation_error,
    oks,
    oks_nms,
    pckh,
    rescore,
)

COCO_SAMPLE = os.path.join(ROOT, "..", "shared", "data", "coco_sample", "test_coco.json")


@pytest.fixture(scope="module")
def coco_ground_truth() -> COCO:
    if not os.path.isfile(COCO_SAMPLE):
        pytest.skip(f"COCO sample annotations not found at {os.path.normpath(COCO_SAMPLE)}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(COCO_SAMPLE)


def ground_truth_as_results(coco: COCO, offset: float = 0.0) -> list[dict]:
    """Every annotated person with keypoints as a result of score 1, each keypoint moved by
    (offset, offset). People without keypoints are left out: COCOeval ignores them."""
    results = []
    for annotation in coco.dataset["annotations"]:
        if annotation["num_keypoints"] == 0:
            continue
        keypoints = np.asarray(annotation["keypoints"], dtype=np.float64).reshape(-1, 3)
        keypoints[:, :2] += offset
        results.append(
            {
                "image_id": annotation["image_id"],
                "category_id": 1,
                "keypoints": keypoints.ravel().tolist(),
                "score": 1.0,
            }
        )
    return results


# --- COCO ----------------------------------------------------------------------------------------


def test_coco_sigmas_match_pycocotools():
    np.testing.assert_allclose(COCO_SIGMAS, Params(iouType="keypoints").kpt_oks_sigmas, rtol=0, atol=1e-12)


def test_ground_truth_as_results_scores_ap_one(coco_ground_truth):
    stats = evaluate_coco(ground_truth_as_results(coco_ground_truth), coco_ground_truth)
    assert list(stats) == list(COCO_STAT_NAMES)
    for name in COCO_STAT_NAMES:
        assert stats[name] == pytest.approx(1.0, abs=1e-6), name


def test_ground_truth_path_is_accepted(coco_ground_truth):
    stats = evaluate_coco(ground_truth_as_results(coco_ground_truth), COCO_SAMPLE)
    assert stats["AP"] == pytest.approx(1.0, abs=1e-6)


def test_ap_decreases_as_keypoints_move_away(coco_ground_truth):
    offsets = [0, 1, 2, 4, 8, 16]
    aps = [
        evaluate_coco(ground_truth_as_results(coco_ground_truth, offset), coco_ground_truth)["AP"] for offset in offsets
    ]
    assert all(worse < better for better, worse in zip(aps, aps[1:])), dict(zip(offsets, aps))


def test_evaluate_coco_does_not_print(coco_ground_truth, capsys):
    evaluate_coco(ground_truth_as_results(coco_ground_truth), COCO_SAMPLE)
    assert capsys.readouterr().out == ""


def test_empty_results_score_zero(coco_ground_truth):
    assert evaluate_coco([], coco_ground_truth) == dict.fromkeys(COCO_STAT_NAMES, 0.0)


def test_unknown_image_id_is_named(coco_ground_truth):
    results = ground_truth_as_results(coco_ground_truth)
    results.append({**results[0], "image_id": 987654321})
    with pytest.raises(ValueError, match="987654321"):
        evaluate_coco(results, coco_ground_truth)


def test_evaluate_coco_leaves_results_unchanged(coco_ground_truth):
    results = ground_truth_as_results(coco_ground_truth)[:2]
    before = json.dumps(results)
    evaluate_coco(results, coco_ground_truth)
    assert json.dumps(results) == before


# --- OKS and OKS-NMS -----------------------------------------------------------------------------


def test_oks_single_joint_by_hand():
    # d = 2, sigma = 0.1, area = 100: d^2 / (2 * area * (2 sigma)^2) = 4 / (2 * 100 * 0.04) = 0.5.
    reference = [[0.0, 0.0, 2.0]]
    candidate = [[2.0, 0.0, 0.0]]  # the third column (visibility/score) is ignored in both
    assert oks(reference, candidate, 100.0, sigmas=[0.1]) == pytest.approx(math.exp(-0.5), rel=1e-12)
    assert oks(reference, reference, 100.0, sigmas=[0.1]) == 1.0


def test_oks_averages_over_all_joints():
    # Joint 0 exact (exp(0) = 1), joint 1 as in the single-joint case (exp(-0.5)).
    reference = [[0.0, 0.0, 1.0], [5.0, 5.0, 0.0]]
    candidate = [[0.0, 0.0, 1.0], [5.0, 7.0, 1.0]]
    assert oks(reference, candidate, 100.0, sigmas=[0.1, 0.1]) == pytest.approx((1 + math.exp(-0.5)) / 2, rel=1e-12)


def person(generator: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    """17 keypoints [x, y, score] spread over a 100 x 200 box."""
    keypoints = np.ones((17, 3))
    keypoints[:, 0] = generator.uniform(0, 100, 17) + shift
    keypoints[:, 1] = generator.uniform(0, 200, 17)
    return keypoints


def test_oks_nms_drops_a_lower_scored_near_copy():
    original = person(np.random.default_rng(0))
    near_copy = original + [0.5, -0.5, 0.0]
    first = {"keypoints": original, "score": 0.9, "area": 20000.0}
    second = {"keypoints": near_copy, "score": 0.8, "area": 20000.0}
    assert oks_nms([first, second]) == [0]
    assert oks_nms([second, first]) == [1]


def test_oks_nms_keeps_distant_people_in_score_order():
    generator = np.random.default_rng(1)
    left = {"keypoints": person(generator), "score": 0.6, "area": 20000.0}
    right = {"keypoints": person(generator, shift=500.0), "score": 0.9, "area": 20000.0}
    assert oks_nms([left, right]) == [1, 0]


def test_oks_nms_uses_the_mean_area_and_drops_above_threshold():
    # d = 2, sigma = 0.1, mean area (100 + 300) / 2 = 200: OKS = exp(-4 / (2 * 200 * 0.04)) = exp(-0.25)
    # = 0.7788. With the first area alone it would be exp(-0.5) = 0.61, with the second exp(-1/6) = 0.85.
    kept = {"keypoints": [[0.0, 0.0, 1.0]], "score": 0.9, "area": 100.0}
    candidate = {"keypoints": [[2.0, 0.0, 1.0]], "score": 0.5, "area": 300.0}
    assert oks_nms([kept, candidate], threshold=0.7, sigmas=[0.1]) == [0]
    assert oks_nms([kept, candidate], threshold=0.8, sigmas=[0.1]) == [0, 1]


def test_oks_nms_of_nothing():
    assert oks_nms([]) == []


# --- rescoring and COCO results ------------------------------------------------------------------


def test_rescore_by_hand():
    # Above 0.2: 0.9, 0.5, 0.3 (0.2 itself is not above): mean 1.7 / 3, times the box score 0.8.
    assert rescore([0.9, 0.1, 0.5, 0.2, 0.3], 0.8) == pytest.approx(1.7 / 3 * 0.8, rel=1e-12)
    assert rescore([0.9, 0.1, 0.5, 0.2, 0.3], 0.8, threshold=0.6) == pytest.approx(0.9 * 0.8, rel=1e-12)
    assert rescore([0.1, 0.2], 0.8) == 0.0


def small_predictions():
    """Two images: image 7 has a person (index 0) and a near-copy of it (index 2), image 3 one person."""
    image_ids = [7, 3, 7]
    keypoints = [
        [[10.0, 20.0, 0.9], [30.0, 40.0, 0.5]],
        [[50.0, 60.0, 0.1], [70.0, 80.0, 0.1]],
        [[10.5, 20.0, 0.95], [30.0, 40.5, 0.7]],
    ]
    box_scores = [0.8, 0.6, 1.0]
    areas = [1000.0, 500.0, 1000.0]
    return image_ids, keypoints, box_scores, areas


# Rescored: index 0: mean(0.9, 0.5) * 0.8 = 0.56; index 1: no keypoint score above 0.2 -> 0;
# index 2: mean(0.95, 0.7) * 1.0 = 0.825.
RESULT_0 = {"image_id": 7, "category_id": 1, "keypoints": [10.0, 20.0, 0.9, 30.0, 40.0, 0.5], "score": 0.56}
RESULT_1 = {"image_id": 3, "category_id": 1, "keypoints": [50.0, 60.0, 0.1, 70.0, 80.0, 0.1], "score": 0.0}
RESULT_2 = {"image_id": 7, "category_id": 1, "keypoints": [10.5, 20.0, 0.95, 30.0, 40.5, 0.7], "score": 0.825}


def assert_results_equal(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.keys() == want.keys()
        assert got["image_id"] == want["image_id"] and type(got["image_id"]) is int
        assert got["category_id"] == 1
        assert got["keypoints"] == pytest.approx(want["keypoints"], abs=1e-12)
        assert got["score"] == pytest.approx(want["score"], abs=1e-12)


def test_coco_results_rescore_and_suppress_per_image():
    # Index 2 outscores its near-copy 0 (OKS about 0.997 with sigmas 0.1, area 1000) and removes it;
    # image 7 comes first, as in the input.
    results = coco_results(*small_predictions(), sigmas=[0.1, 0.1])
    assert_results_equal(results, [RESULT_2, RESULT_1])
    json.dumps(results)  # plain Python types, ready to write


def test_coco_results_without_nms_keep_input_order_per_image():
    results = coco_results(*small_predictions(), nms_threshold=None)
    assert_results_equal(results, [RESULT_0, RESULT_2, RESULT_1])


def test_coco_results_accept_tensors():
    image_ids, keypoints, box_scores, areas = small_predictions()
    floats = [torch.tensor(values, dtype=torch.float64) for values in (keypoints, box_scores, areas)]
    results = coco_results(torch.tensor(image_ids), *floats, nms_threshold=None)
    assert_results_equal(results, [RESULT_0, RESULT_2, RESULT_1])


def test_coco_results_of_nothing():
    assert coco_results([], np.zeros((0, 17, 3)), [], []) == []


# --- MPII PCKh -----------------------------------------------------------------------------------


def test_pckh_by_hand():
    head_sizes = [10.0, 50.0, 10.0]
    # Prediction minus ground truth per (person, joint); distances 5, 1, 50 and 5 from 3-4-5 triangles.
    offsets = np.array(
        [
            [[3.0, 4.0], [0.0, 1.0], [100.0, 0.0]],
            [[30.0, 40.0], [3.0, 4.0], [0.0, 0.0]],
            [[0.0, 0.0], [100.0, 100.0], [0.0, 0.0]],
        ]
    )
    visible = [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
    ground_truth = np.arange(18, dtype=np.float64).reshape(3, 3, 2) * 7
    scores = pckh(ground_truth + offsets, ground_truth, visible, head_sizes)

    # @0.5 (bounds 5, 25, 5): joint 0: 5 <= 5 yes, 50 <= 25 no -> 1/2; joint 1: 1 <= 5, 5 <= 25 -> 2/2;
    # joint 2 is never visible. Person 2 is invisible throughout, so its exact joint 0 and its wild
    # joint 1 do not count.
    np.testing.assert_array_equal(scores["PCKh@0.5_per_joint"], [0.5, 1.0, np.nan])
    assert scores["PCKh@0.5"] == pytest.approx(0.75, abs=1e-12)
    # @0.1 (bounds 1, 5, 1): joint 0: 5 <= 1 no, 50 <= 5 no -> 0; joint 1: 1 <= 1 yes, 5 <= 5 yes -> 1.
    np.testing.assert_array_equal(scores["PCKh@0.1_per_joint"], [0.0, 1.0, np.nan])
    assert scores["PCKh@0.1"] == pytest.approx(0.5, abs=1e-12)
    assert set(scores) == {"PCKh@0.5", "PCKh@0.5_per_joint", "PCKh@0.1", "PCKh@0.1_per_joint"}


def test_pckh_just_past_the_bound_is_wrong():
    scores = pckh([[[0.0, 5.000001]]], [[[0.0, 0.0]]], [[True]], [10.0], thresholds=(0.5,))
    assert scores["PCKh@0.5"] == 0.0


def test_pckh_with_nothing_visible_is_nan():
    scores = pckh(np.zeros((2, 3, 2)), np.zeros((2, 3, 2)), np.zeros((2, 3), dtype=bool), [1.0, 1.0], thresholds=(0.5,))
    assert math.isnan(scores["PCKh@0.5"])
    assert np.isnan(scores["PCKh@0.5_per_joint"]).all()


def test_head_sizes_are_sixty_percent_of_the_diagonal():
    # Diagonals 10 (6 x 8) and 5 (3 x 4).
    np.testing.assert_allclose(head_sizes_from_boxes([[0, 0, 6, 8], [10, 20, 13, 24]]), [6.0, 3.0], rtol=1e-12)


def test_load_head_boxes_from_json(tmp_path):
    path = tmp_path / "head_boxes.json"
    path.write_text(json.dumps([[1, 2, 3, 4], [5, 6, 7, 8]]))
    np.testing.assert_array_equal(load_mpii_head_boxes(path), [[1, 2, 3, 4], [5, 6, 7, 8]])


def test_load_head_boxes_from_mat_layout(monkeypatch):
    # HRNet's gt_valid.mat: headboxes_src[corner, coordinate, person].
    corners = np.array([[[1, 5], [2, 6]], [[3, 7], [4, 8]]], dtype=np.float64)
    scipy_io = types.ModuleType("scipy.io")
    scipy_io.loadmat = lambda path: {"headboxes_src": corners}
    scipy = types.ModuleType("scipy")
    scipy.io = scipy_io
    monkeypatch.setitem(sys.modules, "scipy", scipy)
    monkeypatch.setitem(sys.modules, "scipy.io", scipy_io)
    np.testing.assert_array_equal(load_mpii_head_boxes("gt_valid.mat"), [[1, 2, 3, 4], [5, 6, 7, 8]])


def test_load_head_boxes_from_mat_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ImportError, match="scipy") as raised:
        load_mpii_head_boxes("gt_valid.mat")
    assert "json" in str(raised.value)


# --- heatmap PCK ---------------------------------------------------------------------------------


def one_hot_heatmaps(peaks: list[list[tuple[int, int] | None]], height: int, width: int) -> np.ndarray:
    """(N, K, H, W) heatmaps with 1 at each (row, column) peak; all zeros where the peak is None."""
    maps = np.zeros((len(peaks), len(peaks[0]), height, width))
    for sample, joints in enumerate(peaks):
        for joint, peak in enumerate(joints):
            if peak is not None:
                maps[(sample, joint, *peak)] = 1.0
    return maps


# H = 20, W = 40: row offsets are divided by 2, column offsets by 4.
HEATMAP_TARGET = one_hot_heatmaps([[(5, 5), (5, 5), None], [(10, 10), (3, 3), None]], 20, 40)
HEATMAP_PREDICTED = one_hot_heatmaps([[(5, 5), (5, 6), (0, 0)], [(11, 10), (3, 4), (7, 7)]], 20, 40)


def test_heatmap_pck_by_hand():
    # Joint 0: distance 0 (correct) and one row = 0.5, not below 0.5 (wrong) -> 0.5. Joint 1: one
    # column = 0.25 twice (correct) -> 1. Joint 2: no target peak, not counted -> -1.
    per_joint, mean, counted = heatmap_pck(HEATMAP_PREDICTED, HEATMAP_TARGET)
    np.testing.assert_allclose(per_joint, [0.5, 1.0, -1.0], rtol=0, atol=1e-12)
    assert mean == pytest.approx(0.75, abs=1e-12)
    assert counted == 2


def test_heatmap_pck_threshold_and_tensors():
    # At 0.2 the column offsets of 0.25 are wrong too: joint 0 -> 0.5, joint 1 -> 0.
    per_joint, mean, counted = heatmap_pck(
        torch.tensor(HEATMAP_PREDICTED, dtype=torch.float32), torch.tensor(HEATMAP_TARGET), threshold=0.2
    )
    np.testing.assert_allclose(per_joint, [0.5, 0.0, -1.0], rtol=0, atol=1e-12)
    assert mean == pytest.approx(0.25, abs=1e-12)
    assert counted == 2


def test_heatmap_pck_needs_a_positive_target_maximum():
    per_joint, mean, counted = heatmap_pck(HEATMAP_PREDICTED, -np.ones_like(HEATMAP_TARGET))
    np.testing.assert_array_equal(per_joint, [-1.0, -1.0, -1.0])
    assert (mean, counted) == (0.0, 0)


# --- argument checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: oks(np.zeros((17, 2)), np.zeros((17, 3)), 1.0), "keypoints_a must have shape (K, 3), got (17, 2)"),
        (lambda: oks(np.zeros((17, 3)), np.zeros((16, 3)), 1.0), "keypoints_b must have shape (K, 3) with K = 17"),
        (lambda: oks(np.zeros((2, 3)), np.zeros((2, 3)), 1.0), "sigmas must have shape (K,) with K = 2"),
        (
            lambda: oks_nms([{"keypoints": np.zeros((17, 3)), "score": 1, "area": 1}, {"keypoints": np.zeros((5, 3))}]),
            "instances[1] must be a dict with 'keypoints', 'score' and 'area'",
        ),
        (lambda: rescore(np.zeros((17, 1)), 1.0), "keypoint_scores must have shape (K,), got (17, 1)"),
        (lambda: coco_results([1], np.zeros((1, 17, 2)), [1.0], [1.0]), "keypoints must have shape (N, K, 3)"),
        (
            lambda: coco_results([1], np.zeros((1, 17, 3)), [1.0, 2.0], [1.0]),
            "box_scores must have shape (N,) with N = 1",
        ),
        (lambda: coco_results([1.5], np.zeros((1, 17, 3)), [1.0], [1.0]), "image_ids must be integers"),
        (lambda: evaluate_coco([{"image_id": 1}], COCO()), "results[0] must be a dict with"),
        (
            lambda: pckh(np.zeros((2, 3, 2)), np.zeros((2, 3, 2)), np.ones((2, 4)), [1.0, 1.0]),
            "visible must have shape (N, K) with K = 3",
        ),
        (
            lambda: pckh(np.zeros((1, 3, 2)), np.zeros((1, 3, 2)), np.ones((1, 3)), [0.0]),
            "head_sizes must be finite and > 0",
        ),
        (lambda: head_sizes_from_boxes(np.zeros((2, 3))), "head_boxes must have shape (N, 4), got (2, 3)"),
        (
            lambda: heatmap_pck(np.zeros((2, 3, 4)), np.zeros((2, 3, 4))),
            "predicted must have shape (N, K, H, W), got (2, 3, 4)",
        ),
        (
            lambda: heatmap_pck(np.zeros((2, 3, 4, 5)), np.zeros((2, 3, 4, 6))),
            "target must have shape (N, K, H, W) with W = 5",
        ),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def gaussian_plane(height, width, x0, y0, sigma, amplitude=1.0):
    rows, cols = np.mgrid[0:height, 0:width]
    return amplitude * np.exp(-((cols - x0) ** 2 + (rows - y0) ** 2) / (2 * sigma**2))


def test_gaussian_fit_recovers_a_gaussian_and_scores_what_is_not_one():
    rng = np.random.default_rng(0)
    exact = gaussian_plane(24, 16, 7.25, 10.5, 1.3, 0.8)  # centre and sigma on the fit's grid
    noisy = exact + 0.1 * rng.random((24, 16))
    two_peaks = gaussian_plane(24, 16, 3, 4, 1.0) + gaussian_plane(24, 16, 12, 19, 1.0)
    fit = gaussian_fit(np.stack([exact, noisy, two_peaks, np.zeros((24, 16))])[None])
    assert fit["residual"].shape == (1, 4)
    residual, sigma, peak = fit["residual"][0], fit["sigma"][0], fit["peak"][0]
    assert residual[0] < 1e-3 and abs(sigma[0] - 1.3) < 0.05 and peak[0] == pytest.approx(exact.max())
    assert 0.01 < residual[1] < residual[2] and residual[2] == pytest.approx(0.5, abs=0.01)
    assert residual[3] == 1.0 and peak[3] == 0.0
    with pytest.raises(ValueError, match=r"heatmaps must have shape \(\.\.\., H, W\)"):
        gaussian_fit(np.zeros(5))


def test_localisation_error_is_in_heatmap_pixels():
    truth = np.zeros((2, 3, 2))
    predicted = truth.copy()
    predicted[0, 1] = [3.0, 4.0]  # 5 image pixels off
    predicted[1, 2] = [0.0, 10.0]  # 10 image pixels off
    scales = np.array([[0.5, 0.75], [1.0, 1.5]])  # crops 100 and 200 image pixels wide
    errors = localisation_error(predicted, truth, scales, heatmap_width=20)
    # 100-pixel crops on 20-pixel heatmaps: 5 image pixels per heatmap pixel; 200-pixel crops: 10.
    np.testing.assert_allclose(errors, [[0, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match=r"predicted and truth must both have shape \(N, K, 2\)"):
        localisation_error(predicted[:1], truth, scales, 20)
