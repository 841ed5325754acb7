"""What an image file says it is, read from its bytes without decoding it.

OpenCV sizes its buffers from what a header declares before it reads a pixel,
so a file of a few hundred bytes can ask for gigabytes. Measured with this
OpenCV (5.0.0): a 61-byte PNG whose tEXt chunk declares 4 GiB makes it
allocate and zero 4 GiB; a 902-byte TIFF with 16384 x 16000 tiles around a
16 x 16 image, 1 GiB; a 64 x 64 PNG followed by 2 MiB of IDAT, 4 s of CPU
inflating 2 GiB it throws away. This module reads those declarations, for
every format this OpenCV build decodes, and :func:`admit` is the policy in
front of ``cv2.imdecode``: only the formats in :data:`ACCEPTED`, with a sound
header, within the pixel limit, pass; anything else is an ``InputError``.

The formats this build decodes, each with a reader here: BMP, GIF, AVIF,
Radiance HDR, JPEG, WebP (RIFF, and bare VP8/VP8L bitstreams), Sun raster,
PNM (P1-P6), PAM, PFM, TIFF and BigTIFF, PNG and APNG, JPEG 2000 (JP2 and
raw J2K codestreams). OpenEXR, JPEG XL and QOI are not built in. Every
reader is linear in the file's length: no loop follows an offset twice, and
none allocates from a declared length.

OpenCV's own guard, OPENCV_IO_MAX_IMAGE_PIXELS (default 2**30), is honoured
by this build but read once, when cv2 is first imported; :func:`guard_opencv`,
called by the package before any module imports cv2, sets it to
:data:`OPENCV_MAX_PIXELS` as a second line.

    >>> header = sniff(Path("part.png").read_bytes())
    >>> header.format, header.width, header.height
    ('PNG', 640, 480)
"""

from __future__ import annotations

import os
import re
import struct
import sys
from dataclasses import dataclass

from edge_inspect.errors import InputError

#: Pixel count over which an image is refused before decoding (``--max-pixels``).
DEFAULT_MAX_PIXELS = 50_000_000
#: OpenCV's own guard, set through OPENCV_IO_MAX_IMAGE_PIXELS by :func:`guard_opencv`:
#: 2**28 pixels (OpenCV's default is 2**30, 8 GiB at 8 bytes a pixel).
OPENCV_MAX_PIXELS = 1 << 28
#: The formats :func:`admit` lets through to the decoder, with their file suffixes.
ACCEPTED = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg"),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
    "WebP": (".webp",),
    "PNM": (".pbm", ".pgm", ".ppm", ".pnm"),
}
#: Every format :func:`sniff` recognises: all that this OpenCV build decodes.
FORMATS = (*ACCEPTED, "GIF", "AVIF", "Radiance HDR", "Sun raster", "PAM", "PFM", "JPEG 2000", "WebP bitstream")

_MAX_TIFF_ENTRIES = 100_000   # IFD entries read in all; real files have tens a page
_MAX_JPEG_SCANS = 500         # libjpeg decodes each scan over the whole image; real files have 1 to about 20
_MAX_PNG_CHUNKS = 200_000     # 12 bytes each at least; libpng writes 8 KiB IDATs
_MAX_GIF_BLOCKS = 500_000     # blocks and data sub-blocks, up to 256 bytes each
_TEXT_HEADER = 1 << 16        # how far the text headers (HDR, PAM) are looked for
_SPACE = b" \t\n\v\f\r"       # C isspace(), what OpenCV's PNM reader skips
_SPACES = re.compile(rb"[ \t\n\v\f\r]*")
_LINE_END = re.compile(rb"[\n\r]")
_NOT_FF = re.compile(rb"[^\xff]")


@dataclass(frozen=True)
class ImageHeader:
    """What an image file declares, read by :func:`sniff`.

    Attributes:
        format: one of :data:`FORMATS`.
        width, height: of the largest image the file declares, in pixels
            (the largest TIFF page; an animation's canvas or largest frame).
        frames: images declared (TIFF pages, animation frames); 1 for a still.
        tile: ``(width, height)`` of the largest TIFF tile or strip, which
            OpenCV buffers whole whatever the image's size; None otherwise.
        pixel_bytes: bytes a decoded pixel takes, for TIFF, whose 32- and
            64-bit samples take up to 32; None for the formats that keep to
            8 (16-bit RGBA) or fewer.
        problem: why the header cannot be trusted (cut short, a length past
            the end of the file, an IFD chain that loops...), or None. With a
            problem, width and height are what the header declared before it,
            or 0.
    """

    format: str
    width: int
    height: int
    frames: int = 1
    tile: tuple[int, int] | None = None
    pixel_bytes: int | None = None
    problem: str | None = None

    @property
    def pixels(self) -> int:
        return self.width * self.height


