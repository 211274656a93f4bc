"""The pose data: the synthetic COCO set, the COCO and MPII loaders on the shared samples, each
bad-data error, and crops that a seed reproduces."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from hgloss.pose import codecs, datasets
from hgloss.pose.synthetic import write_synthetic_coco
from hgloss.pose.transforms import affine_points, get_affine_transform, get_udp_transform

from conftest import ROOT

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
COCO_SAMPLE = os.path.join(SHARED_DATA, "coco_sample")
MPII_SAMPLE = os.path.join(SHARED_DATA, "mpii_sample")
needs_coco_sample = pytest.mark.skipif(
    not os.path.isdir(COCO_SAMPLE), reason=f"the shared COCO sample is absent ({COCO_SAMPLE})"
)
needs_mpii_sample = pytest.mark.skipif(
    not os.path.isdir(MPII_SAMPLE), reason=f"the shared MPII sample is absent ({MPII_SAMPLE})"
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_coco(tmp_path_factory.mktemp("synthetic"), {"train": 12, "val": 4}, seed=3)


def test_synthetic_set_is_reproducible_from_its_seed(tmp_path, synthetic):
    again = write_synthetic_coco(tmp_path / "again", {"train": 12, "val": 4}, seed=3)
    other = write_synthetic_coco(tmp_path / "other", {"train": 12, "val": 4}, seed=4)
    for split in ("train", "val"):
        assert synthetic[split][1].read_bytes() == again[split][1].read_bytes()
        assert synthetic[split][1].read_bytes() != other[split][1].read_bytes()
        first = sorted(synthetic[split][0].iterdir())[0]
        assert first.read_bytes() == (again[split][0] / first.name).read_bytes()


def test_synthetic_files_are_written_whole(tmp_path, synthetic):
    # Two trainers may generate the same set at once (the evidence study runs two): each file is
    # renamed into place whole, so a reader sees the old file or the new one, never half of one.
    path = tmp_path / "person_keypoints_val.json"
    path.write_text('{"old": true}')

    def write(temporary):
        temporary.write_text('{"images": [')
        assert json.loads(path.read_text()) == {"old": True}
        assert str(os.getpid()) in temporary.name  # writers in other processes use other names
        temporary.write_text('{"images": []}')

    datasets.write_atomically(path, write)
    assert json.loads(path.read_text()) == {"images": []}
    assert list(tmp_path.iterdir()) == [path]
    root = synthetic["val"][1].parent.parent
    assert not list(root.rglob("*.tmp"))


def test_synthetic_annotations_are_valid_coco(synthetic):
    data = json.loads(synthetic["train"][1].read_text())
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    assert data["annotations"], "no person survived"
    visibilities = []
    for annotation in data["annotations"]:
        width, height = sizes[annotation["image_id"]]
        keypoints = np.asarray(annotation["keypoints"]).reshape(17, 3)
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height and w > 0 and h > 0
        assert annotation["num_keypoints"] == int((keypoints[:, 2] > 0).sum())
        labelled = keypoints[keypoints[:, 2] > 0]
        assert np.all((labelled[:, 0] >= 0) & (labelled[:, 0] < width) & (labelled[:, 1] >= 0) & (labelled[:, 1] < height))
        visibilities += list(keypoints[:, 2])
    # Occluded (v=1) and unlabelled (v=0) joints both occur, as in real data.
    assert {0, 1, 2} <= set(visibilities)


def test_synthetic_set_goes_through_the_coco_loader(synthetic):
    image_dir, annotation_file = synthetic["val"]
    records, report = datasets.coco_records(str(annotation_file), str(image_dir))
    assert report.records == len(records) > 0
    assert all(os.path.isfile(record.image_path) for record in records)


@needs_coco_sample
def test_coco_loader_on_the_shared_sample():
    annotation_file = os.path.join(COCO_SAMPLE, "test_coco.json")
    records, report = datasets.coco_records(annotation_file, COCO_SAMPLE)
    data = json.load(open(annotation_file))
    usable = [a for a in data["annotations"] if not a["iscrowd"] and max(a["keypoints"][2::3]) > 0]
    assert len(records) == len(usable) == report.records
    first = records[0]
    assert first.joints.shape == (17, 3) and set(np.unique(first.joints[:, 2])) <= {0.0, 1.0}
    # The box is widened to the 3:4 aspect ratio and padded 1.25x, in units of 200 pixels.
    assert first.scale[0] / first.scale[1] == pytest.approx(192 / 256, rel=1e-5)

    detections = os.path.join(COCO_SAMPLE, "test_coco_det_AP_H_56.json")
    detected, detection_report = datasets.coco_records(annotation_file, COCO_SAMPLE, detections=detections)
    results = json.load(open(detections))
    assert len(detected) == sum(r["category_id"] == 1 for r in results)
    assert all(record.joints.sum() == 0 for record in detected)
    strict, strict_report = datasets.coco_records(
        annotation_file, COCO_SAMPLE, detections=detections, min_detection_score=0.5
    )
    dropped = sum(r["category_id"] == 1 and r["score"] < 0.5 for r in results)
    assert len(strict) == len(detected) - dropped
    assert strict_report.dropped.get("detections under the score threshold", 0) == dropped
    assert str(dropped) in str(strict_report)


@needs_mpii_sample
def test_mpii_loader_on_the_shared_sample():
    annotation_file = os.path.join(MPII_SAMPLE, "test_mpii.json")
    records, report = datasets.mpii_records(annotation_file, MPII_SAMPLE)
    items = json.load(open(annotation_file))
    assert len(records) == len(items) == report.records
    item, record = items[0], records[0]
    # HRNet's MPII conventions: 1-based pixels, centre 15 scale units lower, scale padded 1.25x.
    assert record.center[0] == pytest.approx(item["center"][0] - 1)
    assert record.center[1] == pytest.approx(item["center"][1] + 15 * item["scale"] - 1)
    assert record.scale[0] == pytest.approx(1.25 * item["scale"])
    assert np.allclose(record.joints[:, :2], np.asarray(item["joints"]) - 1)


def copy_sample(tmp_path):
    target = tmp_path / "coco"
    shutil.copytree(COCO_SAMPLE, target)
    return target, target / "test_coco.json"


@needs_coco_sample
def test_bad_data_gives_errors_naming_the_file_and_the_record(tmp_path):
    folder, annotation_file = copy_sample(tmp_path)
    data = json.loads(annotation_file.read_text())

    missing = data["images"][0]["file_name"]
    (folder / missing).unlink()
    owner = next(a["id"] for a in data["annotations"] if a["image_id"] == data["images"][0]["id"])
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*annotation {owner}"):
        datasets.coco_records(str(annotation_file), str(folder))
    shutil.copy(os.path.join(COCO_SAMPLE, missing), folder / missing)

    corrupt = folder / "corrupt.json"
    corrupt.write_text(annotation_file.read_text()[:500])
    with pytest.raises(ValueError, match="corrupt.json is not valid json"):
        datasets.coco_records(str(corrupt), str(folder))

    inconsistent = json.loads(annotation_file.read_text())
    inconsistent["annotations"][2]["image_id"] = 123456789
    bad = folder / "inconsistent.json"
    bad.write_text(json.dumps(inconsistent))
    with pytest.raises(ValueError, match=rf"annotation {inconsistent['annotations'][2]['id']} refers to image 123456789"):
        datasets.coco_records(str(bad), str(folder))

    short = json.loads(annotation_file.read_text())
    short["annotations"][1]["keypoints"] = short["annotations"][1]["keypoints"][:-3]
    bad.write_text(json.dumps(short))
    with pytest.raises(ValueError, match=rf"annotation {short['annotations'][1]['id']} has 48 keypoint values, expected 51"):
        datasets.coco_records(str(bad), str(folder))

    with pytest.raises(FileNotFoundError, match="detection file not found"):
        datasets.coco_records(str(annotation_file), str(folder), detections=str(folder / "nowhere.json"))

    records, _ = datasets.coco_records(str(annotation_file), str(folder))
    (folder / "broken.jpg").write_bytes(b"not an image")
    records[0].image_path = str(folder / "broken.jpg")
    dataset = datasets.TopDownDataset(records, codecs.MSRAHeatmap())
    with pytest.raises(OSError, match=rf"broken.jpg \(needed by .*annotation {records[0].source.split()[-1]}\)"):
        dataset[0]


@needs_mpii_sample
def test_mpii_record_with_a_wrong_joint_count_is_an_error(tmp_path):
    items = json.load(open(os.path.join(MPII_SAMPLE, "test_mpii.json")))
    items[3]["joints"] = items[3]["joints"][:15]
    path = tmp_path / "mpii.json"
    path.write_text(json.dumps(items))
    with pytest.raises(ValueError, match=r"record 3 has joints \(15, 2\)"):
        datasets.mpii_records(str(path), MPII_SAMPLE)


@needs_coco_sample
def test_crops_are_reproducible_from_their_seed_and_put_the_peaks_on_the_joints():
    records, _ = datasets.coco_records(os.path.join(COCO_SAMPLE, "test_coco.json"), COCO_SAMPLE)
    codec = codecs.MSRAHeatmap()
    augmented = datasets.TopDownDataset(records, codec, augmentation=datasets.Augmentation())
    first, again, other = augmented[(2, 77, True)], augmented[(2, 77, True)], augmented[(2, 78, True)]
    for key in ("image", "target", "target_weight"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["image"], other["image"])
    assert first["replayed"] is True and first["index"] == 2
    assert first["image"].shape == (3, 256, 192) and first["target"].shape == (17, 64, 48)

    # Without a seed there is no augmentation: the target's peaks sit where the joints land.
    plain = datasets.TopDownDataset(records, codec)[2]
    record = records[2]
    matrix = get_affine_transform(record.center, record.scale, 0.0, (192, 256))
    expected = affine_points(record.joints[:, :2], matrix) / 4.0  # crop pixels -> heatmap pixels
    decoded, _ = codecs.decode(plain["target"][None].numpy(), refine="argmax")
    labelled = plain["target_weight"].numpy() > 0
    assert labelled.sum() > 0
    assert np.abs(decoded[0][labelled] - expected[labelled]).max() <= 1.0


@needs_coco_sample
@pytest.mark.parametrize("codec_class", [codecs.MSRAHeatmap, codecs.UDPHeatmap], ids=["msra", "udp"])
def test_the_crop_geometry_comes_from_the_codec(codec_class):
    records, _ = datasets.coco_records(os.path.join(COCO_SAMPLE, "test_coco.json"), COCO_SAMPLE)
    codec = codec_class((96, 128), (24, 32), 1.5)
    sample = datasets.TopDownDataset(records, codec)[1]
    record = records[1]
    matrix = get_udp_transform if codec_class is codecs.UDPHeatmap else get_affine_transform
    in_crop = affine_points(record.joints[:, :2], matrix(record.center, record.scale, 0.0, (96, 128)))
    heatmaps, weights = codec.encode(in_crop, record.joints[:, 2])
    assert sample["image"].shape == (3, 128, 96)
    np.testing.assert_array_equal(sample["target"].numpy(), heatmaps)
    np.testing.assert_array_equal(sample["target_weight"].numpy(), weights)


@needs_coco_sample
def test_a_flipped_crop_swaps_left_and_right():
    records, _ = datasets.coco_records(os.path.join(COCO_SAMPLE, "test_coco.json"), COCO_SAMPLE)
    only_flip = datasets.Augmentation(scale_factor=None, rotation_factor=None, half_body_probability=None)
    dataset = datasets.TopDownDataset(records, codecs.MSRAHeatmap(), augmentation=only_flip)
    plain = datasets.TopDownDataset(records, codecs.MSRAHeatmap())[0]
    flipped = next(
        sample for sample in (dataset[(0, seed, False)] for seed in range(20))
        if not torch.equal(sample["image"], plain["image"])
    )
    mirrored = codecs.flip_back(flipped["target"][None].numpy(), datasets.COCO_FLIP_PAIRS, shift=False)[0]
    labelled = plain["target_weight"].numpy() > 0
    peak = lambda maps: np.stack(np.unravel_index(maps.reshape(17, -1).argmax(1), maps.shape[1:]), 1)  # noqa: E731
    # The crop is mirrored about its centre; heatmap columns may shift by a pixel at the centre line.
    assert np.abs(peak(mirrored)[labelled] - peak(plain["target"].numpy())[labelled]).max() <= 1


def _edited(tmp_path, annotation_file, edit, name="edited.json"):
    data = json.loads(annotation_file.read_text())
    edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))  # json writes NaN as NaN, which json (and COCO tools) read back
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda data: data["images"][0].pop("id"), r"edited.json, image 0 lacks 'id'"),
        (lambda data: data["images"][1].update(width="256"), r"edited.json, image \d+: width must be int or float, got '256'"),
        (lambda data: data["images"][1].update(height=0), r"edited.json, image \d+: height must be a finite number > 0, got 0"),
        (lambda data: data["annotations"][2].pop("bbox"), r"edited.json, annotation \d+ lacks 'bbox'"),
        (lambda data: data["annotations"][2]["bbox"].pop(), r"edited.json, annotation \d+: bbox must be 4 finite numbers"),
        (lambda data: data["annotations"][3]["keypoints"].__setitem__(4, float("nan")),
         r"edited.json, annotation \d+: keypoints\[4\] must be a finite number, got nan"),
        (lambda data: data["annotations"][0].pop("id"), r"edited.json, annotation number 0 lacks 'id'"),
        (lambda data: data["annotations"][1]["keypoints"].__setitem__(2, -1), r"annotation \d+ has a negative visibility"),
    ],
    ids=["image-without-id", "width-as-text", "zero-height", "annotation-without-bbox", "short-bbox", "nan-keypoint",
         "annotation-without-id", "negative-visibility"],
)
def test_a_malformed_coco_record_is_named_in_the_error(tmp_path, synthetic, edit, message):
    image_dir, annotation_file = synthetic["train"]
    with pytest.raises(ValueError, match=message):
        datasets.coco_records(str(_edited(tmp_path, annotation_file, edit)), str(image_dir))


def test_a_malformed_detection_or_mpii_record_is_named_in_the_error(tmp_path, synthetic):
    image_dir, annotation_file = synthetic["val"]
    image_id = json.loads(annotation_file.read_text())["images"][0]["id"]
    detections = tmp_path / "detections.json"
    detections.write_text(json.dumps([{"image_id": image_id, "category_id": 1, "bbox": [1, 2, 30, 40], "score": 0.9},
                                      {"image_id": image_id, "category_id": 1, "bbox": [1, 2, 30, 40]}]))
    with pytest.raises(ValueError, match=r"detections.json, detection 1 lacks 'score'"):
        datasets.coco_records(str(annotation_file), str(image_dir), detections=str(detections))

    file_name = json.loads(annotation_file.read_text())["images"][0]["file_name"]
    record = {"image": file_name, "center": [40.0, 50.0], "scale": 0.5, "joints": [[10.0, 10.0]] * 16,
              "joints_vis": [1] * 16}
    for bad, message in [({"scale": "0.5"}, r"record 1: scale must be int or float, got '0.5'"),
                         ({"center": [40.0]}, r"record 1: center must be 2 finite numbers"),
                         ({"joints": [[float("nan"), 1.0]] * 16}, r"record 1: joints and joints_vis must be finite"),
                         ({"joints_vis": [-1] * 16}, r"record 1 has a negative joints_vis")]:
        mpii = tmp_path / "mpii.json"
        mpii.write_text(json.dumps([record, {**record, **bad}]))
        with pytest.raises(ValueError, match=message):
            datasets.mpii_records(str(mpii), str(image_dir))
