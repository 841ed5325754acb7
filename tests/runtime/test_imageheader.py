"""Image headers read without decoding, and the allow-list in front of OpenCV's decoder.

Real files come from ``cv2.imencode`` at odd sizes; bombs are written by hand
(a few hundred bytes declaring gigabytes) and decoded in a process whose
address space is limited, so a bomb that got through would fail the test
instead of the machine.
"""

import json
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_inspect import imageheader
from edge_inspect.errors import InputError
from edge_inspect.imageheader import ACCEPTED, FORMATS, OPENCV_MAX_PIXELS, ImageHeader, admit, sniff
from edge_inspect.preprocess import IMAGE_SUFFIXES, decode_image

ROOT = Path(__file__).resolve().parents[2]
RNG_IMAGE = np.random.default_rng(37).integers(0, 256, (23, 37, 3), np.uint8)  # 37 x 23: odd on both sides
BIG_IMAGE = np.random.default_rng(67).integers(0, 256, (45, 67, 3), np.uint8)  # OpenJPEG needs 32 px a side


# ------------------------------------------------------------------ writers


def _encode(ext, image, params=()):
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok, ext
    return buf.tobytes()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width, height, idat=None, extra=b"") -> bytes:
    """An 8-bit grey PNG with correct CRCs: IHDR, ``extra`` chunks, one IDAT, IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(min(height, 4) * (width + 1))) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _tiff(pages, order="<", big=False) -> bytes:
    """An uncompressed grey or RGB TIFF (or BigTIFF) whose IFDs are chained in order.

    ``pages``: dicts with ``width``, ``height`` and optionally ``spp`` (samples
    a pixel), ``bits`` (a sample; over 16, floating point), ``rows``
    (RowsPerStrip), ``tile`` (width, height) and ``data``.
    """
    out = bytearray(b"II" if order == "<" else b"MM")
    out += struct.pack(order + "HHHQ", 43, 8, 0, 0) if big else struct.pack(order + "HI", 42, 0)
    link = 8 if big else 4
    for page in pages:
        w, h, spp = page["width"], page["height"], page.get("spp", 1)
        data = page.get("data", bytes(min(w * h * spp, 4096)))
        at = len(out)
        out += data + b"\0" * (len(data) & 1)
        entries = [(256, 4, w), (257, 4, h), (258, 3, page.get("bits", 8)), (259, 3, 1),
                   (262, 3, 1 if spp == 1 else 2), (277, 3, spp), (339, 3, 3 if page.get("bits", 8) > 16 else 1)]
        if "tile" in page:
            entries += [(322, 4, page["tile"][0]), (323, 4, page["tile"][1]), (324, 4, at), (325, 4, len(data))]
        else:
            entries += [(273, 4, at), (278, 4, page.get("rows", h)), (279, 4, len(data))]
        ifd = len(out)
        out += struct.pack(order + ("Q" if big else "H"), len(entries))
        for tag, kind, value in sorted(entries):
            value_fmt = ("H6x" if kind == 3 else "I4x") if big else ("H2x" if kind == 3 else "I")
            out += struct.pack(order + ("HHQ" if big else "HHI"), tag, kind, 1) + struct.pack(order + value_fmt, value)
        struct.pack_into(order + ("Q" if big else "I"), out, link, ifd)
        link = len(out)
        out += bytes(8 if big else 4)
    return bytes(out)


def _sof_patched(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0-2) declaring another size, found by walking its segments."""
    at = 2
    while jpeg[at + 1] not in (0xC0, 0xC1, 0xC2):
        at += 2 + struct.unpack_from(">H", jpeg, at + 2)[0]
    return jpeg[:at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9:]


def _zlib_bomb(n: int) -> bytes:
    """A zlib stream of ``n`` MiB of zeros in about ``n`` KiB: full flushes make every MiB the same bytes."""
    c, mib = zlib.compressobj(9), bytes(1 << 20)
    first = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    adler = (((n << 20) % 65521) << 16) | 1  # the Adler-32 of n MiB of zeros
    return first + again * (n - 1) + b"\x03\x00" + adler.to_bytes(4, "big")  # an empty final block


def _bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + info + bytes(64)