class _Bad(Exception):
    """A header that matched a format's signature but cannot be used, and the size it declared before that."""

    def __init__(self, message: str, width: int = 0, height: int = 0):
        super().__init__(message)
        self.width, self.height = (width, height) if width > 0 and height > 0 else (0, 0)


def sniff(data: bytes) -> ImageHeader | None:
    """The format and declared size of encoded image bytes, without decoding them.

    Args:
        data: the file's bytes, all of them: PNG chunks, TIFF pages and
            WebP chunks are read to the end.

    Returns:
        An :class:`ImageHeader`; its ``problem`` is set when the bytes start
        like a format but its header is cut short or inconsistent. None when
        the bytes match the signature of no format this OpenCV decodes.
        Never raises, whatever the bytes.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    found = _which(data)
    if found is None:
        return None
    name, reader = found
    try:
        return reader(data)
    except _Bad as exc:
        return ImageHeader(name, exc.width, exc.height, problem=str(exc))
    except (struct.error, IndexError):
        return ImageHeader(name, 0, 0, problem="its header is cut short")


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` an image's header declares, even one cut short after it; None if it declares none."""
    header = sniff(data)
    if header is None or header.pixels == 0:
        return None
    return header.width, header.height


def check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    """Refuse ``width x height`` over ``max_pixels``.

    Raises:
        InputError: over the limit, naming it and how to raise it.
    """
    if width * height > max_pixels:
        raise InputError(f"{name}: {width} x {height} = {width * height / 1e6:.1f} megapixels, over the limit of "
                         f"{max_pixels / 1e6:g} megapixels (--max-pixels); not decoded. Raise --max-pixels if "
                         "such images are expected.")


def admit(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """The allow-list in front of the decoder: the header of bytes that may be decoded.

    Args:
        data: the file's bytes.
        name: how to name the image in error messages.
        max_pixels: the most pixels the image, and a TIFF tile or strip, may have.

    Returns:
        The :class:`ImageHeader` of an accepted format, sound and within the limit.

    Raises:
        InputError: the bytes are of no accepted format; or they declare
            more than ``max_pixels`` pixels, more than 8 bytes a pixel of
            them, or TIFF tiles or strips of more; or their header is cut
            short or inconsistent.
    """
    accepted = _accepted_list()
    header = sniff(data)
    if header is None:
        raise InputError(f"{name}: not a readable image: not a {accepted} image (it starts with "
                         f"{_preview(data)}). Save part images in one of these formats.")
    if header.format not in ACCEPTED:
        size = f"{header.width} x {header.height}, " if header.problem is None else ""
        article = "an" if header.format[0] in "AEIOU" else "a"
        raise InputError(f"{name}: {article} {header.format} image ({size}{len(data)} bytes); this runtime "
                         f"decodes only {accepted} images. Convert it (PNG keeps every pixel); not decoded.")
    check_pixels(name, header.width, header.height, max_pixels)
    if header.problem is not None:
        raise InputError(f"{name}: not a readable image: a {header.format} file, but {header.problem}; not decoded "
                         "(the file is truncated, corrupt or crafted).")
    if header.pixel_bytes is not None and header.pixels * header.pixel_bytes > max_pixels * 8:
        raise InputError(f"{name}: a {header.width} x {header.height} {header.format} of {header.pixel_bytes} bytes a "
                         f"pixel, {header.pixels * header.pixel_bytes / 1e9:.2f} GB decoded, over the "
                         f"{max_pixels * 8 / 1e9:.2f} GB that the limit of {max_pixels / 1e6:g} megapixels "
                         "(--max-pixels) allows at 8 bytes a pixel; not decoded. Raise --max-pixels if such images "
                         "are expected.")
    if header.tile is not None and header.tile[0] * header.tile[1] > max_pixels:
        tw, th = header.tile
        raise InputError(f"{name}: a {header.width} x {header.height} TIFF whose tiles or strips are {tw} x {th} = "
                         f"{tw * th / 1e6:.1f} megapixels, over the limit of {max_pixels / 1e6:g} megapixels "
                         "(--max-pixels); OpenCV buffers a whole tile, so it was not decoded. Write it with smaller "
                         "tiles or strips, or raise --max-pixels if such images are expected.")
    return header


def guard_opencv() -> None:
    """Set OpenCV's own pixel guard, OPENCV_IO_MAX_IMAGE_PIXELS, to :data:`OPENCV_MAX_PIXELS`.

    OpenCV reads the variable once, when cv2 is first imported, and then
    refuses (``cv2.error``) any image over it after reading its header: a
    second line behind :func:`admit`. Set only when the environment does not
    already set it and cv2 is not yet imported (it would have no effect).
    """
    if "cv2" not in sys.modules:
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(OPENCV_MAX_PIXELS))


