"""Reading image folders: recursion, bad files, mixed formats, the split, tf.data."""

import logging

import cv2
import numpy as np
import pytest

from edge_inspect.errors import ConfigError, InputError
from export.data import make_dataset, near_duplicate_groups, scan_folder, split_paths
from tests.support import write_parts


def test_missing_and_empty_folders_get_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        scan_folder(tmp_path / "nope", (16, 16))
    with pytest.raises(InputError, match="is empty"):
        scan_folder(tmp_path, (16, 16))
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(InputError, match="is a file"):
        scan_folder(tmp_path / "file.png", (16, 16))


def test_folder_with_no_readable_image(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="No readable image"):
        scan_folder(tmp_path, (16, 16))


def test_bad_files_are_skipped_named_and_counted(tmp_path, caplog):
    good = write_parts(tmp_path / "sub" / "deeper", 3, size=32, seed=0, suffix=".jpg")
    jpeg = good[0].read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "readme.txt").write_text("notes")
    with caplog.at_level(logging.WARNING):
        folder = scan_folder(tmp_path, (16, 16))
    assert folder.paths == sorted(good)
    assert {p.name for p, _ in folder.skipped} == {"truncated.jpg", "zero.png", "text.jpg", "readme.txt"}
    for name in ("truncated.jpg", "zero.png", "text.jpg", "readme.txt"):
        assert name in caplog.text
    reasons = dict((p.name, r) for p, r in folder.skipped)
    assert "truncated" in reasons["truncated.jpg"] and "empty" in reasons["zero.png"]


def test_mixed_sizes_channels_formats_and_depths(tmp_path):
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "gray.png"), rng.integers(0, 256, (40, 50), np.uint8))
    cv2.imwrite(str(tmp_path / "color.jpg"), rng.integers(0, 256, (64, 64, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "alpha.png"), rng.integers(0, 256, (30, 20, 4), np.uint8))
    cv2.imwrite(str(tmp_path / "deep.png"), np.full((33, 33), 65535, np.uint16))
    cv2.imwrite(str(tmp_path / "bitmap.bmp"), rng.integers(0, 256, (16, 16, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "scan.tif"), rng.integers(0, 256, (24, 24), np.uint8))
    folder = scan_folder(tmp_path, (16, 16))
    assert len(folder.paths) == 6 and not folder.skipped
    batches = list(make_dataset(folder.paths, (16, 16), batch_size=4, shuffle=False, seed=0))
    images = np.concatenate([b.numpy() for b in batches])
    assert images.shape == (6, 16, 16, 1) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    deep = [p.name for p in folder.paths].index("deep.png")
    np.testing.assert_allclose(images[deep], 1.0)


def test_split_is_deterministic_stable_and_seeded(tmp_path):
    paths = [tmp_path / f"img_{i:04d}.png" for i in range(500)]
    a = split_paths(tmp_path, paths, val_fraction=0.2, seed=0)
    b = split_paths(tmp_path, list(reversed(paths)), val_fraction=0.2, seed=0)
    assert a.train == b.train and a.val == b.val
    assert set(a.train).isdisjoint(a.val) and len(a.train) + len(a.val) == 500
    assert 70 <= len(a.val) <= 130
    grown = split_paths(tmp_path, paths + [tmp_path / "new.png"], val_fraction=0.2, seed=0)
    assert set(a.val) <= set(grown.val) and set(a.train) <= set(grown.train)
    assert split_paths(tmp_path, paths, val_fraction=0.2, seed=1).val != a.val


def test_split_keeps_one_image_on_each_side(tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    split = split_paths(tmp_path, paths, val_fraction=0.01, seed=0)
    assert len(split.train) == 1 and len(split.val) == 1


def _textures(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([cv2.GaussianBlur(rng.uniform(size=(size, size)).astype(np.float32), (0, 0), 1.5) for _ in range(n)])


def test_near_duplicates_are_grouped_in_any_orientation():
    base = _textures(6)
    turned = np.rot90(base[0], 1).copy()
    mirrored = base[1][:, ::-1].copy()
    noisy = base[2] + np.random.default_rng(1).normal(0, 0.002, base[2].shape).astype(np.float32)
    images = np.concatenate([base, turned[None], mirrored[None], noisy[None]])
    labels = near_duplicate_groups(images, block=4)  # blocks smaller than the set: the edges still meet
    assert labels[6] == labels[0] and labels[7] == labels[1] and labels[8] == labels[2]
    assert len(set(labels[:6])) == 6  # distinct textures stay apart
    assert len(set(labels)) == 6


def test_grouped_split_keeps_each_group_on_one_side(tmp_path):
    paths = [tmp_path / f"img_{i:04d}.png" for i in range(400)]
    groups = np.arange(400) // 4  # 100 groups of four views
    split = split_paths(tmp_path, paths, val_fraction=0.2, seed=0, groups=groups)
    side = {p: "val" for p in split.val} | {p: "train" for p in split.train}
    for g in range(100):
        assert len({side[p] for p, label in zip(paths, groups) if label == g}) == 1
    assert 40 <= len(split.val) <= 130 and split.groups == 100 and "near-duplicate" in split.rule
    # Ungrouped, the views of one part land on both sides.
    plain = split_paths(tmp_path, paths, val_fraction=0.2, seed=0)
    plain_side = {p: "val" for p in plain.val} | {p: "train" for p in plain.train}
    assert any(len({plain_side[p] for p, label in zip(paths, groups) if label == g}) == 2 for g in range(100))


def test_dataset_shuffles_with_seed(normal_dir):
    folder = scan_folder(normal_dir, (32, 32))
    first = lambda: np.concatenate([b.numpy() for b in make_dataset(folder.paths, (32, 32), batch_size=8, shuffle=True, seed=3)])  # noqa: E731
    x, y = first(), first()
    np.testing.assert_array_equal(x, y)
    plain = np.concatenate([b.numpy() for b in make_dataset(folder.paths, (32, 32), batch_size=8, shuffle=False, seed=3)])
    assert not np.array_equal(x, plain)
    np.testing.assert_allclose(np.sort(x.ravel()), np.sort(plain.ravel()))


def test_d4_augmentation_shows_each_image_in_one_of_its_eight_views(normal_dir):
    folder = scan_folder(normal_dir, (32, 32))
    plain = np.concatenate([b.numpy() for b in make_dataset(folder.paths, (32, 32), batch_size=8, shuffle=False, seed=3)])
    epochs = [np.concatenate([b.numpy() for b in make_dataset(folder.paths, (32, 32), batch_size=8, shuffle=False,
                                                             seed=3, augment="d4")]) for _ in range(2)]
    np.testing.assert_array_equal(epochs[0], epochs[1])  # seeded
    views = []
    for image, seen in zip(plain[..., 0], epochs[0][..., 0]):
        turns = [np.rot90(image, k) for k in range(4)]
        candidates = turns + [np.fliplr(t) for t in turns]
        matches = [i for i, c in enumerate(candidates) if np.array_equal(c, seen)]
        assert matches, "an augmented image is not a view of its original"
        views.append(matches[0])
    assert len(set(views)) >= 6  # 80 draws from eight views
    with pytest.raises(ConfigError, match="square"):
        make_dataset(folder.paths, (32, 48), batch_size=8, shuffle=False, seed=3, augment="d4")