@pytest.fixture(scope="module")
def real():
    """Files of every format this OpenCV decodes, with the header each must read as."""
    gray = RNG_IMAGE[:, :, 0]
    lossless = _encode(".webp", RNG_IMAGE, [cv2.IMWRITE_WEBP_QUALITY, 101])
    lossy = _encode(".webp", RNG_IMAGE, [cv2.IMWRITE_WEBP_QUALITY, 80])
    jp2 = _encode(".jp2", BIG_IMAGE)
    animation = cv2.Animation()
    animation.frames = [np.roll(RNG_IMAGE, k, axis=1) for k in range(3)]
    animation.durations = [100, 100, 100]
    cases = {
        "png": (_encode(".png", RNG_IMAGE), "PNG", 37, 23, 1),
        "png-16-bit-gray": (_encode(".png", gray.astype(np.uint16) * 257), "PNG", 37, 23, 1),
        "apng": (cv2.imencodeanimation(".png", animation)[1].tobytes(), "PNG", 37, 23, 3),
        "jpeg": (_encode(".jpg", RNG_IMAGE), "JPEG", 37, 23, 1),
        "jpeg-progressive": (_encode(".jpg", RNG_IMAGE, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), "JPEG", 37, 23, 1),
        "bmp": (_encode(".bmp", RNG_IMAGE), "BMP", 37, 23, 1),
        "bmp-top-down": (_bmp_header(37, -23)[:-64] + bytes(37 * 3 * 23 + 23), "BMP", 37, 23, 1),
        "tiff": (_encode(".tif", RNG_IMAGE), "TIFF", 37, 23, 1),
        "tiff-two-pages": (cv2.imencodemulti(".tif", [RNG_IMAGE, BIG_IMAGE])[1].tobytes(), "TIFF", 67, 45, 2),
        "tiff-big-endian": (_tiff([{"width": 37, "height": 23}], ">"), "TIFF", 37, 23, 1),
        "bigtiff": (_tiff([{"width": 37, "height": 23}], big=True), "TIFF", 37, 23, 1),
        "webp-lossless": (lossless, "WebP", 37, 23, 1),
        "webp-lossy": (lossy, "WebP", 37, 23, 1),
        "webp-animated": (cv2.imencodeanimation(".webp", animation)[1].tobytes(), "WebP", 37, 23, 3),
        "webp-bare-vp8l": (lossless[20:], "WebP bitstream", 37, 23, 1),
        "webp-bare-vp8-chunk": (lossy[12:], "WebP bitstream", 37, 23, 1),
        "pbm": (_encode(".pbm", gray), "PNM", 37, 23, 1),
        "pgm": (_encode(".pgm", gray), "PNM", 37, 23, 1),
        "ppm": (_encode(".ppm", RNG_IMAGE), "PNM", 37, 23, 1),
        "pgm-ascii": (_encode(".pgm", gray, [cv2.IMWRITE_PXM_BINARY, 0]), "PNM", 37, 23, 1),
        "pgm-comment": (b"P5\n# by hand\n37 23\n# maxval next\n255\n" + gray.tobytes(), "PNM", 37, 23, 1),
        "pam": (_encode(".pam", RNG_IMAGE), "PAM", 37, 23, 1),
        "pfm": (_encode(".pfm", RNG_IMAGE.astype(np.float32) / 255), "PFM", 37, 23, 1),
        "hdr": (_encode(".hdr", RNG_IMAGE.astype(np.float32) / 255), "Radiance HDR", 37, 23, 1),
        "sun-raster": (_encode(".ras", RNG_IMAGE), "Sun raster", 37, 23, 1),
        "gif": (_encode(".gif", RNG_IMAGE), "GIF", 37, 23, 1),
        "gif-animated": (cv2.imencodeanimation(".gif", animation)[1].tobytes(), "GIF", 37, 23, 3),
        "avif": (_encode(".avif", RNG_IMAGE), "AVIF", 37, 23, 1),
        "jp2": (jp2, "JPEG 2000", 67, 45, 1),
        "j2k-codestream": (jp2[jp2.find(b"jp2c") + 4:], "JPEG 2000", 67, 45, 1),
    }
    return {key: (data, ImageHeader(fmt, w, h, frames)) for key, (data, fmt, w, h, frames) in cases.items()}