def _accepted_list() -> str:
    names = list(ACCEPTED)
    return ", ".join(names[:-1]) + " or " + names[-1]


def _preview(data: bytes) -> str:
    head = data[:8]
    text = "".join(chr(b) if 32 <= b < 127 else "." for b in head)
    return f"{head.hex(' ')} '{text}'" + (", ..." if len(data) > 8 else "")


# ------------------------------------------------------------------ dispatch


def _which(data: bytes):
    """The format whose OpenCV signature the bytes match, and its reader.

    OpenCV gives the bytes to the first decoder whose signature matches. The
    signatures below are disjoint but for ISO media (``ftyp`` at byte 4,
    which libavif's AVIF check looks for before the JPEG decoder's turn):
    such bytes go to the AVIF reader whatever else they look like, so no
    accepted format is read from bytes OpenCV would give another decoder.
    """
    head = data[:12]
    if head[4:8] == b"ftyp":
        return "AVIF", _avif
    if head[:2] == b"BM":
        return "BMP", _bmp
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF", _gif
    if head.startswith((b"#?RADIANCE", b"#?RGBE")):
        return "Radiance HDR", _hdr
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG", _jpeg
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP", _webp
    if _bare_webp(data):
        return "WebP bitstream", _webp_bare
    if head[:4] == b"\x59\xa6\x6a\x95":
        return "Sun raster", _sun
    if len(head) >= 3 and head[0:1] == b"P" and head[2] in _SPACE:
        if b"1"[0] <= head[1] <= b"6"[0]:
            return "PNM", _pnm
        if head[1:2] == b"7":
            return "PAM", _pam
        if head[1:2] in (b"F", b"f"):
            return "PFM", _pfm
    if head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return "TIFF", _tiff
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG", _png
    if head == b"\0\0\0\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":
        return "JPEG 2000", _jpeg2000
    return None


def _u16(data, at, order=">"):
    return struct.unpack_from(order + "H", data, at)[0]


def _u32(data, at, order=">"):
    return struct.unpack_from(order + "I", data, at)[0]


def _need(data: bytes, end: int, what: str) -> None:
    if end > len(data):
        raise _Bad(f"it is cut short in its {what} ({len(data)} bytes; {end} needed)")


def _sized(fmt: str, width: int, height: int, **more) -> ImageHeader:
    if width <= 0 or height <= 0:
        raise _Bad(f"it declares {width} x {height} pixels")
    return ImageHeader(fmt, width, height, **more)


# ------------------------------------------------------------ accepted formats


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type


