"""The one definition of preprocessing: dtypes, channels, sizes, bad files."""

import cv2
import numpy as np
import pytest

from edge_inspect.errors import InputError
from edge_inspect.preprocess import decode_image, load, preprocess, read_image, to_unit_gray


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