# ------------------------------------------------------------------ formats


def test_every_format_reads_its_size_from_a_real_file_and_opencv_agrees(real):
    for key, (data, expected) in real.items():
        header = sniff(data)
        assert (header.format, header.width, header.height, header.frames, header.problem) == (
            expected.format, expected.width, expected.height, expected.frames, None), key
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert decoded is not None, f"this OpenCV no longer decodes {key}"
        if expected.frames == 1 or expected.format != "TIFF":
            assert decoded.shape[:2] == (expected.height, expected.width), key
    assert {header.format for _, header in real.values()} == set(FORMATS)


def test_every_codec_this_opencv_build_has_is_read(real):
    """The build's Media I/O list, codec by codec: one built after an upgrade (OpenEXR, JPEG XL...) fails here."""
    formats = {"JPEG": "JPEG", "WEBP": "WebP", "AVIF": "AVIF", "PNG": "PNG", "TIFF": "TIFF", "JPEG 2000": "JPEG 2000",
               "GIF": "GIF", "HDR": "Radiance HDR", "SUNRASTER": "Sun raster", "PXM": "PNM", "PFM": "PFM"}
    media = cv2.getBuildInformation().split("Media I/O:")[1].split("\n\n")[0]
    built = {m[1] for m in re.finditer(r"^    (\S[^:]*):\s+(\S.*)$", media, re.M) if m[2] != "NO"} - {"ZLib"}
    unread = built - set(formats)
    assert not unread, f"OpenCV now decodes {sorted(unread)}: give edge_inspect/imageheader.py a reader for each."
    assert {formats[name] for name in built} <= set(FORMATS)
    # And what is not built is not decoded: an OpenEXR and a QOI file.
    for data in (b"\x76\x2f\x31\x01\x02\0\0\0" + bytes(64), b"qoif" + struct.pack(">IIBB", 1, 1, 3, 0) + bytes(12)):
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is None


def test_accepted_formats_decode_to_their_declared_size(real):
    for key, (data, expected) in real.items():
        if expected.format in ACCEPTED:
            image = decode_image(data, key)
            first_page = (23, 37) if key == "tiff-two-pages" else (expected.height, expected.width)
            assert image.shape[:2] == first_page, key


def test_other_formats_are_refused_by_name(real):
    data, _ = real["gif"]
    with pytest.raises(InputError, match=r"a GIF image \(37 x 23, \d+ bytes\); this runtime decodes only PNG, "
                                         r"JPEG, BMP, TIFF, WebP or PNM images"):
        decode_image(data, "part.gif")
    for key in ("avif", "hdr", "jp2", "pam", "pfm", "sun-raster", "webp-bare-vp8l"):
        with pytest.raises(InputError, match="this runtime decodes only"):
            decode_image(real[key][0], key)
    with pytest.raises(InputError, match=r"not a readable image: not a PNG, JPEG, BMP, TIFF, WebP or PNM image "
                                         r"\(it starts with 73 68 69 66 74 20 32 3a 'shift 2:', \.\.\.\)"):
        decode_image(b"shift 2: 412 parts\n", "notes.txt")


