"""Files and folders as a source (``edge-inspect predict``): listing, reading, batching, error verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from edge_inspect.errors import InputError
from edge_inspect.inspector import Inspector
from edge_inspect.preprocess import read_image
from edge_inspect.sources.files import inspect_files, iter_image_files
from edge_inspect.synthetic import write_parts


def test_folders_give_their_images_sorted_and_named_files_are_kept_whatever_they_are(tmp_path):
    write_parts(tmp_path / "b", 2, size=16, seed=1)
    write_parts(tmp_path / "a" / "deeper", 2, size=16, seed=2, suffix=".JPG")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "named.txt").write_text("named explicitly")
    found = iter_image_files([tmp_path, tmp_path / "named.txt", tmp_path / "missing.png"])
    relative = [p.relative_to(tmp_path).as_posix() for p in found]
    assert relative == ["a/deeper/part_00000.JPG", "a/deeper/part_00001.JPG", "b/part_00000.png",
                        "b/part_00001.png", "named.txt", "missing.png"]


def test_nothing_to_inspect_is_an_input_error_naming_the_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"No image to inspect in .*empty"):
        iter_image_files([tmp_path / "empty"])
    with pytest.raises(InputError, match=r"in \(none\)"):
        iter_image_files([])


@pytest.fixture(scope="module")
def inspector(model_dir):
    return Inspector.load(model_dir, device="cpu", batch_size=2)


def test_inspect_files_gives_one_result_per_file_in_order_with_errors_of_their_own(inspector, tmp_path):
    parts = write_parts(tmp_path, 5, size=40, seed=3, defective=True)
    corrupt = tmp_path / "part_00002b.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    missing = tmp_path / "gone.png"
    order = iter_image_files([tmp_path, missing])

    out = list(inspect_files(inspector, [tmp_path, missing], keep_images=True))

    assert [r.source for r, _ in out] == [str(p) for p in order]
    by_source = {r.source: (r, image) for r, image in out}
    for path in (corrupt, missing):
        result, image = by_source[str(path)]
        assert result.verdict == "error" and result.error and image is None
        assert result.threshold == inspector.entry["threshold"]
    for path in parts:
        result, image = by_source[str(path)]
        alone = inspector.inspect(read_image(path), str(path))
        assert result.verdict == alone.verdict in ("ok", "ng")
        assert result.score == pytest.approx(alone.score, rel=1e-5, abs=1e-7)
        assert np.array_equal(image, read_image(path))
    assert max(r.batch_size for r, _ in out) == 2


def test_inspect_files_keeps_no_image_unless_asked(inspector, tmp_path):
    write_parts(tmp_path, 3, size=40, seed=4)
    out = list(inspect_files(inspector, [tmp_path]))
    assert len(out) == 3 and all(image is None for _, image in out)