def _png(data: bytes) -> ImageHeader:
    """IHDR, then every chunk to IEND: OpenCV 5.0 allocates each chunk's declared length before reading it.

    libpng inflates the image data (IDAT) to its end, the rows IHDR declares
    and then whatever follows them, so IDAT must not hold more than the rows
    take uncompressed (deflate never expands by more than a fraction of a
    percent): 2 MiB of IDAT behind a 64 x 64 IHDR would otherwise be 2 GiB
    inflated, seconds of CPU, for nothing.
    """
    _need(data, 33, "IHDR chunk")
    if data[12:16] != b"IHDR" or _u32(data, 8) != 13:
        raise _Bad("its first chunk is not a 13-byte IHDR")
    width, height = _u32(data, 16), _u32(data, 20)
    if width > 0x7FFFFFFF or height > 0x7FFFFFFF:
        raise _Bad(f"it declares {width} x {height} pixels, past the PNG maximum of 2^31 - 1")
    bits = data[24] * _PNG_CHANNELS.get(data[25], 4)
    rows = height * (1 + (width * bits + 7) // 8)  # a filter byte and the pixels of each row
    frames, pos, chunks, idat = 1, 8, 0, 0
    while True:
        if pos + 12 > len(data):
            raise _Bad("it ends before its IEND chunk", width, height)
        length, kind = _u32(data, pos), data[pos + 4:pos + 8]
        if length > len(data) - pos - 12:
            raise _Bad(f"chunk {kind!r} at byte {pos} declares {length} bytes where {len(data) - pos - 12} remain",
                       width, height)
        body = pos + 8
        if kind == b"IEND":
            break
        if kind == b"IDAT":
            idat += length
        elif kind == b"acTL" and length >= 8:
            frames = max(1, _u32(data, body))
        elif kind == b"fcTL" and length >= 26:
            w, h, x, y = struct.unpack_from(">IIII", data, body + 4)
            if x + w > width or y + h > height:
                raise _Bad(f"an APNG frame of {w} x {h} at ({x}, {y}) spills out of its {width} x {height} canvas",
                           width, height)
        chunks += 1
        if chunks > _MAX_PNG_CHUNKS:
            raise _Bad(f"it has more than {_MAX_PNG_CHUNKS} chunks", width, height)
        pos = body + length + 4
    if idat > 2 * rows + 65536:  # twice: Adam7 interlacing adds a filter byte to each row of each pass
        raise _Bad(f"its IDAT chunks hold {idat} bytes, more than the {rows} bytes its rows take uncompressed: "
                   "a decompression bomb", width, height)
    return _sized("PNG", width, height, frames=frames)


# The frame headers libjpeg-turbo decodes (baseline, extended, progressive,
# lossless; Huffman or arithmetic) and the segments it skips by their length.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCB}
_SEGMENTS = {0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)}


def _jpeg(data: bytes) -> ImageHeader:
    """Markers in libjpeg's order up to the first frame header (SOFn), as ``jpeg_read_header`` reads them."""
    pos = 2
    while True:
        # libjpeg skips stray bytes before a marker (with a warning) and any 0xFF fill bytes.
        pos = data.find(b"\xff", pos)
        if pos < 0:
            raise _Bad("it ends before its frame header (SOF)")
        fill_end = _NOT_FF.search(data, pos)
        if fill_end is None:
            raise _Bad("it ends before its frame header (SOF)")
        pos = fill_end.start()
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # TEM and RSTn stand alone
        if marker in (0xD8, 0xD9, 0xDA):
            raise _Bad(f"marker 0x{marker:02X} comes before its frame header (SOF)")
        if marker not in _SOF and marker not in _SEGMENTS:
            raise _Bad(f"it holds marker 0x{marker:02X}, which libjpeg does not decode")
        _need(data, pos + 2, "segment lengths")
        length = _u16(data, pos)
        if length < 2:
            raise _Bad(f"segment 0x{marker:02X} at byte {pos - 2} declares a length of {length}")
        if marker in _SOF:
            _need(data, pos + 8, "frame header")
            height, width = struct.unpack_from(">HH", data, pos + 3)
            # Entropy-coded data stuffs a zero after each 0xFF byte: every FF DA is a scan header.
            scans = data.count(b"\xff\xda", pos)
            if scans > _MAX_JPEG_SCANS:
                raise _Bad(f"it holds {scans} scans, each decoded over the whole image by libjpeg; "
                           f"at most {_MAX_JPEG_SCANS} are read", width, height)
            return _sized("JPEG", width, height)
        pos += length


def _bmp(data: bytes) -> ImageHeader:
    """The info header as OpenCV reads it: 32-bit sizes from 36 bytes on, 16-bit in the 12-byte OS/2 one."""
    _need(data, 18, "file header")
    size = struct.unpack_from("<i", data, 14)[0]
    if size >= 36:
        _need(data, 26, "info header")
        width, height = struct.unpack_from("<ii", data, 18)
    elif size == 12:
        _need(data, 22, "info header")
        width, height = struct.unpack_from("<HH", data, 18)
    else:
        raise _Bad(f"its info header is {size} bytes; OpenCV reads 12 or at least 36")
    if width <= 0 or height == 0:
        raise _Bad(f"it declares {width} x {height} pixels")
    return ImageHeader("BMP", width, abs(height))  # a negative height is a top-down image


