"""Media in requests. Audio: `input_audio` parts ({"data": BASE64, "format": "wav"}, as
OpenAI's), checked by `decode_audio` with the limits and errors of images. Series:
`input_series` parts ({"data": [T] or [T][C] numbers, time first as in a CSV}), checked by
`decode_series` (steps, channels, finite numbers, rows of one length). Images: `data:` URIs by default; remote http(s) URLs only for allowlisted
hosts and ports (`host` allows 80 and 443, `host:port` one port), with a byte cap, a
timeout, every redirect re-checked, the connection made to the address that was checked
(no second DNS lookup to rebind), and never to loopback, private or link-local addresses
unless the allowlist names the address; `file://` never.
Decoding goes through `polymodal.processing.images.image_from_bytes`: only accepted formats,
sizes checked before anything is decoded (the header gives the pixel count, so a
decompression bomb is refused before it expands)."""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import math
import re
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from polymodal.errors import UserError
from polymodal.processing.audio import read_wav
from polymodal.processing.images import ImageTooLarge, image_from_bytes
from polymodal.serve.errors import APIError

DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                      re.IGNORECASE)
IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp"}


@dataclass
class MediaLimits:
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 4
    max_audio_bytes: int = 10 * 1024 * 1024
    max_audio: int = 4  # clips per request
    # Series: steps and channels of one (the encoder's own length and channels may be less),
    # and series per request.
    max_series_steps: int = 4096
    max_series_channels: int = 64
    max_series: int = 4
    # Remote image hosts: "host" (ports 80 and 443) or "host:port"; empty: none.
    allowed_hosts: set[str] = field(default_factory=set)
    fetch_timeout: float = 5.0
    max_redirects: int = 3


def decode_image(url: str, limits: MediaLimits, param: str) -> Image.Image:
    """An `image_url.url` -> an RGB image, or an APIError naming what is wrong."""
    if url[:5].lower() == "data:":  # URI schemes are case-insensitive (RFC 3986)
        data = _data_uri_bytes(url, limits, param)
    elif url.lower().startswith(("http://", "https://")):
        data = fetch_remote(url, limits, param)
    elif url.lower().startswith("file:"):
        raise APIError(400, "file:// image URLs are refused; send the image as a data: URI", param=param)
    else:
        raise APIError(400, "image_url.url must be a data: URI (data:image/png;base64,...)", param=param)
    return _open(data, limits, param)


AUDIO_FORMATS = {"wav"}


def decode_audio(data: str, audio_format: str, limits: MediaLimits, param: str) -> bytes:
    """An `input_audio` part's base64 `data` -> the WAV file's bytes, checked to decode;
    an APIError naming the part otherwise (415 for a format we do not read, 413 over the
    byte limit, 400 for bad base64 or a file that is not 16-bit PCM WAV)."""
    if audio_format.lower() not in AUDIO_FORMATS:
        raise APIError(415, f"unsupported audio format {audio_format!r}; send one of: {', '.join(sorted(AUDIO_FORMATS))}",
                       param=f"{param}.format", code="unsupported_media_type")
    if len(data) * 3 // 4 > limits.max_audio_bytes:
        raise APIError(413, f"audio is over the {limits.max_audio_bytes} byte limit", param=f"{param}.data")
    try:
        wav = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "invalid base64 in input_audio.data", param=f"{param}.data") from None
    try:
        read_wav(wav)
    except UserError as error:
        raise APIError(400, str(error), param=f"{param}.data") from None
    return wav


def decode_series(data: list, limits: MediaLimits, param: str) -> np.ndarray:
    """An `input_series` part's `data` -> float64 [T, C]: [T] numbers (one channel) or [T][C]
    (time first, as in a CSV). An APIError (400) naming `param` otherwise: empty, more than
    `limits.max_series_steps` steps or `max_series_channels` channels, rows of different
    lengths, a number beside a row, or a value that is not a finite number (null, a string,
    a boolean, NaN or Infinity: Python's JSON reader takes those two literals)."""
    if not data:
        raise APIError(400, "input_series.data is empty; send [T] or [T][C] numbers", param=param)
    if len(data) > limits.max_series_steps:
        raise APIError(400, f"series of {len(data)} steps is over this server's limit of "
                            f"{limits.max_series_steps}", param=param, code="series_too_long")
    rows = isinstance(data[0], list)
    width = len(data[0]) if rows else 1
    if not width:
        raise APIError(400, "step 0 is an empty row; send [T] or [T][C] numbers", param=param)
    if width > limits.max_series_channels:
        raise APIError(400, f"series of {width} channels is over this server's limit of "
                            f"{limits.max_series_channels}", param=param, code="too_many_channels")
    for step, row in enumerate(data):
        if isinstance(row, list) != rows:
            first = f"a row of {width} values" if rows else "a number"
            raise APIError(400, f"step {step} is {_json_kind(row)} but step 0 is {first}; send [T] "
                                f"or [T][C] numbers", param=param)
        values = row if rows else [row]
        if len(values) != width:
            raise APIError(400, f"step {step} has {len(values)} values, step 0 has {width}; every "
                                f"step needs one value per channel", param=param)
        for channel, value in enumerate(values):
            if not _finite_number(value):
                raise APIError(400, f"step {step} of channel {channel} is {_json_kind(value)}; every "
                                    f"value must be a finite number", param=param)
    return np.asarray(data, dtype=np.float64).reshape(len(data), width)


