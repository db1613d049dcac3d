"""Images in requests: `data:` URIs by default; remote http(s) URLs only for allowlisted
hosts, with a byte cap, a timeout, every redirect re-checked, and never to loopback,
private or link-local addresses unless the allowlist names the host; `file://` never.
Sizes are checked before anything is decoded (the header gives the pixel count, so a
decompression bomb is refused before it expands)."""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from PIL import Image

from polymodal.serve.errors import APIError

DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                      re.IGNORECASE)
IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp"}


@dataclass
class MediaLimits:
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 4
    allowed_hosts: set[str] = field(default_factory=set)  # remote image hosts; empty: none
    fetch_timeout: float = 5.0
    max_redirects: int = 3


def decode_image(url: str, limits: MediaLimits, param: str) -> Image.Image:
    """An `image_url.url` -> an RGB image, or an APIError naming what is wrong."""
    if url.startswith("data:"):
        data = _data_uri_bytes(url, limits, param)
    elif url.lower().startswith(("http://", "https://")):
        data = fetch_remote(url, limits, param)
    elif url.lower().startswith("file:"):
        raise APIError(400, "file:// image URLs are refused; send the image as a data: URI", param=param)
    else:
        raise APIError(400, "image_url.url must be a data: URI (data:image/png;base64,...)", param=param)
    return _open(data, limits, param)


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
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Exception:
        raise APIError(400, "the image cannot be read (not an image, or corrupt)", param=param) from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise APIError(400, f"image is {width}x{height} = {width * height} pixels; the limit is "
                            f"{limits.max_image_pixels}", param=param, code="image_too_large")
    try:
        image.load()  # decode now: a truncated file fails here
        return image.convert("RGB")
    except Exception:
        raise APIError(400, "the image is corrupt or truncated", param=param) from None


def _check_host(url: str, limits: MediaLimits, param: str) -> None:
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise APIError(400, "only http(s) image URLs can be fetched", param=param)
    if host not in limits.allowed_hosts:
        raise APIError(400, f"remote image host {host!r} is not allowed (the server's --allow-remote-host)",
                       param=param)
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)}
    except OSError:
        raise APIError(400, f"cannot resolve image host {host!r}", param=param) from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        inside = ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_reserved or ip.is_multicast
        # An inside address is reached only when the allowlist names that address itself,
        # so an allowed name cannot be pointed inward through DNS.
        if inside and str(ip) not in limits.allowed_hosts:
            raise APIError(400, f"image host {host!r} resolves to a non-public address", param=param)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # redirects are followed by hand, each one checked


def fetch_remote(url: str, limits: MediaLimits, param: str) -> bytes:
    if not limits.allowed_hosts:
        raise APIError(400, "remote image URLs are disabled on this server; send a data: URI", param=param)
    opener = urllib.request.build_opener(_NoRedirect)
    for _ in range(limits.max_redirects + 1):
        _check_host(url, limits, param)
        try:
            response = opener.open(urllib.request.Request(url, headers={"User-Agent": "polymodal"}),
                                   timeout=limits.fetch_timeout)
        except urllib.error.HTTPError as error:
            if error.code in (301, 302, 303, 307, 308) and error.headers.get("Location"):
                url = urllib.parse.urljoin(url, error.headers["Location"])
                continue
            raise APIError(400, f"fetching the image failed with HTTP {error.code}", param=param) from None
        except (urllib.error.URLError, TimeoutError, OSError):
            raise APIError(400, "fetching the image failed or timed out", param=param) from None
        with response:
            data = response.read(limits.max_image_bytes + 1)
        if len(data) > limits.max_image_bytes:
            raise APIError(413, f"image is over the {limits.max_image_bytes} byte limit", param=param)
        return data
    raise APIError(400, f"more than {limits.max_redirects} redirects fetching the image", param=param)
