"""Fetching and decoding item images in CPU tasks: local paths, file://, s3:// and http(s):// URLs, or inline bytes.

A catalog is untrusted input, so every reference is confined (`ImagePolicy`): local paths and file:// URLs must
resolve, after symlinks, inside the allowed roots; URLs are http(s) only, and every host they reach, redirect hops
included, is checked by the address it resolves to, which is then the address connected to (a second DNS answer
cannot swap it). Link-local and cloud-metadata addresses are always refused, private, loopback and reserved ones
unless allowed. Downloads have a byte cap and one deadline for the whole fetch; images a pixel cap read from the
header before decoding. A refusal names the rule, never whether a file outside the roots exists.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io
import ipaddress
import json
import math
import os
import posixpath
import socket
import ssl
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from urllib.parse import quote, unquote, urljoin, urlsplit

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile

# A truncated file must fail loudly, not decode as a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# PIL warns between its limit and twice it; `decode` refuses everything over the limit itself, with a reason.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

# Refused even with --allow-private-hosts: the link-local ranges hold the cloud metadata services (credentials).
ALWAYS_REFUSED = tuple(map(ipaddress.ip_network, ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")))
NAT64 = ipaddress.ip_network("64:ff9b::/96")
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
URL_SAFE = "!#$%&'()*+,/:;=?@[]~"  # RFC 3986 reserved characters and "%": left as they are in a request path
PRIVATE_RULE = "the private-address rule (private, loopback and reserved addresses need --allow-private-hosts)"
OUTSIDE_ROOTS = ("refused by the image-root rule: the path is outside the allowed roots "
                 "(the catalog's folder, --image-root)")


class ImageFetchError(Exception):
    """An image that cannot be used. `transient`: it may succeed later (timeout, connection, HTTP 5xx/429);
    `by_rule`: a rule of the policy that a flag changes refused it (the roots, the private-address rule, the byte
    and pixel caps), so it may be used once that flag changes."""

    def __init__(self, reason: str, transient: bool = False, by_rule: bool = False):
        super().__init__(reason)
        self.transient, self.by_rule = transient, by_rule


@dataclass(frozen=True)
class ImagePolicy:
    """What image references may reach and how much they may cost. The first five fields are flags of
    flows/encode_items.py; a bad value raises a ValueError naming its flag, on the driver, before Ray starts."""

    roots: tuple[str, ...] = ()  # local paths must resolve inside one of these (realpaths)
    allow_private_hosts: bool = False
    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    deadline_s: float = 30.0  # for one image's whole fetch: attempts, redirects and every read
    retries: int = 2  # in-run attempts after a transient failure, within the deadline
    backoff_s: float = 0.5
    max_redirects: int = 5
    fetch_threads: int = 16  # per loader batch
    per_host: int = 4  # concurrent fetches from one host within a loader batch
    # settings of the object store an s3:// root is on, from the driver's environment (objectstore.storage_options)
    storage_options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for flag, value in (("--max-image-bytes", self.max_bytes), ("--max-image-pixels", self.max_pixels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be a positive whole number, got {value!r}")
        deadline = self.deadline_s
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline < math.inf:
            raise ValueError(f"--image-deadline-s must be a positive number of seconds, got {deadline!r}")
        roots = []
        for root in self.roots:
            if "://" in str(root):  # an object-store prefix (an s3:// catalog's): matched as written
                roots.append(str(root).rstrip("/"))
                continue
            if not os.path.isdir(root):
                raise ValueError(f"--image-root {str(root)!r} is not a directory")
            roots.append(os.path.realpath(root))
        object.__setattr__(self, "roots", tuple(roots))

    def with_root(self, root, storage_options: tuple[tuple[str, str], ...] = ()) -> ImagePolicy:
        """This policy with one more root (the catalog's folder or object-store prefix, with that store's
        settings); the same policy for None."""
        if root is None:
            return self
        return dataclasses.replace(self, roots=(*self.roots, str(root)),
                                   storage_options=storage_options or self.storage_options)

    def inside_roots(self, realpath: str) -> bool:
        """Whether a resolved local path, or a normalised object-store URI, lies inside one of the roots."""
        sep = "/" if "://" in realpath else os.sep
        return any(realpath == root or realpath.startswith(root.rstrip(sep) + sep) for root in self.roots)

    def address_refusal(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """The rule that refuses connecting to `address`, or None. IPv4 inside IPv6 (mapped, 6to4, NAT64) counts
        as the IPv4 address it carries."""
        if address.version == 6:
            embedded = address.ipv4_mapped or address.sixtofour
            if embedded is None and address in NAT64:
                embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            address = embedded or address
        if any(address in network for network in ALWAYS_REFUSED):
            return "the link-local/metadata address rule (always refused)"
        if (not address.is_global or address.is_multicast) and not self.allow_private_hosts:
            return PRIVATE_RULE
        return None

    @property
    def rules_fingerprint(self) -> str:
        """A digest of what the flags decide of the rules that may refuse an image (roots, private hosts, caps):
        an image refused by a rule is tried again when it changes."""
        rules = [sorted(self.roots), self.allow_private_hosts, self.max_bytes, self.max_pixels]
        return hashlib.sha256(json.dumps(rules).encode()).hexdigest()[:16]


def fetch_bytes(ref: str, policy: ImagePolicy) -> bytes:
    """The raw bytes behind an image reference, within `policy`; ImageFetchError says why not."""
    parts = _split(ref)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_url(ref, policy)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ImageFetchError(f"refused by the scheme rule: a file:// URL naming host {parts.netloc!r}")
        return _read_local(unquote(parts.path), policy)
    if scheme == "s3":
        return _read_object(ref, policy)
    if scheme:
        raise ImageFetchError(f"refused by the scheme rule: {scheme}:// is not fetched "
                              f"(http, https, s3, file and paths are)")
    return _read_local(ref, policy)


def _split(url: str):
    try:
        return urlsplit(url)
    except ValueError as e:  # such as a bracketed host that is no IPv6 address
        raise ImageFetchError(f"not a valid URL: {e}") from None


def _read_local(path: str, policy: ImagePolicy) -> bytes:
    real = os.path.realpath(path)
    if not policy.inside_roots(real):  # decided before any stat or open: the reason is the same either way
        raise ImageFetchError(OUTSIDE_ROOTS, by_rule=True)
    try:
        with os.fdopen(os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as file:
            if os.fstat(file.fileno()).st_size > policy.max_bytes:
                raise _over_byte_cap(policy)
            data = file.read(policy.max_bytes + 1)
    except OSError as e:
        raise ImageFetchError(f"cannot read {path}: {e.strerror or e}") from e
    if len(data) > policy.max_bytes:  # it grew since the stat
        raise _over_byte_cap(policy)
    return data


def _read_object(uri: str, policy: ImagePolicy) -> bytes:
    """An s3:// image inside an object-store root (an s3:// catalog's prefix), with the store's credentials from
    the environment (featurestore.objectstore); a missing object is permanent, any other failure transient."""
    from featurestore import objectstore

    scheme, path = uri.split("://", 1)
    normalised = f"{scheme}://{posixpath.normpath(path)}"
    if not policy.inside_roots(normalised):
        raise ImageFetchError(OUTSIDE_ROOTS, by_rule=True)
    fs, fs_path = objectstore.filesystem(normalised, dict(policy.storage_options) or None)
    try:
        with fs.open_input_stream(fs_path) as stream:
            data = stream.read(policy.max_bytes + 1)
    except FileNotFoundError:
        raise ImageFetchError(f"no object at {normalised}") from None
    except OSError as e:
        raise ImageFetchError(f"cannot read {normalised}: {e}", transient=True) from None
    if len(data) > policy.max_bytes:
        raise _over_byte_cap(policy)
    return data


def _over_byte_cap(policy: ImagePolicy) -> ImageFetchError:
    return ImageFetchError(f"refused by the byte cap: larger than --max-image-bytes ({policy.max_bytes} bytes)",
                           by_rule=True)


def _fetch_url(url: str, policy: ImagePolicy) -> bytes:
    """GET with in-run retries of transient failures, all within one deadline."""
    deadline = time.monotonic() + policy.deadline_s
    attempt = 0
    while True:
        try:
            return _get(url, policy, deadline)
        except ImageFetchError as e:
            pause = policy.backoff_s * 2**attempt
            if not e.transient:
                raise
            if attempt == policy.retries or time.monotonic() + pause >= deadline:
                raise ImageFetchError(f"{e} after {attempt + 1} attempt(s)", transient=True) from None
        time.sleep(pause)
        attempt += 1


def _get(url: str, policy: ImagePolicy, deadline: float) -> bytes:
    """One attempt: follow at most max_redirects redirects, vetting every hop before connecting to it."""
    for _ in range(policy.max_redirects + 1):
        with _Exchange(url, policy, deadline) as exchange:
            response = exchange.response
            if response.status in REDIRECTS and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                may_heal = response.status >= 500 or response.status == 429  # a 404 will not heal by retrying
                raise ImageFetchError(f"HTTP {response.status}", transient=may_heal)
            return exchange.body()
    raise ImageFetchError(f"refused by the redirect limit: more than {policy.max_redirects} redirects")


class _Exchange:
    """One request to a vetted address, cut off when the fetch's deadline passes: a watchdog shuts the socket
    down, so a server trickling bytes (each read well within any per-read timeout) is stopped too."""

    def __init__(self, url: str, policy: ImagePolicy, deadline: float):
        self.policy, self.deadline = policy, deadline
        self.cut = threading.Event()
        parts = _split(url)
        try:
            https, host, port = parts.scheme.lower() == "https", parts.hostname, parts.port
        except ValueError as e:  # a port out of range
            raise ImageFetchError(f"not a valid URL: {e}") from None
        if parts.scheme.lower() not in ("http", "https"):
            raise ImageFetchError(f"refused by the scheme rule: a redirect to {parts.scheme}:// is not followed")
        if not host:
            raise ImageFetchError("not a valid URL: it names no host")
        self.host, self.port, self.https = host, port or (443 if https else 80), https
        # Spaces and non-ASCII characters percent-encoded (http.client refuses them); escapes already there kept.
        self.path = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=URL_SAFE)

    def __enter__(self):
        address = self._vetted_address()
        connection_class = _PinnedHTTPS if self.https else _PinnedHTTP
        self.connection = connection_class(self.host, self.port, address, timeout=self._remaining())
        self.watchdog = threading.Timer(self._remaining(), self._cut)
        self.watchdog.daemon = True
        self.watchdog.start()
        self.response = None
        try:
            self.response = self._guarded(self._request)
        except ImageFetchError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        self.watchdog.cancel()
        if self.response is not None:  # it holds the socket once getresponse() has let go of it
            self.response.close()
        self.connection.close()

    def _request(self) -> http.client.HTTPResponse:
        self.connection.request("GET", self.path, headers={"User-Agent": "mmrec-image-fetch", "Accept": "image/*"})
        return self.connection.getresponse()

    def body(self) -> bytes:
        response, cap = self.response, self.policy.max_bytes
        content_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if content_type and not content_type.startswith("image/") and content_type != "application/octet-stream":
            raise ImageFetchError(f"refused by the Content-Type rule: {content_type} is not an image")
        length = response.getheader("Content-Length") or ""
        if length.isdigit() and int(length) > cap:
            raise _over_byte_cap(self.policy)
        data = bytearray()
        while chunk := self._guarded(lambda: response.read(min(CHUNK, cap + 1 - len(data)))):
            data += chunk
            if len(data) > cap:  # stop reading: the rest is never downloaded
                raise _over_byte_cap(self.policy)
        if self.cut.is_set():  # a shut-down socket reads as the end of a body without a Content-Length
            raise self._deadline_error()
        return bytes(data)

    def _guarded(self, step):
        """Run a network step; socket and protocol errors become transient ImageFetchErrors."""
        try:
            return step()
        except (OSError, http.client.HTTPException) as e:
            if self.cut.is_set():
                raise self._deadline_error() from None
            raise ImageFetchError(f"unreachable: {type(e).__name__}", transient=True) from None

    def _vetted_address(self) -> str:
        """Resolve the host, within the deadline, and refuse it if any of its addresses is refused; the first
        address is the one connected to."""
        answer = {}

        def resolve():  # in a thread: getaddrinfo has no timeout of its own
            try:
                answer["infos"] = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as e:
                answer["error"] = e

        resolver = threading.Thread(target=resolve, daemon=True)
        resolver.start()
        resolver.join(self._remaining())
        if resolver.is_alive():
            raise self._deadline_error()
        if "error" in answer:
            raise ImageFetchError(f"unreachable: cannot resolve {self.host}", transient=True)
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in answer["infos"]]
        for address in addresses:
            rule = self.policy.address_refusal(address)
            if rule:
                raise ImageFetchError(f"refused by {rule}: {self.host} resolves to {address}",
                                      by_rule=rule == PRIVATE_RULE)
        return str(addresses[0])

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._deadline_error()
        return left

    def _deadline_error(self) -> ImageFetchError:
        return ImageFetchError(
            f"deadline passed: the download took longer than --image-deadline-s ({self.policy.deadline_s:g} s)",
            transient=True)

    def _cut(self):
        self.cut.set()
        sock = self.connection.kept_sock
        if sock is not None:
            try:  # the plain socket's shutdown, under any TLS layer: it wakes a read blocked in another thread
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the vetted address; the Host header still names the host. `kept_sock` outlives `sock`, which
    getresponse() drops when the response is the last on the connection (the response still reads from it)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address, self.kept_sock = address, None

    def connect(self):
        self.sock = self.kept_sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to the vetted address, with the certificate checked against the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address, self.kept_sock = address, None

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.kept_sock = self._context.wrap_socket(sock, server_hostname=self.host,
                                                               do_handshake_on_connect=False)
        self.sock.do_handshake()  # after kept_sock is set: the watchdog can cut a handshake that trickles too


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> a fully decoded PIL image; corrupt, truncated or over-`max_pixels` data raises ImageFetchError.
    The size comes from the header, before any pixel is decoded."""
    # PIL's own check too: it refuses twice its limit already when opening, and frames it finds later.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise Image.DecompressionBombError(f"{image.width} x {image.height} pixels")
        image.load()
    except Image.DecompressionBombError as e:
        raise ImageFetchError(f"refused by the pixel cap: {e} (--max-image-pixels {max_pixels})", by_rule=True) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise ImageFetchError(f"cannot decode image: {e}") from e
    return image