_TIFF_TAGS = {256: "width", 257: "height", 258: "bits", 262: "photometric", 277: "samples", 278: "rows",
              322: "tile_width", 323: "tile_height"}
_TIFF_INT = {1: "B", 3: "H", 4: "I", 16: "Q"}  # BYTE, SHORT, LONG, LONG8
_LOGLUV = (32844, 32845)  # photometric interpretations OpenCV decodes to float RGB


def _tiff(data: bytes) -> ImageHeader:
    """Every IFD of a TIFF or BigTIFF: the largest page, tile or strip and pixel, and the page count."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\0", b"\0+")
    if big:
        _need(data, 16, "header")
        if struct.unpack_from(order + "HH", data, 4) != (8, 0):
            raise _Bad("its BigTIFF header does not declare 8-byte offsets")
        offset = struct.unpack_from(order + "Q", data, 8)[0]
    else:
        _need(data, 8, "header")
        offset = _u32(data, 4, order)
    pages: list[dict] = []
    seen, entries = set(), 0
    try:
        while offset:
            if offset in seen:
                raise _Bad(f"its IFD chain loops back to byte {offset}")
            seen.add(offset)
            page, offset = _tiff_ifd(data, offset, order, big, len(pages) + 1)
            pages.append(page)
            entries += page["entries"]
            if entries > _MAX_TIFF_ENTRIES:
                raise _Bad(f"its IFDs hold more than {_MAX_TIFF_ENTRIES} entries")
    except _Bad as exc:  # with the largest page read before the problem
        w, h = max(((p["width"], p["height"]) for p in pages), key=lambda s: s[0] * s[1], default=(0, 0))
        raise _Bad(str(exc), w, h) from None
    if not pages:
        raise _Bad("it has no IFD")
    width, height = max(((p["width"], p["height"]) for p in pages), key=lambda s: s[0] * s[1])
    tile = max((p["tile"] for p in pages), key=lambda s: s[0] * s[1])
    return ImageHeader("TIFF", width, height, frames=len(pages), tile=tile,
                       pixel_bytes=max(p["pixel_bytes"] for p in pages))


def _tiff_ifd(data: bytes, offset: int, order: str, big: bool, number: int) -> tuple[dict, int]:
    """One IFD: its page's size, tile or strip, bytes a pixel and entry count; and the next IFD's offset."""
    count_fmt, offset_fmt = order + ("Q" if big else "H"), order + ("Q" if big else "I")
    count_size, offset_size = struct.calcsize(count_fmt), struct.calcsize(offset_fmt)
    entry_size, value_at = (20, 12) if big else (12, 8)
    _need(data, offset + count_size, f"IFD {number}")
    count = struct.unpack_from(count_fmt, data, offset)[0]
    if count > _MAX_TIFF_ENTRIES:
        raise _Bad(f"its IFD {number} declares {count} entries")
    end = offset + count_size + count * entry_size
    _need(data, end + offset_size, f"IFD {number}")
    tags: dict[str, int] = {}
    for at in range(offset + count_size, end, entry_size):
        tag, kind = struct.unpack_from(order + "HH", data, at)
        if tag not in _TIFF_TAGS:
            continue
        n = struct.unpack_from(order + ("Q" if big else "I"), data, at + 4)[0]
        if kind not in _TIFF_INT or (kind == 16 and not big) or not (n == 1 or tag == 258 and n >= 1):
            raise _Bad(f"tag {tag} of IFD {number} has type {kind} and count {n}; expected one integer")
        fmt, where = order + _TIFF_INT[kind], at + value_at
        if n * struct.calcsize(fmt) > offset_size:  # BitsPerSample, one a sample: stored elsewhere
            where = struct.unpack_from(offset_fmt, data, where)[0]
            _need(data, where + struct.calcsize(fmt), f"IFD {number}'s values")
        key = _TIFF_TAGS[tag]
        tags[key] = max(tags.get(key, 0), struct.unpack_from(fmt, data, where)[0])  # repeated: fear the larger
    w, h = tags.get("width", 0), tags.get("height", 0)
    if w <= 0 or h <= 0:
        raise _Bad(f"IFD {number} declares {w} x {h} pixels")
    # OpenCV's buffer: a whole tile, or a whole strip of RowsPerStrip rows (not clamped to the height).
    if "tile_width" in tags or "tile_height" in tags:
        tile = (tags.get("tile_width") or w, tags.get("tile_height") or h)
    else:
        rows = tags.get("rows", 0)
        tile = (w, rows if 0 < rows < 0xFFFFFFFF else h)
    # The Mat OpenCV fills: up to 4 channels of 1, 2, 4 or 8 bytes (no BitsPerSample means 1 bit).
    bits, samples = tags.get("bits", 1), min(max(tags.get("samples", 1), 1), 4)
    depth = 1 if bits <= 8 else 2 if bits <= 16 else 4 if bits <= 32 else 8
    pixel_bytes = 12 if tags.get("photometric") in _LOGLUV else depth * samples
    page = {"width": w, "height": h, "tile": tile, "pixel_bytes": pixel_bytes, "entries": count}
    return page, struct.unpack_from(offset_fmt, data, end)[0]


def _webp_chunks(data: bytes, pos: int, end: int):
    """``(fourcc, payload start, payload size)`` of the RIFF chunks in ``data[pos:end]``."""
    while pos < end:
        _need(data, pos + 8, "chunk headers")
        size = _u32(data, pos + 4, "<")
        if pos + 8 + size > end:
            raise _Bad(f"chunk {data[pos:pos + 4]!r} at byte {pos} declares {size} bytes where "
                       f"{end - pos - 8} remain")
        yield data[pos:pos + 4], pos + 8, size
        pos += 8 + size + (size & 1)


def _vp8_size(data: bytes, at: int, lossless: bool) -> tuple[int, int]:
    """Width and height of a VP8L bitstream or a VP8 key frame."""
    if lossless:
        if data[at:at + 1] != b"\x2f":
            raise _Bad("its VP8L data lacks the VP8L signature")
        _need(data, at + 5, "VP8L header")
        bits = _u32(data, at + 1, "<")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    _need(data, at + 10, "VP8 frame header")
    if data[at + 3:at + 6] != b"\x9d\x01\x2a" or data[at] & 1:
        raise _Bad("its VP8 data is not a key frame")
    return _u16(data, at + 6, "<") & 0x3FFF, _u16(data, at + 8, "<") & 0x3FFF


def _webp_size(data: bytes, pos: int, end: int, fmt: str) -> ImageHeader:
    """The canvas (VP8X), the bitstreams (VP8, VP8L) and animation frames (ANMF): the largest of them.

    Without a VP8X chunk first, libwebp reads the first chunk as the image,
    or as a bare bitstream if it is none: so it must be VP8 or VP8L.
    """
    if data[pos:pos + 4] not in (b"VP8X", b"VP8 ", b"VP8L", b"ALPH"):
        raise _Bad(f"its first chunk is {data[pos:pos + 4]!r}; expected VP8X, VP8 or VP8L")
    sizes, frames = [], 0
    for kind, at, size in _webp_chunks(data, pos, end):
        if kind == b"VP8X":
            if size != 10:
                raise _Bad(f"its VP8X chunk is {size} bytes; expected 10")
            sizes.append((1 + int.from_bytes(data[at + 4:at + 7], "little"),
                          1 + int.from_bytes(data[at + 7:at + 10], "little")))
        elif kind in (b"VP8 ", b"VP8L"):
            sizes.append(_vp8_size(data, at, kind == b"VP8L"))
        elif kind == b"ANMF":
            _need(data, at + 16, "ANMF header")
            x, y, w, h = (int.from_bytes(data[at + i:at + i + 3], "little") for i in (0, 3, 6, 9))
            sizes.append((2 * x + w + 1, 2 * y + h + 1))
            frames += 1
    if not sizes:
        raise _Bad("it holds no image data (VP8, VP8L or ANMF chunk)")
    return _sized(fmt, max(w for w, _ in sizes), max(h for _, h in sizes), frames=max(1, frames))


def _webp(data: bytes) -> ImageHeader:
    riff = _u32(data, 4, "<")
    if riff < 4 or 8 + riff > len(data):
        raise _Bad(f"its RIFF header declares {riff} bytes where {len(data) - 8} follow")
    return _webp_size(data, 12, 8 + riff, "WebP")


def _bare_webp(data: bytes) -> bool:
    """libwebp (OpenCV's WebP signature check) also takes a VP8/VP8L/VP8X chunk or bitstream without RIFF."""
    if data[:4] in (b"VP8 ", b"VP8L", b"VP8X", b"ALPH"):
        return True
    if data[:1] == b"\x2f" and len(data) >= 5 and data[4] >> 5 == 0:
        return True  # a VP8L bitstream: signature byte, then version 0
    if len(data) >= 10 and data[3:6] == b"\x9d\x01\x2a" and not data[0] & 1:
        bits = int.from_bytes(data[:3], "little")
        return (bits >> 1) & 7 <= 3 and bool((bits >> 4) & 1) and bits >> 5 < 32  # as libwebp's VP8GetInfo
    return False


def _webp_bare(data: bytes) -> ImageHeader:
    if data[:4] in (b"VP8 ", b"VP8L", b"VP8X", b"ALPH"):
        return _webp_size(data, 0, len(data), "WebP bitstream")
    return _sized("WebP bitstream", *_vp8_size(data, 0, data[:1] == b"\x2f"))


def _number(data: bytes, pos: int, comments: bool) -> tuple[int, int]:
    """The decimal number after whitespace (and ``#`` comments) at ``pos``, and where the next field starts.

    As OpenCV's PNM reader, but stricter: the number must end in whitespace
    (OpenCV would swallow whatever byte follows it).
    """
    while True:
        pos = _SPACES.match(data, pos).end()
        _need(data, pos + 1, "header")
        c = data[pos]
        if 48 <= c <= 57:
            break
        if c == 35 and comments:  # '#' to the end of the line
            line_end = _LINE_END.search(data, pos)
            if line_end is None:
                raise _Bad("it ends inside a header comment")
            pos = line_end.end()
        else:
            raise _Bad(f"byte 0x{c:02X} at {pos} is neither a digit, whitespace nor a comment")
    start = pos
    while pos < len(data) and 48 <= data[pos] <= 57 and pos - start <= 10:
        pos += 1
    if pos - start > 10:
        raise _Bad(f"the number at byte {start} has more than 10 digits")
    _need(data, pos + 1, "header")
    if data[pos] not in _SPACE:
        raise _Bad(f"the number at byte {start} is not followed by whitespace")
    return int(data[start:pos]), pos + 1


def _pnm(data: bytes) -> ImageHeader:
    width, pos = _number(data, 2, comments=True)
    height, pos = _number(data, pos, comments=True)
    if data[1] not in b"14":
        maxval, pos = _number(data, pos, comments=True)
        if not 0 < maxval < 65536:
            raise _Bad(f"its maximum value is {maxval}; expected 1 to 65535")
    return _sized("PNM", width, height)


# --------------------------------------------------- formats read, not accepted


def _gif(data: bytes) -> ImageHeader:
    """The logical screen and every frame's extent, walking the blocks to the trailer."""
    _need(data, 13, "screen descriptor")
    width, height = struct.unpack_from("<HH", data, 6)
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    frames = blocks = 0
    while True:
        _need(data, pos + 1, "blocks")
        block = data[pos]
        if block == 0x3B:
            break
        if block == 0x2C:
            _need(data, pos + 10, "image descriptor")
            left, top, w, h = struct.unpack_from("<HHHH", data, pos + 1)
            width, height = max(width, left + w), max(height, top + h)
            packed = data[pos + 9]
            pos += 10 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0) + 1  # and the LZW code size
            frames += 1
        elif block == 0x21:
            pos += 2
        else:
            raise _Bad(f"block 0x{block:02X} at byte {pos} is neither an image, an extension nor the trailer")
        while True:  # data sub-blocks, each led by its length, to a zero length
            blocks += 1
            if blocks > _MAX_GIF_BLOCKS:
                raise _Bad(f"it has more than {_MAX_GIF_BLOCKS} blocks")
            _need(data, pos + 1, "data sub-blocks")
            if data[pos] == 0:
                pos += 1
                break
            pos += 1 + data[pos]
    return _sized("GIF", width, height, frames=max(1, frames))


