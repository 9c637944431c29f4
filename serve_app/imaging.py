"""Image decoding for detection requests: bounded, by magic bytes, before any charge. No Ray.

* The format is sniffed from the first bytes (JPEG, PNG, WebP, BMP); Content-Type is ignored.
* Body size and pixel count are bounded; the pixel count is read from the header and checked
  BEFORE the pixels are allocated, so decompression bombs cost nothing.
* EXIF orientation is applied; the result is RGB uint8, shape (H, W, 3).
Every failure is an `ApiError` from the one error table (400 / 413 / 415).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import BmpImagePlugin, Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from serve_app.errors import ApiCode, ApiError

# The decoder is picked from the magic bytes and called directly: never `Image.open`, which
# tries every registered format and which ultralytics monkey-patches (it would try to install
# pi-heif on an unidentified image).
_DECODERS: dict[str, type[ImageFile.ImageFile]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
}
_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
)


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 16_384


@dataclass(frozen=True, slots=True)
class DecodedImage:
    pixels: np.ndarray  # RGB uint8, (H, W, 3), orientation applied
    format: str
    nbytes: int

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def sniff(data: bytes) -> str:
    """The container format by magic bytes, or 415."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _FORMATS:
        if data.startswith(magic):
            return fmt
    raise ApiError(ApiCode.UNSUPPORTED_MEDIA_TYPE, "image must be JPEG, PNG, WebP or BMP (detected by its bytes)")


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> DecodedImage:
    if len(data) > limits.max_bytes:
        raise ApiError(ApiCode.PAYLOAD_TOO_LARGE, f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    if not data:
        raise ApiError(ApiCode.INVALID_IMAGE, "empty image")
    fmt = sniff(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _DECODERS[fmt](io.BytesIO(data))  # reads the header only
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ApiError(ApiCode.INVALID_IMAGE, "image has no pixels")
            if w > limits.max_side or h > limits.max_side or w * h > limits.max_pixels:
                raise ApiError(
                    ApiCode.IMAGE_TOO_LARGE,
                    f"image is {w}x{h}; the limit is {limits.max_pixels} pixels, {limits.max_side} a side",
                )
            img.load()
            pixels = _rgb8(ImageOps.exif_transpose(img))
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(ApiCode.IMAGE_TOO_LARGE, "image would decompress beyond the pixel limit") from None
    except Exception as exc:  # untrusted bytes: any decoder failure is the client's bad image
        raise ApiError(ApiCode.INVALID_IMAGE, f"corrupt or truncated {fmt} image ({type(exc).__name__})") from None
    return DecodedImage(pixels=pixels, format=fmt, nbytes=len(data))


def _rgb8(img: Image.Image) -> np.ndarray:
    """RGB uint8. 16-bit grayscale is scaled to 8 bits by its high byte, as OpenCV (and so
    ultralytics' `predict()` on the same file) reads it; PIL's own `convert("RGB")` clips it at
    255, which turns a 16-bit photo nearly white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(img, dtype=np.uint32)
        if img.mode == "I" and wide.max(initial=0) < 256:  # 8-bit values in a 32-bit container
            gray = wide.astype(np.uint8)
        else:
            gray = (np.minimum(wide, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"))
