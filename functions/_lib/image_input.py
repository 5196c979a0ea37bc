"""Read the ``image`` parameter of an AI function: bytes, a local path, a file:// / http(s):// / data: URL.

Deployed (the runtime sets READ_GRANTS_ENV and WRITE_GRANTS_ENV, empty when nothing was granted), a function takes
what the caller could hand it without this host's rights: bytes and data: URLs; a path (or file:// URL) only under
a folder granted at deploy (``read_paths``; ``output_path`` under ``write_paths``), refused with an error that says
nothing about the file; an http(s) URL only through the host's guarded fetcher (``host_call("model.fetch")``: the
function's network setting, private and loopback addresses refused for a sandbox, every redirect checked). Called
in-process (tests, benches: no runtime, no grants variable), the caller is the host itself and paths and URLs are
read directly.

Named ``image_input`` rather than ``imageio`` so that it never shadows the PyPI package of that name when a
bundle's root is on ``sys.path``.
"""

from __future__ import annotations

import base64
import os
import struct
import urllib.error
import urllib.parse
import urllib.request

import cv2
import numpy as np

MAX_IMAGE_BYTES = 32 << 20
#: set by the runtime of a deployed function (os.pathsep-separated folders; empty: none granted)
READ_GRANTS_ENV = "MINIFAAS_READ_PATHS"
WRITE_GRANTS_ENV = "MINIFAAS_WRITE_PATHS"
URL_TIMEOUT_S = 20.0
FORMATS = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp"}
JPEG_QUALITY = 90
#: checked from the header before decoding: 8K is 33 MP; a 1x20000 strip resized to a 224-pixel short side would
#: ask for 224 x 4.5 million pixels
MAX_PIXELS = 40_000_000
MAX_ASPECT_RATIO = 20.0
#: JPEG start-of-frame markers (baseline, progressive, lossless...): not DHT (C4), JPG (C8) or DAC (CC)
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _deployed() -> bool:
    return READ_GRANTS_ENV in os.environ


def _granted(path: str, env: str, *, param: str, option: str, instead: str) -> str:
    """``path`` resolved (symlinks too) when it lies under a folder of ``env``; a ValueError naming the rule, and
    nothing about the file (not whether it exists), otherwise."""
    real = os.path.realpath(path)
    for folder in (f for f in os.environ.get(env, "").split(os.pathsep) if f):
        root = os.path.realpath(folder)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return real
    raise ValueError(
        f"{param!r}: this function reads and writes host files only under the folders granted at deploy "
        f"({option}), and this path is not under one; {instead}"
    )


def _fetch_through_host(url: str) -> bytes:
    """An http(s) image fetched by the host's guarded fetcher (the model store's), then read from its cache."""
    import minifaas_sandbox

    try:
        path = minifaas_sandbox.host_call("model.fetch", {"url": url, "sha256": None})
    except RuntimeError as exc:
        raise ValueError(f"cannot fetch image from {url}: {exc}") from None
    with open(str(path), "rb") as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"image at {url} is larger than {MAX_IMAGE_BYTES} bytes")
    return data


def _fetch_url(url: str) -> bytes:
    if _deployed():
        return _fetch_through_host(url)
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as resp:
            data: bytes = resp.read(MAX_IMAGE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the error response's socket
        raise ValueError(f"cannot fetch image from {url}: {exc}") from exc
    except OSError as exc:
        raise ValueError(f"cannot fetch image from {url}: {exc}") from exc
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"image at {url} is larger than {MAX_IMAGE_BYTES} bytes")
    return data


def _read_path(path: str, *, param: str = "image") -> bytes:
    if _deployed():
        path = _granted(
            path, READ_GRANTS_ENV, param=param, option="read_paths", instead="pass the image's bytes or a data: URL"
        )
    try:
        size = os.path.getsize(path)
        if size > MAX_IMAGE_BYTES:
            raise ValueError(f"image file {path} is larger than {MAX_IMAGE_BYTES} bytes")
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read image file {path}: {exc}") from exc