def _boxes(data: bytes, pos: int, end: int):
    """``(type, payload start, payload end)`` of the ISO media / JP2 boxes in ``data[pos:end]``."""
    while pos + 8 <= end:
        size, kind, header = _u32(data, pos), data[pos + 4:pos + 8], 8
        if size == 1:
            _need(data, pos + 16, "box headers")
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise _Bad(f"box {kind!r} at byte {pos} declares {size} bytes where {end - pos} remain")
        yield kind, pos + header, pos + size
        pos += size


def _avif(data: bytes) -> ImageHeader | None:
    """The largest image size property (``ispe``) in ``meta/iprp/ipco``; None when no brand says AVIF."""
    top = list(_boxes(data, 0, len(data)))
    _, start, end = top[0]  # ftyp: major brand, minor version, compatible brands
    if not {data[i:i + 4] for i in range(start, end - 3, 4)} & {b"avif", b"avis"}:
        return None  # HEIF, MP4...: no decoder of this OpenCV takes them
    sizes, todo = [], [box for box in top if box[0] == b"meta"]
    while todo:
        kind, start, end = todo.pop()
        for sub, s, e in _boxes(data, start + 4 if kind == b"meta" else start, end):  # meta is a full box
            if sub in (b"meta", b"iprp", b"ipco"):
                todo.append((sub, s, e))
            elif sub == b"ispe" and e - s >= 12:
                sizes.append(struct.unpack_from(">II", data, s + 4))  # after its version and flags
    if not sizes:
        raise _Bad("it declares no image size (no ispe property)")
    return _sized("AVIF", max(w for w, _ in sizes), max(h for _, h in sizes), frames=len(sizes))


