"""``image_url`` parts to PIL images: ``data:`` URLs decoded in memory, local files only when the server allows them.

Nothing is fetched: an ``http(s)://`` URL is refused (a server that fetched URLs for its clients could be made to
reach hosts only it can see). Decoded images follow ``mmgpt.models.image_processor``'s rules (EXIF orientation,
transparency on white, 16-bit scaled, empty or odd pixels refused) and its formats (``IMAGE_FORMATS``: never one that
PIL hands to another program, such as EPS to Ghostscript), and the server's pixel limit is checked from the header,
before anything is decoded, so a small file that expands to gigabytes (an image bomb) costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from mmgpt.models.image_processor import IMAGE_FORMATS, UNSUPPORTED_FORMAT, BadImageError, open_image, to_rgb

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096

_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


class ImageURLError(ValueError):
    """An ``image_url`` the server will not use; the message says why."""


def load_image_url(url: str, *, allow_local_files: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """Turn an OpenAI ``image_url.url`` into an RGB PIL image.

    Args:
        url: ``data:image/...;base64,...``; or, with ``allow_local_files``, a ``file://`` URL or a path.
        allow_local_files: read files of the server's machine (``mmgpt serve --allow-local-files``).
        max_pixels: the most pixels (width x height) an image may have.

    Raises:
        ImageURLError: a URL the server does not read (http, https, other schemes; files without the flag),
            base64 that does not decode, bytes that are not an image, or an image over the limit.
    """
    if url[:5].lower() == "data:":  # URL schemes are case-insensitive (RFC 3986): DATA: is data: too
        return _decode(_data_url_bytes(url), max_pixels, "the data URL")
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        raise ImageURLError(
            f"{scheme}:// image URLs are not fetched by mmgpt serve; send the image inline as a data URL "
            "(data:image/png;base64,...)"
        )
    # A Windows drive letter ("C:\\img.png") parses as a one-letter scheme: it is a path.
    if scheme not in ("", "file") and len(scheme) > 1:
        raise ImageURLError(f"unsupported image URL scheme {scheme!r}; send a data:image/...;base64 URL")
    if not allow_local_files:
        raise ImageURLError(
            "local image files are not read unless the server runs with --allow-local-files; send the image as a "
            "data:image/...;base64 URL"
        )
    path = Path(unquote(urlparse(url).path)) if scheme == "file" else Path(url)
    # A regular file only: opening a FIFO or a device (/dev/zero) would block a server thread on it, or read forever.
    # What is wrong with anything else, open_image below says.
    if path.is_file():
        try:
            # The size check first, as for data URLs (open reads the header only).
            with Image.open(path, formats=IMAGE_FORMATS) as header:
                _check_pixels(header, max_pixels, f"image file {path}")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            pass
    try:
        return open_image(path)
    except BadImageError as e:  # ImageNotFoundError included
        raise ImageURLError(str(e)) from None


def _data_url_bytes(url: str) -> bytes:
    m = _DATA_URL.match(url)
    if m is None:
        raise ImageURLError(f"malformed data URL ({url[:40]}...); expected data:image/png;base64,...")
    media_type = (m["type"] or "").lower()
    if media_type and not media_type.startswith("image/"):
        raise ImageURLError(f"the data URL holds {media_type}, not an image (expected data:image/...;base64,...)")
    if not m["b64"]:
        raise ImageURLError("the data URL is not base64 encoded; expected data:image/...;base64,...")
    payload = url[m.end() :]
    try:
        # validate=True: characters outside the base64 alphabet are an error, not silently skipped.
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageURLError(f"the data URL's base64 does not decode: {e}") from None


def _check_pixels(image: Image.Image, max_pixels: int, where: str) -> None:
    w, h = image.size
    if w * h > max_pixels:
        raise ImageURLError(
            f"{where} is {w}x{h} = {w * h:,} pixels, more than this server's limit of {max_pixels:,}; send a "
            f"smaller image"
        )


def _decode(data: bytes, max_pixels: int, where: str) -> Image.Image:
    if not data:
        raise ImageURLError(f"{where} holds no bytes")
    try:
        # PIL warns (or raises, over twice its limit) about large images; the server's own limit, checked from the
        # header, is what refuses them here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        with image:
            _check_pixels(image, max_pixels, where)
            image.load()  # decode now: a truncated file fails here
            return to_rgb(image, where)
    except ImageURLError:
        raise
    except BadImageError as e:
        raise ImageURLError(str(e)) from None
    except Image.DecompressionBombError as e:
        raise ImageURLError(f"{where} is too large to decode safely: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageURLError(f"{where} is {UNSUPPORTED_FORMAT} ({len(data):,} bytes)") from None
    # PIL's decoders fail with any of these on a corrupt file.
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageURLError(f"cannot read the image in {where}: {e}") from None
