"""Images on the wire: base64 data URLs (and, when allowed, local paths) in; PNG base64 out.

Remote (http/https) URLs are never fetched: a server that downloads whatever a request names can be
turned against its own network, and it would block a worker on someone else's host. Local paths are
refused unless `--allow-local-files`, because they read the server's disk. A data URL's header is
checked (format, pixel count) here; decoding is the library's (`Pipeline.image`, as for any image).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image

from mmgen.serve.protocol import APIError, ImageRef

DATA_PREFIX = "data:"


def decode(ref: ImageRef, allow_local_files: bool, max_pixels: int) -> bytes | Path:
    """An image part's URL -> its encoded bytes (data URL, header checked) or a path (local file, when
    allowed); raises APIError. `Pipeline.image` decodes either (EXIF, draft/reduce, MAX_PIXELS)."""
    url = ref.url.strip()
    if url.startswith(DATA_PREFIX):
        return _data_url(url, ref.param, max_pixels)
    if url.startswith(("http://", "https://")):
        raise APIError(400, f"{ref.param}: remote image URLs are not fetched by this server; send the image as a "
                            "base64 data URL (data:image/png;base64,...)", ref.param, "invalid_image_url")
    if not allow_local_files:
        raise APIError(400, f"{ref.param}: {url[:60]!r} is neither a data URL nor allowed: local files are refused "
                            "unless the server runs with --allow-local-files; send a base64 data URL",
                       ref.param, "invalid_image_url")
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise APIError(400, f"{ref.param}: no such file on the server: {str(path)[:120]}", ref.param,
                       "invalid_image_url")
    return path


def _data_url(url: str, param: str, max_pixels: int) -> bytes:
    header, comma, data = url.partition(",")
    if not comma or not header.endswith(";base64") or not header[len(DATA_PREFIX):].startswith("image/"):
        raise APIError(400, f"{param}: a data URL must look like data:image/png;base64,<data>, got "
                            f"{url[:40]!r}...", param, "invalid_image_url")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data URL's base64 payload is not valid base64", param,
                       "invalid_image_url") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:  # the header only: decoding is the library's (`load_image`)
            width, height = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise APIError(400, f"{param}: the data URL holds no readable image ({type(e).__name__}: {e})"[:300], param,
                       "invalid_image_url") from None
    if width * height > max_pixels:
        raise APIError(400, f"{param}: the image is {width}x{height}, over the server's limit of {max_pixels} "
                            "pixels (--max-image-pixels)", param, "image_too_large")
    return raw


def png_base64(image: Image.Image, scale: int = 1) -> str:
    """A PIL image, upscaled `scale`× with nearest neighbours, as base64 PNG bytes."""
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def png_data_url(image: Image.Image, scale: int = 1) -> str:
    return "data:image/png;base64," + png_base64(image, scale)