class ImageLoader:
    """Ray Data batch function: adds `pixels` (each row's (S, S, 3) uint8 image as bytes, null without one),
    `image_error`, `image_transient` and `image_by_rule` columns.

    Runs as CPU tasks, so decoding and resizing happen on the workers, never on the driver. A batch's images
    are fetched in threads, at most `policy.per_host` at a time from one host, so a slow URL costs its own
    deadline, not the batch's; they are decoded one at a time as they arrive (bounded memory).
    """

    def __init__(self, image_config, policy: ImagePolicy):
        self.image_config = image_config
        self.policy = policy

    def fetch(self, ref: str | None, data: bytes | None, host_slots: dict, lock: threading.Lock) -> bytes:
        if data is not None:
            if len(data) > self.policy.max_bytes:
                raise _over_byte_cap(self.policy)
            return data
        host = _split(ref).netloc.lower()
        if not host:  # a local file: not limited per host
            return fetch_bytes(ref, self.policy)
        with lock:
            slot = host_slots.setdefault(host, threading.BoundedSemaphore(self.policy.per_host))
        with slot:
            return fetch_bytes(ref, self.policy)

    def pixels(self, raw: bytes) -> np.ndarray:
        from encoders.image import preprocess

        image = decode(raw, self.policy.max_pixels)
        try:
            return preprocess(image, self.image_config)
        except Exception as e:  # noqa: BLE001 - odd modes or sizes PIL cannot convert
            raise ImageFetchError(f"cannot convert image: {e}") from e

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Rows to encode (all rows, or those whose `verdict` is "encode") get their image fetched and decoded."""
        n = batch.num_rows
        pixels: list[bytes | None] = [None] * n
        transient, by_rule = [False] * n, [False] * n
        errors = [""] * n
        refs, data = batch.column("image_ref").to_pylist(), batch.column("image_bytes").to_pylist()
        encode = batch.column("verdict").to_pylist() if "verdict" in batch.column_names else ["encode"] * n
        wanted = [i for i in range(n) if encode[i] == "encode" and (refs[i] is not None or data[i] is not None)]
        if wanted:
            host_slots, lock = {}, threading.Lock()
            with ThreadPoolExecutor(max_workers=min(self.policy.fetch_threads, len(wanted))) as pool:
                futures = {pool.submit(self.fetch, refs[i], data[i], host_slots, lock): i for i in wanted}
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        pixels[i] = self.pixels(future.result()).tobytes()  # (S, S, 3) uint8
                    except ImageFetchError as e:
                        errors[i], transient[i], by_rule[i] = str(e), e.transient, e.by_rule
        return (batch.drop_columns(["image_bytes"])  # consumed here: inline images can be large
                .append_column("pixels", pa.array(pixels, pa.binary()))
                .append_column("image_error", pa.array(errors, pa.string()))
                .append_column("image_transient", pa.array(transient, pa.bool_()))
                .append_column("image_by_rule", pa.array(by_rule, pa.bool_())))