def _jpeg2000(data: bytes) -> ImageHeader:
    """A JP2 file's image header (``jp2h/ihdr``) and codestream SIZ marker, or a raw codestream's SIZ."""
    sizes = []
    if data[:4] == b"\xff\x4f\xff\x51":
        sizes.append(_siz(data, 0))
    else:
        for kind, start, end in _boxes(data, 0, len(data)):
            if kind == b"jp2h":
                for sub, s, e in _boxes(data, start, end):
                    if sub == b"ihdr" and e - s >= 8:
                        height, width = struct.unpack_from(">II", data, s)
                        sizes.append((width, height))
            elif kind == b"jp2c":
                sizes.append(_siz(data, start))
    if not sizes:
        raise _Bad("it declares no image size (no ihdr box or SIZ marker)")
    return _sized("JPEG 2000", max(w for w, _ in sizes), max(h for _, h in sizes))


def _siz(data: bytes, at: int) -> tuple[int, int]:
    _need(data, at + 24, "SIZ marker")
    if data[at:at + 4] != b"\xff\x4f\xff\x51":
        raise _Bad(f"its codestream at byte {at} does not start with SOC and SIZ markers")
    x, y, x0, y0 = struct.unpack_from(">IIII", data, at + 8)
    return x - x0, y - y0


