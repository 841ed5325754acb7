"""The one definition of preprocessing: dtypes, channels, sizes, bad files."""

import cv2
import numpy as np
import pytest

from edge_inspect.errors import InputError
from edge_inspect.preprocess import (
    _is_colour,
    decode_image,
    grey_area_u8,
    input_note,
    load,
    preprocess,
    read_image,
    to_unit_gray,
)


def _encode(image, ext=".png"):
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def test_uint8_gray_is_scaled_to_unit():
    image = np.array([[0, 255], [51, 102]], np.uint8)
    np.testing.assert_allclose(to_unit_gray(image), image / 255.0, rtol=1e-6)


def test_uint16_is_scaled_by_its_own_range():
    image = np.array([[0, 65535], [32768, 13107]], np.uint16)
    np.testing.assert_allclose(to_unit_gray(image), image / 65535.0, rtol=1e-6)


def test_bgr_uses_luma_weights_in_opencv_order():
    bgr = np.zeros((1, 1, 3), np.uint8)
    bgr[0, 0] = (0, 0, 255)  # pure red in BGR order
    assert to_unit_gray(bgr)[0, 0] == pytest.approx(0.299, abs=1e-3)


def test_channel_counts_agree_on_grey_content():
    gray = np.random.default_rng(0).integers(0, 256, (20, 30), np.uint8)
    variants = [gray, gray[:, :, None], cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGRA)]
    for image in variants:
        np.testing.assert_allclose(to_unit_gray(image), gray / 255.0, atol=1e-6)


def test_resize_is_area_interpolation_to_height_width():
    image = np.zeros((40, 60), np.uint8)
    image[:, :30] = 255
    out = preprocess(image, (20, 15))
    assert out.shape == (20, 15) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, cv2.resize(image / 255.0, (15, 20), interpolation=cv2.INTER_AREA), atol=1e-6)


def _opencv_twin(image, size):
    """What preprocess does with OpenCV's own calls: the twin of the compiled path."""
    gray = to_unit_gray(image)
    height, width = size
    return gray if gray.shape == size else cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("seed", range(4))
def test_compiled_path_agrees_with_opencv_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    for trial in range(60):
        rows, columns = (int(v) for v in rng.integers(1, 400, 2))
        size = (int(rng.integers(1, rows + 1)), int(rng.integers(1, columns + 1)))
        channels = (None, 1, 3, 4)[trial % 4]
        image = rng.integers(0, 256, (rows, columns) if channels is None else (rows, columns, channels), np.uint8)
        out = preprocess(image, size)
        assert out.shape == size and out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_allclose(out, _opencv_twin(image, size), rtol=0, atol=1e-6, err_msg=f"{image.shape} -> {size}")


@pytest.mark.parametrize(("shape", "size"), [
    ((1, 1, 3), (1, 1)),            # a single pixel
    ((300, 300, 3), (300, 300)),    # no resize: grey and scale only
    ((512, 512), (256, 256)),       # a whole factor (OpenCV's block-average path)
    ((300, 300, 3), (256, 256)),    # the casting images and the default model
    ((999, 3, 4), (1, 1)),          # everything into one pixel
    ((7, 500), (7, 3)),             # one axis kept, the other shrunk a lot
])
def test_compiled_path_edge_cases(shape, size):
    rng = np.random.default_rng(1)
    for image in (np.zeros(shape, np.uint8), np.full(shape, 255, np.uint8), rng.integers(0, 256, shape, np.uint8)):
        out = preprocess(image, size)
        np.testing.assert_allclose(out, _opencv_twin(image, size), rtol=0, atol=1e-6)
        assert 0.0 <= out.min() and out.max() <= 1.0 + 1e-6


def test_compiled_path_takes_views_and_leaves_enlarging_to_opencv():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (200, 300, 3), np.uint8)
    view = image[10:190:2, ::-1]                      # strided and reversed: not contiguous
    np.testing.assert_allclose(preprocess(view, (64, 64)), _opencv_twin(view, (64, 64)), rtol=0, atol=1e-6)
    small = image[:20, :20]                           # enlarged: OpenCV's own path, as before
    np.testing.assert_array_equal(preprocess(small, (64, 64)), _opencv_twin(small, (64, 64)))
    with pytest.raises(InputError, match="no smaller than"):
        grey_area_u8(small, (64, 64))
    with pytest.raises(InputError, match="uint16"):
        grey_area_u8(image.astype(np.uint16), (64, 64))


