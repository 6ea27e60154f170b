"""Safe image decoding: format allow-list, header-size check before decoding, 4xx on any bad input.

Order of checks for one upload:

1. non-empty, format sniffed by PIL from the magic bytes (never from the client's content type or
   file name) and restricted to :data:`ALLOWED_FORMATS`;
2. ``width * height`` read from the header and compared with ``max_image_pixels`` *before* any
   pixel is decoded (a 30000x30000 PNG of a few hundred KB is refused here);
3. full decode with ``PIL.Image.MAX_IMAGE_PIXELS`` set to the same limit as a second line of
   defence, truncated files refused (``LOAD_TRUNCATED_IMAGES`` stays False);
4. decoding through :func:`serving.runtime.preprocess.prepare_image`, the same path as
   ``Bundle.decode``: a large JPEG decodes at reduced scale (DCT scaling) when the model's preprocessing
   config is given, then one RGB conversion for every mode (palette, alpha, greyscale, CMYK, 16-bit
   scaled to 8 bits); animated images use their first frame.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import warnings

from PIL import Image, ImageFile

from serving.errors import ServeError
from serving.runtime.preprocess import PreprocessConfig, prepare_image

_logger = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.ASCII)


def configure_pil(max_image_pixels: int) -> None:
    """Set PIL's process-wide decompression-bomb guard to our pixel limit (a second line of defence)."""
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    # Sizes between the limit and twice the limit only warn in PIL; we refuse them ourselves
    # (explicit header check), so the warning is noise. warnings.catch_warnings is not thread-safe.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def invalid_image(message: str, index: int) -> ServeError:
    """The 400 answered for an upload that is not a decodable image."""
    return ServeError(400, "invalid_image", f"image {index}: {message}", limit="image_format")


def decode_base64(value: str, index: int, max_bytes: int) -> bytes:
    """Decode one base64 image string (plain or ``data:image/...;base64,`` URL), strictly."""
    if not isinstance(value, str) or not value:
        raise invalid_image("empty base64 string", index)
    match = _DATA_URL.match(value)
    if match:
        value = value[match.end() :]
    if len(value) > max_bytes * 4 // 3 + 4:
        raise ServeError(413, "image_too_large", f"image {index}: base64 data too large", limit="body_bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid_image(f"not valid base64 ({exc})", index) from None
    return data


def decode_image(
    data: bytes, index: int, max_image_pixels: int, preprocess: PreprocessConfig | None = None
) -> Image.Image:
    """Decode one uploaded image into a loaded RGB ``PIL.Image``; raise :class:`ServeError` (4xx) otherwise.

    With ``preprocess`` (the bundle's), a JPEG much larger than the model input decodes at reduced scale.
    """
    if not data:
        raise invalid_image("empty file (0 bytes)", index)
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # reads the header only
    except Image.DecompressionBombError as exc:  # over twice the limit: PIL refuses in open()
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_many_pixels(index, int(found.group(1)) if found else None, max_image_pixels) from None
    except (OSError, ValueError, SyntaxError, TypeError) as exc:
        # UnidentifiedImageError is an OSError: not an image, or a format outside the allow-list.
        raise invalid_image(
            f"not a supported image ({', '.join(ALLOWED_FORMATS)}): {_short(exc)}", index
        ) from None
    # no `with image:`: closing would also free the pixels of an RGB image returned as is
    width, height = image.size
    if width <= 0 or height <= 0:
        raise invalid_image("zero-sized image", index)
    if width * height > max_image_pixels:
        raise _too_many_pixels(index, (width, height), max_image_pixels)
    try:
        rgb = prepare_image(image, preprocess)  # first frame of animated images
    except Image.DecompressionBombError:
        raise _too_many_pixels(index, (width, height), max_image_pixels) from None
    except MemoryError:
        _logger.warning("image %d: out of memory while decoding %dx%d", index, width, height)
        raise ServeError(
            413, "image_too_large", f"image {index}: too large to decode", limit="image_pixels"
        ) from None
    except (OSError, ValueError, SyntaxError, TypeError, EOFError, IndexError) as exc:
        raise invalid_image(f"corrupt or truncated {image.format} data: {_short(exc)}", index) from None
    return rgb


def _too_many_pixels(index: int, size: tuple[int, int] | int | None, limit: int) -> ServeError:
    if isinstance(size, tuple):
        dims = f"{size[0]}x{size[1]} "
    elif size is not None:
        dims = f"{size} pixels "
    else:
        dims = ""
    return ServeError(
        413,
        "image_too_large",
        f"image {index}: {dims}exceeds the limit of {limit} pixels",
        limit="image_pixels",
    )


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