def load_bytes(src: object, *, param: str = "image") -> bytes:
    """The encoded image bytes that ``src`` holds or names; ValueError for any other kind of value."""
    if isinstance(src, bytes | bytearray | memoryview):
        return bytes(src)
    if not isinstance(src, str) or not src:
        raise ValueError(f"{param!r} must be image bytes, a path or a URL, got {type(src).__name__}")
    if src.startswith("data:"):
        header, _, payload = src.partition(",")
        if not header.endswith(";base64"):
            raise ValueError(f"{param!r}: only base64 data: URLs are accepted")
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError as exc:
            raise ValueError(f"{param!r}: invalid base64 in data: URL ({exc})") from exc
    parsed = urllib.parse.urlparse(src)
    if parsed.scheme in ("http", "https"):
        return _fetch_url(src)
    if parsed.scheme == "file":
        return _read_path(urllib.request.url2pathname(parsed.path), param=param)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(f"{param!r}: unsupported URL scheme {parsed.scheme!r}")
    return _read_path(src, param=param)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, WebP, GIF or BMP header, without decoding; None for another format."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return int(w), int(h)
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(int(w)), abs(int(h))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 ":
            w, h = struct.unpack("<HH", data[26:30])
            return int(w) & 0x3FFF, int(h) & 0x3FFF
        if chunk == b"VP8L":
            b = data[21:25]
            return 1 + (((b[1] & 0x3F) << 8) | b[0]), 1 + (((b[3] & 0xF) << 10) | (b[2] << 2) | ((b[1] & 0xC0) >> 6))
        if chunk == b"VP8X":
            return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
        return None
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 <= len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:
                i += 1
                continue
            length = int.from_bytes(data[i + 2 : i + 4], "big")
            if marker in JPEG_SOF:
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return int(w), int(h)
            i += 2 + length
    return None


def check_size(data: bytes, *, param: str = "image") -> None:
    """Refuse, before decoding, an image whose header declares too many pixels or too thin a shape."""
    size = image_size(data)
    if size is None:
        raise ValueError(f"{param!r} is not a decodable image ({len(data)} bytes): not PNG, JPEG, WebP, GIF or BMP")
    w, h = size
    if w <= 0 or h <= 0:
        raise ValueError(f"{param!r}: the image header declares {w}x{h} pixels")
    if w * h > MAX_PIXELS:
        raise ValueError(f"{param!r}: {w}x{h} is over the {MAX_PIXELS} pixel limit")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ValueError(f"{param!r}: {w}x{h} is thinner than the 1:{MAX_ASPECT_RATIO:g} aspect ratio limit")


def read_image(src: object, *, param: str = "image") -> np.ndarray:
    """Decode ``src`` into a BGR uint8 array; ValueError when it cannot be read or is not an image."""
    data = load_bytes(src, param=param)
    check_size(data, param=param)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ValueError(f"{param!r} is not a decodable image ({len(data)} bytes)")
    return image


def encode(image: np.ndarray, fmt: str = "png") -> bytes:
    """Encode a BGR image as ``fmt`` ("png", "jpeg"/"jpg" or "webp")."""
    ext = FORMATS.get(fmt.lower()) if isinstance(fmt, str) else None
    if ext is None:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, image, params)
    if not ok:
        raise ValueError(f"cannot encode image as {fmt}")
    return buf.tobytes()


def write_output(image: np.ndarray, output_path: str, fmt: str | None = None) -> str:
    """Write ``image`` to ``output_path`` atomically; the format comes from ``fmt`` or the file extension."""
    if fmt is None:
        fmt = os.path.splitext(output_path)[1].lstrip(".") or "png"
    if _deployed():
        output_path = _granted(
            output_path,
            WRITE_GRANTS_ENV,
            param="output_path",
            option="write_paths",
            instead="leave output_path out to get the image's bytes back",
        )
    data = encode(image, fmt)
    directory = os.path.dirname(os.path.abspath(output_path))
    tmp = os.path.join(directory, f".{os.path.basename(output_path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, output_path)
    except OSError as exc:
        raise ValueError(f"cannot write output_path {output_path}: {exc}") from exc
    return output_path


def output_fields(image: np.ndarray, args: dict, fmt: str) -> dict:
    """A function's image output: written to ``args["output_path"]`` when the caller gave one (the result then
    carries the path and ``crop: None``), else returned inline as ``crop`` bytes in ``fmt``."""
    output_path = args.get("output_path")
    if output_path:
        return {"output_path": write_output(image, output_path, args.get("format")), "crop": None}
    return {"crop": encode(image, fmt), "format": "jpeg" if fmt == "jpg" else fmt}