def _sun(data: bytes) -> ImageHeader:
    _need(data, 12, "header")
    return _sized("Sun raster", _u32(data, 4), _u32(data, 8))


def _text_header(data: bytes, fmt_end: bytes, what: str) -> bytes:
    end = data.find(fmt_end, 0, _TEXT_HEADER)
    if end < 0:
        raise _Bad(f"no {what} in its first {_TEXT_HEADER} bytes")
    return data[:end + len(fmt_end)]


def _hdr(data: bytes) -> ImageHeader:
    """The resolution line after the blank line that ends the header: ``-Y 480 +X 640`` and its variants."""
    head = _text_header(data, b"\n\n", "blank line ending the header")
    line_end = data.find(b"\n", len(head), len(head) + 64)
    fields = data[len(head):line_end if line_end >= 0 else len(head) + 64].split()
    if len(fields) != 4 or fields[0] not in (b"-Y", b"+Y", b"-X", b"+X") or not (fields[1] + fields[3]).isdigit():
        raise _Bad(f"its resolution line reads {bytes(data[len(head):len(head) + 32])!r}")
    first, second = int(fields[1]), int(fields[3])
    width, height = (second, first) if fields[0][1:] == b"Y" else (first, second)
    return _sized("Radiance HDR", width, height)


def _pam(data: bytes) -> ImageHeader:
    fields = {}
    for line in _text_header(data, b"ENDHDR", "ENDHDR line").splitlines()[1:]:
        words = line.split()
        if len(words) == 2 and words[1].isdigit() and len(words[1]) <= 10:
            fields[words[0]] = int(words[1])
    return _sized("PAM", fields.get(b"WIDTH", 0), fields.get(b"HEIGHT", 0))


def _pfm(data: bytes) -> ImageHeader:
    width, pos = _number(data, 2, comments=False)
    height, _ = _number(data, pos, comments=False)
    return _sized("PFM", width, height)