def _finite_number(value) -> bool:
    """A JSON number that float64 holds finitely (not a boolean, NaN, Infinity or 1e999)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float64
        return False


def _json_kind(value) -> str:
    """How a JSON value is named in a message."""
    if isinstance(value, int | float) and not isinstance(value, bool) and not _finite_number(value):
        return "NaN" if isinstance(value, float) and math.isnan(value) else "infinite (or beyond float64)"
    if value is None:
        return "null"
    kinds = {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}
    return kinds.get(type(value), "a number")


def _data_uri_bytes(url: str, limits: MediaLimits, param: str) -> bytes:
    match = DATA_URI.match(url)
    if not match:
        raise APIError(400, "malformed data: URI", param=param)
    mime = (match.group("mime") or "").lower()
    if mime not in IMAGE_TYPES:
        raise APIError(415, f"unsupported media type {mime or 'none'!r}; send one of: "
                            f"{', '.join(sorted(IMAGE_TYPES))}", param=param, code="unsupported_media_type")
    if not match.group("b64"):
        raise APIError(400, "image data: URIs must be base64 (;base64,)", param=param)
    payload = url[match.end():]
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise APIError(413, f"image is over the {limits.max_image_bytes} byte limit", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "invalid base64 in image data: URI", param=param) from None


def _open(data: bytes, limits: MediaLimits, param: str) -> Image.Image:
    """Decode through the one image decoder (accepted formats only, size checked before
    decoding, transparency on white); its refusals become 400s naming the content part."""
    try:
        return image_from_bytes(data, param, limits.max_image_pixels)
    except ImageTooLarge as error:
        raise APIError(400, str(error), param=param, code="image_too_large") from None
    except UserError as error:
        raise APIError(400, str(error), param=param) from None


def allowed_port(limits: MediaLimits, host: str, port: int) -> bool:
    """Whether the allowlist lets `host` be fetched on `port`: an entry `host:port` (or
    `[v6]:port`) names one port; a bare `host` allows only 80 and 443."""
    bracketed = f"[{host}]" if ":" in host else host
    if f"{bracketed}:{port}" in limits.allowed_hosts:
        return True
    return port in (80, 443) and (host in limits.allowed_hosts or bracketed in limits.allowed_hosts)


def _resolve_checked(url: str, limits: MediaLimits, param: str) -> tuple[str, int, str]:
    """(host, port, address): the URL's host allowed on its port, resolved once; the address
    is the one the fetch connects to, so a DNS answer that changes afterwards (rebinding)
    cannot send it elsewhere."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise APIError(400, "only http(s) image URLs can be fetched", param=param)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise APIError(400, "the image URL has an invalid port", param=param) from None
    if not allowed_port(limits, host, port):
        raise APIError(400, f"remote image host {host!r} is not allowed on port {port} (the server's "
                            "--allow-remote-host; host:port for a port other than 80/443)", param=param)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise APIError(400, f"cannot resolve image host {host!r}", param=param) from None
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise APIError(400, f"cannot resolve image host {host!r}", param=param)
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        inside = ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_reserved or ip.is_multicast
        # An inside address is reached only when the allowlist names that address itself,
        # so an allowed name cannot be pointed inward through DNS.
        if inside and not allowed_port(limits, str(ip), port):
            raise APIError(400, f"image host {host!r} resolves to a non-public address", param=param)
    return host, port, addresses[0]


def _connection(scheme: str, host: str, port: int, address: str, timeout: float):
    """An HTTP(S) connection to `address` that names `host` (Host header, TLS SNI and
    certificate check), never resolving `host` again."""
    if scheme == "https":
        connection = http.client.HTTPSConnection(host, port, timeout=timeout,
                                                 context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)

    def pinned(_address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
        return socket.create_connection((address, port), timeout, source_address)

    connection._create_connection = pinned  # http.client's hook for opening the socket
    return connection


def fetch_remote(url: str, limits: MediaLimits, param: str) -> bytes:
    """The bytes at an allowlisted http(s) URL, each redirect re-checked, within the byte
    cap and `limits.fetch_timeout` seconds in all; an APIError naming `param` otherwise."""
    if not limits.allowed_hosts:
        raise APIError(400, "remote image URLs are disabled on this server; send a data: URI", param=param)
    deadline = time.monotonic() + limits.fetch_timeout
    for _ in range(limits.max_redirects + 1):
        host, port, address = _resolve_checked(url, limits, param)
        parts = urllib.parse.urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection = _connection(parts.scheme, host, port, address, limits.fetch_timeout)
        try:
            connection.request("GET", target, headers={"User-Agent": "polymodal", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise APIError(400, f"fetching the image failed with HTTP {response.status}", param=param)
            data = _read_capped(response, limits, deadline, param)
        except (OSError, http.client.HTTPException):
            raise APIError(400, "fetching the image failed or timed out", param=param) from None
        finally:
            connection.close()
        return data
    raise APIError(400, f"more than {limits.max_redirects} redirects fetching the image", param=param)


def _read_capped(response, limits: MediaLimits, deadline: float, param: str) -> bytes:
    """The body, read in pieces so that neither its size nor a slow sender goes unbounded."""
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise APIError(400, f"fetching the image took over {limits.fetch_timeout:g} seconds",
                           param=param)
        chunk = response.read1(min(65536, limits.max_image_bytes + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limits.max_image_bytes:
            raise APIError(413, f"image is over the {limits.max_image_bytes} byte limit", param=param)