def test_colour_test_of_uint8_agrees_with_the_sampled_grid():
    rng = np.random.default_rng(3)
    for trial in range(100):
        shape = (int(rng.integers(1, 600)), int(rng.integers(1, 600)), 3 + trial % 2)
        image = np.repeat(rng.integers(0, 256, shape[:2] + (1,), np.uint8), shape[2], axis=2)
        y, x = int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1]))
        image[y, x, int(rng.integers(0, 3))] ^= np.uint8(rng.integers(1, 40))   # one pixel, maybe on the grid
        step_y, step_x = max(1, shape[0] // 128), max(1, shape[1] // 128)
        sample = image[::step_y, ::step_x, :3].astype(int)
        expected = (sample.max(axis=2) - sample.min(axis=2)).max() > 0.04 * 255
        assert _is_colour(image) == expected
        note = input_note(image, shape[:2])
        assert (note is not None and "colour" in note.kinds) == expected


def test_unsupported_dtype_and_shape_are_named():
    with pytest.raises(InputError, match="dtype int32"):
        to_unit_gray(np.zeros((4, 4), np.int32))
    with pytest.raises(InputError, match="shape"):
        to_unit_gray(np.zeros((4, 4, 2), np.uint8))


def test_sixteen_bit_png_round_trip(tmp_path):
    image = np.full((8, 8), 40000, np.uint16)
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), image)
    assert read_image(path).dtype == np.uint16
    np.testing.assert_allclose(load(path, (8, 8)), 40000 / 65535, rtol=1e-6)


def test_empty_truncated_and_garbage_bytes_are_refused():
    with pytest.raises(InputError, match="empty"):
        decode_image(b"", "a.jpg")
    jpeg = _encode(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8), ".jpg")
    assert decode_image(jpeg).shape == (64, 64)
    with pytest.raises(InputError, match="truncated JPEG"):
        decode_image(jpeg[: len(jpeg) // 2], "half.jpg")
    with pytest.raises(InputError, match="not a readable image"):
        decode_image(b"hello, this is text", "notes.jpg")


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot be read"):
        read_image(tmp_path / "gone.png")


# ------------------------------------------------------------------ input notes


def test_input_note_names_colour_size_and_aspect_beyond_their_limits():
    from edge_inspect.preprocess import input_note

    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (300, 300), np.uint8)
    assert input_note(grey, (256, 256)) is None
    # A grey image stored with three equal channels (as JPEG cameras often do), a little JPEG noise on it: not colour.
    stored = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    noisy = np.clip(stored.astype(int) + rng.integers(-3, 4, stored.shape), 0, 255).astype(np.uint8)
    assert input_note(stored, (256, 256)) is None and input_note(noisy, (256, 256)) is None
    colour = stored.copy()
    colour[100:140, 100:140, 2] = 255  # a red patch
    note = input_note(colour, (256, 256))
    assert note.kinds == ("colour",) and note.text == "colour image (3 channels) converted to grey"
    assert input_note(np.dstack([colour, np.full((300, 300), 255, np.uint8)]), (256, 256)).text == (
        "colour image (4 channels) converted to grey")
    assert input_note((colour.astype(np.uint16) * 257), (256, 256)).kinds == ("colour",)  # 16-bit: its own scale
    assert input_note(colour.astype(np.float32) / 255, (256, 256)).kinds == ("colour",)

    # The limits: 2x either way by pixel count, 1.2 on the aspect ratio.
    assert input_note(np.zeros((512, 512), np.uint8), (256, 256)) is None
    assert input_note(np.zeros((128, 128), np.uint8), (256, 256)) is None
    assert input_note(np.zeros((256, 307), np.uint8), (256, 256)) is None
    huge = input_note(np.zeros((1024, 1024), np.uint8), (256, 256))
    assert huge.kinds == ("larger",) and huge.text == "1024x1024 scaled down 4.0x to 256x256"
    tiny = input_note(np.zeros((16, 16), np.uint8), (64, 64))
    assert tiny.kinds == ("smaller",) and tiny.text == "16x16 scaled up 4.0x to 64x64"
    wide = input_note(np.zeros((256, 400), np.uint8), (256, 256))
    assert wide.kinds == ("aspect",) and wide.text == "400x256 resized to 256x256, aspect ratio 1.56 stretched to 1.00"
    both = input_note(np.zeros((1024, 2048, 3), np.uint8) + np.array([0, 0, 200], np.uint8), (256, 256))
    assert both.kinds == ("colour", "larger", "aspect")
    assert both.text == ("colour image (3 channels) converted to grey; "
                         "2048x1024 scaled down 5.7x to 256x256, aspect ratio 2.00 stretched to 1.00")


def test_note_warnings_name_the_first_part_of_each_kind_once(caplog):
    from edge_inspect.preprocess import NoteWarnings, input_note

    warn = NoteWarnings("Hot folder /line", (64, 64))
    colour = np.zeros((64, 64, 3), np.uint8)
    colour[..., 2] = 200
    with caplog.at_level("WARNING", logger="edge_inspect.preprocess"):
        warn("a.png", input_note(colour, (64, 64)))
        warn("b.png", input_note(colour, (64, 64)))                      # the same kind: nothing
        warn("c.png", None)
        warn("d.png", input_note(np.zeros((8, 8), np.uint8), (64, 64)))   # a new kind
        warn("e.png", input_note(np.zeros((9, 9), np.uint8), (64, 64)))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("Hot folder /line: a.png is inspected, but not as the model was trained: "
                                  "colour image (3 channels) converted to grey (the model takes 64x64 grey images)")
    assert "d.png" in messages[1] and "8x8 scaled up 8.0x to 64x64" in messages[1] and "input_note" in messages[1]