def test_suffixes_are_those_of_the_accepted_formats():
    assert IMAGE_SUFFIXES[:6] == (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
    gray = RNG_IMAGE[:, :, 0]
    for fmt, suffixes in ACCEPTED.items():
        for suffix in suffixes:
            assert suffix in IMAGE_SUFFIXES
            assert sniff(_encode(suffix, RNG_IMAGE if suffix == ".ppm" else gray)).format == fmt, suffix


def test_watch_still_exports_the_header_names():
    from edge_inspect import watch

    assert watch.image_dimensions is imageheader.image_dimensions
    assert watch._check_pixels is imageheader.check_pixels
    assert watch.DEFAULT_MAX_PIXELS == imageheader.DEFAULT_MAX_PIXELS


# ------------------------------------------------------------------ limits


def test_the_pixel_limit_and_the_tile_limit_name_the_flag():
    png = _encode(".png", RNG_IMAGE)
    assert decode_image(png, "a.png", max_pixels=37 * 23).shape == (23, 37, 3)
    with pytest.raises(InputError, match=r"a.png: 37 x 23 = 0.0 megapixels, over the limit of 0.00085 megapixels "
                                         r"\(--max-pixels\); not decoded. Raise --max-pixels"):
        decode_image(png, "a.png", max_pixels=850)
    tiled = _tiff([{"width": 16, "height": 16, "tile": (2048, 2048), "data": bytes(2048 * 2048)}])
    assert sniff(tiled).tile == (2048, 2048)
    with pytest.raises(InputError, match=r"a 16 x 16 TIFF whose tiles or strips are 2048 x 2048 = 4.2 megapixels, "
                                         r"over the limit of 1 megapixels"):
        decode_image(tiled, "t.tif", max_pixels=1_000_000)
    assert decode_image(tiled, "t.tif", max_pixels=2048 * 2048).shape == (16, 16)


def test_deep_tiff_pixels_count_for_their_bytes():
    """A TIFF of 64-bit RGBA samples decodes to 32 bytes a pixel: the limit allows it 8 bytes a pixel."""
    f64 = _encode(".tif", np.full((23, 37, 4), 0.5))
    assert sniff(f64).pixel_bytes == 32
    image = decode_image(f64, "f64.tif", max_pixels=37 * 23 * 4)
    assert image.dtype == np.float64 and image.shape == (23, 37, 4)  # 32 bytes a pixel, as read
    with pytest.raises(InputError, match=r"a 37 x 23 TIFF of 32 bytes a pixel, 0.00 GB decoded, over the 0.00 GB "
                                         r"that the limit of 0.003403 megapixels \(--max-pixels\) allows"):
        decode_image(f64, "f64.tif", max_pixels=37 * 23 * 4 - 1)
    assert sniff(_encode(".tif", RNG_IMAGE.astype(np.uint16))).pixel_bytes == 6


def test_jpeg_scans_and_webp_first_chunks_are_bounded(real):
    progressive = real["jpeg-progressive"][0]
    assert 1 < progressive.count(b"\xff\xda") < 20  # what a real progressive JPEG holds
    many = progressive[:-2] + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" * 600 + b"\xff\xd9"
    assert re.fullmatch(r"it holds \d+ scans, each decoded over the whole image by libjpeg; at most 500 are read",
                        sniff(many).problem)
    lossless = real["webp-lossless"][0]
    hidden = lossless[:12] + b"/ABC" + struct.pack("<I", 4) + bytes(4) + lossless[12:]
    hidden = hidden[:4] + struct.pack("<I", len(hidden) - 8) + hidden[8:]
    assert sniff(hidden).problem == "its first chunk is b'/ABC'; expected VP8X, VP8 or VP8L"


def test_a_header_cut_short_still_names_the_size_it_declared():
    """The watcher checks the size before anything else: a bomb's message is its size, not its truncation."""
    header_only = _png(20_000, 20_000)[:33]
    assert imageheader.image_dimensions(header_only) == (20_000, 20_000)
    with pytest.raises(InputError, match=r"20000 x 20000 = 400.0 megapixels, over the limit of 50 megapixels"):
        decode_image(header_only, "huge.png")
    with pytest.raises(InputError, match="a PNG file, but it ends before its IEND chunk"):
        decode_image(header_only, "huge.png", max_pixels=10 ** 9)


def test_a_sound_header_is_required(real):
    png = real["png"][0]
    with pytest.raises(InputError, match="a PNG file, but it ends before its IEND chunk; not decoded"):
        decode_image(png[:-12], "cut.png")
    bomb = _png(1, 1, extra=struct.pack(">I", 0xFFFFFFF0) + b"tEXt" + bytes(20))
    remain = len(bomb) - 33 - 12
    with pytest.raises(InputError, match=rf"a PNG file, but chunk b'tEXt' at byte 33 declares 4294967280 bytes "
                                         rf"where {remain} remain; not decoded"):
        admit(bomb, "bomb.png")


# ------------------------------------------------------------------ hostile headers


def test_truncation_at_every_length_gives_none_a_problem_or_an_image_no_larger_than_declared(real):
    for key, (data, expected) in real.items():
        for end in range(len(data)):
            header = sniff(data[:end])
            assert header is None or isinstance(header, ImageHeader), (key, end)
            assert header is None or header.problem or header.pixels > 0, (key, end)
            if expected.format in ACCEPTED and (end < 512 or end % 61 == 0 or end > len(data) - 64):
                try:
                    image = decode_image(data[:end], key)
                except InputError:
                    continue
                assert image.shape[0] <= header.height and image.shape[1] <= header.width, (key, end)


def test_loops_and_endless_headers_end_with_a_problem():
    ifd_loop = bytearray(_tiff([{"width": 16, "height": 16}, {"width": 16, "height": 16}]))
    first = struct.unpack_from("<I", ifd_loop, 4)[0]

    def link(ifd):  # where an IFD's pointer to the next one is
        return ifd + 2 + 12 * struct.unpack_from("<H", ifd_loop, ifd)[0]

    second = struct.unpack_from("<I", ifd_loop, link(first))[0]
    struct.pack_into("<I", ifd_loop, link(second), first)  # the second IFD points back to the first
    assert sniff(bytes(ifd_loop)).problem == f"its IFD chain loops back to byte {first}"
    self_loop = bytearray(_tiff([{"width": 16, "height": 16}]))
    struct.pack_into("<I", self_loop, len(self_loop) - 4, struct.unpack_from("<I", self_loop, 4)[0])
    assert "loops back" in sniff(bytes(self_loop)).problem
    # IFDs of 65535 entries each: capped in all, whatever their number.
    entries = struct.pack("<HHII", 256, 4, 1, 16) + struct.pack("<HHII", 257, 4, 1, 16) + bytes(65533 * 12)
    first, second = 8, 8 + 2 + len(entries) + 4
    wide = (b"II*\0" + struct.pack("<I", first) + b"\xff\xff" + entries + struct.pack("<I", second)
            + b"\xff\xff" + entries + struct.pack("<I", 0))
    assert "more than 100000 entries" in sniff(wide).problem
    assert "ends before its frame header" in sniff(b"\xff\xd8" + b"\xff" * 3_000_000).problem
    app_segments = b"\xff\xd8" + (b"\xff\xe1\x00\x02") * 500_000 + b"\xff\xd9"
    assert "marker 0xD9 comes before its frame header" in sniff(app_segments).problem
    empty_chunks = _png(8, 8)[:33] + _chunk(b"tEXt", b"") * 250_000
    assert "more than 200000 chunks" in sniff(empty_chunks).problem
    gif = b"GIF89a\x10\x00\x10\x00\x00\x00\x00" + b"\x21\xf9" + b"\x01\x00" * 600_000
    assert "more than 500000 blocks" in sniff(gif).problem
    comments = b"P5\n" + b"#\n" * 200_000 + b"37 23\n255\n" + bytes(37 * 23)
    assert sniff(comments) == ImageHeader("PNM", 37, 23)
    assert "more than 10 digits" in sniff(b"P5\n" + b"9" * 100_000 + b" 1\n255\n").problem
    meta = b""
    for _ in range(2000):  # meta boxes nested 2000 deep, no image size anywhere
        meta = struct.pack(">I", 12 + len(meta)) + b"meta" + bytes(4) + meta
    assert "no ispe" in sniff(b"\0\0\0\x14ftypavif\0\0\0\0avif" + meta).problem


def test_iso_media_goes_to_the_avif_reader_whatever_it_starts_with():
    """OpenCV asks libavif before its JPEG decoder: bytes with ``ftyp`` at 4 are never read as JPEG or BMP."""
    assert sniff(b"\xff\xd8\xff\xe0ftypavif" + bytes(40)).format == "AVIF"
    assert sniff(b"BM\0\0ftypheic" + bytes(40)) is None or sniff(b"BM\0\0ftypheic" + bytes(40)).format == "AVIF"


def test_seeded_random_and_mutated_bytes_give_only_input_errors_and_images_within_their_header(real):
    rng = np.random.default_rng(20240611)
    seeds = [data for data, _ in real.values()]
    samples = [rng.bytes(int(rng.integers(0, 600))) for _ in range(1000)]
    for i in range(3000):
        data = bytearray(seeds[i % len(seeds)])
        op = i % 4
        if op == 0:      # flip bytes in the headers
            for at in rng.integers(0, min(len(data), 256), int(rng.integers(1, 9))):
                data[at] = int(rng.integers(0, 256))
        elif op == 1:    # cut anywhere
            del data[int(rng.integers(0, len(data))):]
        elif op == 2:    # insert bytes in the headers
            at = int(rng.integers(0, min(len(data), 256)))
            data[at:at] = rng.bytes(int(rng.integers(1, 16)))
        else:            # an extreme value in a 2- or 4-byte field
            at = int(rng.integers(0, min(len(data), 128) - 4))
            data[at:at + 4] = rng.choice([b"\0\0\0\0", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\0\x01\0\0"])
        samples.append(bytes(data))
    decoded = 0
    for data in samples:
        header = sniff(data)
        try:
            image = decode_image(data, "fuzz", max_pixels=1_000_000)
        except InputError:
            continue
        decoded += 1
        assert header.format in ACCEPTED and header.problem is None
        assert image.shape[0] <= header.height and image.shape[1] <= header.width, (header, image.shape)
    assert 300 < decoded < len(samples) - 1000  # the mutations reach the decoder, and most are refused


# ------------------------------------------------------------------ bombs, in a limited address space

_BOMB_RUNNER = """
    import json, resource, sys
    from pathlib import Path

    import edge_inspect  # before cv2: sets OpenCV's own guard
    import cv2
    import numpy as np
    from edge_inspect.errors import InputError
    from edge_inspect.preprocess import decode_image

    def vm_mib():
        return next(int(line.split()[1]) >> 10 for line in open("/proc/self/status") if line.startswith("VmSize:"))

    limit = (vm_mib() + 1536) << 20  # 1.5 GiB above what the interpreter holds now
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = {}
    try:
        np.empty(2 << 30, np.uint8)
        results["control"] = "allocated"
    except MemoryError:
        results["control"] = "MemoryError"
    for path in sorted(Path(sys.argv[1]).iterdir()):
        max_pixels = 10 ** 12 if path.name.startswith("guard") else 50_000_000
        try:
            if path.name.startswith("raw"):  # what OpenCV does with it, unguarded
                image = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
            else:
                image = decode_image(path.read_bytes(), path.name, max_pixels)
            results[path.name] = ["decoded", list(image.shape)]
        except InputError as exc:
            results[path.name] = ["InputError", str(exc)]
        except BaseException as exc:
            results[path.name] = [type(exc).__name__, str(exc)]
    results["maxrss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) >> 10
    print(json.dumps(results))
"""


def test_bombs_of_every_accepted_format_are_refused_without_their_memory(real, tmp_path):
    over = "megapixels, over the limit of 50 megapixels (--max-pixels); not decoded"
    lossless, animated = real["webp-lossless"][0], bytearray(real["webp-animated"][0])
    vp8l = bytearray(lossless)
    struct.pack_into("<I", vp8l, 21, (16383 | 16383 << 14) | (vp8l[24] >> 4 & 0xF) << 28)
    animated[24:30] = (59999).to_bytes(3, "little") * 2  # VP8X canvas: 60000 x 60000
    zlib_bomb = _zlib_bomb(2048)
    bombs = {  # name: (bytes, what the error must say; None: decoded to 64 x 64)
        "png-ihdr.png": (_png(100_000, 100_000), ["100000 x 100000 = 10000.0", over]),
        "png-chunk.png": (_png(1, 1, extra=struct.pack(">I", 0xFFFFFFF0) + b"tEXt" + bytes(20)),
                          ["chunk b'tEXt' at byte 33 declares 4294967280 bytes"]),
        "png-zlib.png": (_png(64, 64, idat=zlib_bomb),
                         [f"IDAT chunks hold {len(zlib_bomb)} bytes, more than the 4160 bytes its rows take"]),
        # Unguarded, OpenCV keeps to the 64 x 64 rows IHDR declares, but inflates all 64 MiB (2 GiB: 4 s of CPU).
        "raw-png-zlib.png": (_png(64, 64, idat=_zlib_bomb(64)), None),
        "jpeg-sof.jpg": (_sof_patched(real["jpeg"][0], 65_500, 65_500), ["65500 x 65500 = ", over]),
        "tiff-second-ifd.tif": (_tiff([{"width": 16, "height": 16}, {"width": 100_000, "height": 100_000}]),
                                ["100000 x 100000 = ", over]),
        "tiff-strip.tif": (_tiff([{"width": 4096, "height": 1, "spp": 3, "rows": 65_000}]),
                           ["tiles or strips are 4096 x 65000"]),
        "tiff-tile.tif": (_tiff([{"width": 16, "height": 16, "spp": 3, "tile": (16384, 16000)}]),
                          ["tiles or strips are 16384 x 16000"]),
        "tiff-float64.tif": (_tiff([{"width": 7000, "height": 6000, "spp": 4, "bits": 64}]),
                             ["a 7000 x 6000 TIFF of 32 bytes a pixel, 1.34 GB decoded"]),
        "bigtiff.tif": (_tiff([{"width": 100_000, "height": 100_000}], big=True), ["100000 x 100000 = ", over]),
        "webp-vp8x-canvas.webp": (bytes(animated), ["60000 x 60000 = ", over]),
        "webp-vp8l.webp": (bytes(vp8l), ["16384 x 16384 = ", over]),
        "pnm.pgm": (b"P5\n100000 100000\n255\n" + bytes(1024), ["100000 x 100000 = ", over]),
        "pnm-ascii.ppm": (b"P3\n100000 100000\n65535\n" + b"1 " * 512, ["100000 x 100000 = ", over]),
        "bmp-negative-height.bmp": (_bmp_header(100_000, -100_000), ["100000 x 100000 = ", over]),
        "bmp-min-height.bmp": (_bmp_header(1, -(2 ** 31)), ["1 x 2147483648 = ", over]),
        # Over OpenCV's own guard but let through by a raised limit: the second line refuses it.
        "guard.png": (_png(20_000, 20_000), ["OpenCV refused", f"OPENCV_IO_MAX_IMAGE_PIXELS={OPENCV_MAX_PIXELS}"]),
    }
    folder = tmp_path / "bombs"
    folder.mkdir()
    for name, (data, _) in bombs.items():
        assert len(data) < 3 << 20, name
        (folder / name).write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_BOMB_RUNNER), str(folder)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["control"] == "MemoryError"  # the limit is real: 2 GiB cannot be had
    for name, (_, expected) in bombs.items():
        outcome, detail = results[name]
        if expected is None:
            assert (outcome, detail) == ("decoded", [64, 64]), name
        else:
            assert outcome == "InputError" and all(part in detail for part in expected), (name, outcome, detail)
    assert results["maxrss_growth_mib"] < 200, results["maxrss_growth_mib"]


def test_opencv_reads_its_pixel_guard_once_when_it_is_imported():
    """OPENCV_IO_MAX_IMAGE_PIXELS counts only if set before cv2 loads, which importing edge_inspect does."""
    declares_400_mp = _png(20_000, 20_000)
    code = """
        import os, sys
        {first}
        import cv2, numpy as np
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = "1"  # too late: read once, at import
        try:
            image = cv2.imdecode(np.frombuffer(bytes.fromhex(sys.argv[1]), np.uint8), cv2.IMREAD_UNCHANGED)
            print("returned", image is None)
        except cv2.error as exc:
            print("refused", "CV_IO_MAX_IMAGE_PIXELS" in str(exc))
    """

    def run(first, env_extra=None):
        env = {k: v for k, v in __import__("os").environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code.format(first=first)),
                               declares_400_mp.hex()], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**env, **(env_extra or {})})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert run("import edge_inspect") == ["refused", "True"]        # 400 MP > 2**28: OpenCV's guard says no
    assert run("import cv2; import edge_inspect") == ["returned", "True"]  # OpenCV's default 2**30 let it through
    assert run("import edge_inspect", {"OPENCV_IO_MAX_IMAGE_PIXELS": str(10 ** 9)}) == ["returned", "True"]
