"""Image decoding: formats by magic bytes, bounds before allocation, EXIF orientation, one error table."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ledger.core.codes import Code
from serve_app.errors import ERRORS, ApiCode, ApiError
from serve_app.imaging import ImageLimits, decode_image, sniff


def encode(fmt: str, w: int = 40, h: int = 30, **kw: object) -> bytes:
    img = Image.new("RGB", (w, h), (200, 30, 30))
    img.putpixel((0, 0), (0, 255, 0))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with a tiny (invalid) body: a bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", 0)
        + b"IEND"
        + struct.pack(">I", zlib.crc32(b"IEND"))
    )


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_given_each_format_when_decoded_then_rgb_pixels_with_its_size(fmt: str) -> None:
    img = decode_image(encode(fmt))
    assert (img.width, img.height, img.format, img.pixels.dtype, img.pixels.shape[2]) == (40, 30, fmt, np.uint8, 3)


def test_given_a_png_labelled_as_jpeg_then_the_bytes_decide() -> None:
    assert sniff(encode("PNG")) == "PNG"


@pytest.mark.parametrize("data", [b"GIF89a" + b"\x00" * 40, b"%PDF-1.7", b"\x00\x01\x02", b"hello world"])
def test_given_wrong_magic_then_415(data: bytes) -> None:
    with pytest.raises(ApiError) as e:
        decode_image(data)
    assert (e.value.code, e.value.status) == ("unsupported_media_type", 415)


def test_given_zero_bytes_then_invalid_image() -> None:
    with pytest.raises(ApiError) as e:
        decode_image(b"")
    assert (e.value.code, e.value.status) == ("invalid_image", 400)


@pytest.mark.parametrize("cut", [20, 200, -10])
def test_given_truncated_or_corrupt_jpeg_then_invalid_image(cut: int) -> None:
    data = encode("JPEG", 200, 200)
    with pytest.raises(ApiError) as e:
        decode_image(data[:cut])
    assert e.value.code == "invalid_image"


def test_given_a_corrupted_jpeg_body_then_invalid_image() -> None:
    data = bytearray(encode("PNG", 64, 64))
    data[60:80] = b"\xff" * 20
    with pytest.raises(ApiError) as e:
        decode_image(bytes(data))
    assert e.value.code == "invalid_image"


def test_given_a_50k_by_50k_png_header_then_refused_before_allocation() -> None:
    with pytest.raises(ApiError) as e:
        decode_image(png_header_only(50_000, 50_000))
    assert (e.value.code, e.value.status) == ("image_too_large", 413)


def test_given_a_body_over_the_limit_then_payload_too_large() -> None:
    with pytest.raises(ApiError) as e:
        decode_image(encode("PNG"), ImageLimits(max_bytes=100))
    assert (e.value.code, e.value.status) == ("payload_too_large", 413)


def test_given_exif_orientation_6_then_the_image_is_rotated_upright() -> None:
    img = Image.new("RGB", (40, 20), (10, 10, 10))
    img.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=100)
    out = decode_image(buf.getvalue())
    assert (out.width, out.height) == (20, 40)
    assert out.pixels[0, -1].mean() > 200  # the top-left pixel moved to the top-right


def test_given_the_error_table_then_every_code_has_a_4xx_or_5xx_and_unknown_codes_are_refused() -> None:
    assert all(400 <= s < 600 for s in ERRORS.values())
    with pytest.raises(ValueError):
        ApiError("teapot", "no")  # type: ignore[arg-type]


def test_given_every_ledger_denial_code_then_api_code_extends_it_and_the_table_has_a_row() -> None:
    denials = [c for c in Code if c not in (Code.OK, Code.REPLAY)]
    for c in denials:
        assert ApiCode.of(c) == c.value and ApiCode.of(c).name == c.name
        assert ApiError.from_code(c, "").status == ERRORS[ApiCode.of(c)]
    assert set(ERRORS) == set(ApiCode)
    with pytest.raises(ValueError):
        ApiCode.of(Code.OK)  # an admitting verdict is not an error


def test_given_a_16_bit_grayscale_png_then_pixels_equal_what_opencv_reads() -> None:
    """ultralytics' predict() reads files with OpenCV, which keeps the high byte of 16-bit pixels;
    PIL's convert("RGB") would clip them at 255 (a nearly white image, different detections)."""
    import cv2

    wide = np.linspace(0, 65535, 96 * 64).reshape(64, 96).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    data = buf.getvalue()
    ours = decode_image(data).pixels
    ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == (64, 96, 3)
    assert np.array_equal(ours, ref)
    assert 100 < ours.mean() < 160  # not clipped to white
