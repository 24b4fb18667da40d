"""Image references are confined: roots for local paths, vetted addresses for URLs, byte, pixel and time caps,
transient failures retried on the next run. Real files, symlinks and HTTP servers on loopback."""
import http.server
import io
import ipaddress
import json
import os
import struct
import sys
import threading
import time
import zlib

import pyarrow as pa
import pytest
from PIL import Image

from encoders.image import ImageConfig
from featurestore import store
from featurestore.catalogs import open_catalog
from featurestore.images import OUTSIDE_ROOTS, ImageFetchError, ImageLoader, ImagePolicy, decode, fetch_bytes
from flow_runs import encode_flow_runs  # tests/ helper

LOOPBACK = ImagePolicy(allow_private_hosts=True, retries=0)
CONFIG = ImageConfig(name="tf_efficientnet_lite0", input_size=32)


def png(width=40, height=30) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that is a signature, an IHDR claiming width x height RGB pixels and an IEND: a decompression bomb's
    header without the bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")


def load(refs, policy: ImagePolicy) -> list[tuple[bool, str, bool]]:
    """ImageLoader over one batch of references -> (has_image, image_error, image_transient) per reference."""
    batch = pa.table({"item_id": [str(i) for i in range(len(refs))], "image_ref": pa.array(refs, pa.string()),
                      "image_bytes": pa.nulls(len(refs), pa.binary())})
    out = ImageLoader(CONFIG, policy)(batch)
    columns = zip(out.column("pixels").is_valid().to_pylist(), out.column("image_error").to_pylist(),
                  out.column("image_transient").to_pylist())
    return [(ok, err, transient) for ok, err, transient in columns]


class Server:
    """A loopback HTTP server whose paths are functions of the request handler; it records every request."""

    def __init__(self, tls=None):
        self.routes, self.requests = {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                else:
                    route(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def send(body: bytes, content_type="image/png", status=200, length=True):
    def route(handler):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        if length:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return route


def redirect(location: str):
    def route(handler):
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.end_headers()
    return route


def trickle(handler):
    """A byte a tenth of a second for 10 s, each read well within any per-read timeout, then the connection drops
    short of the declared length: a fetch without a deadline for the whole download fails with another reason."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    try:
        for _ in range(100):
            handler.wfile.write(b"\x89")
            handler.wfile.flush()
            time.sleep(0.1)
    except OSError:  # the client hung up: what the deadline is for
        pass


def endless(handler):
    """Image bytes without end and without a Content-Length: only a byte cap that stops reading ends this."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.end_headers()
    try:
        while True:
            handler.wfile.write(b"\0" * 65536)
    except OSError:
        pass


@pytest.fixture
def tree(tmp_path):
    """catalog/ (the root) with an image, a symlink out of it and one inside it; a private photo next to it."""
    catalog_dir = tmp_path / "catalog"
    (catalog_dir / "images").mkdir(parents=True)
    (catalog_dir / "images" / "ok.png").write_bytes(png())
    (tmp_path / "private.png").write_bytes(png())
    os.symlink(tmp_path / "private.png", catalog_dir / "images" / "out.png")
    os.symlink(tmp_path, catalog_dir / "images" / "up")
    os.symlink(catalog_dir / "images" / "ok.png", catalog_dir / "images" / "in.png")
    return tmp_path


def test_local_paths_are_confined_to_the_roots_and_refusals_reveal_nothing(tree):
    refs = {
        "dotdot": "../private.png", "dotdot_missing": "../no-such.png", "absolute": str(tree / "private.png"),
        "file_url": f"file://{tree / 'private.png'}", "file_url_missing": f"file://{tree / 'no-such.png'}",
        "symlink_out": "images/out.png", "symlinked_dir": "images/up/private.png",
        "inside": "images/ok.png", "file_url_inside": f"file://{tree / 'catalog' / 'images' / 'ok.png'}",
        "symlink_in": "images/in.png", "missing_inside": "images/gone.png",
    }
    catalog = tree / "catalog" / "items.jsonl"
    catalog.write_text("".join(json.dumps({"item_id": k, "title": k, "image": v}) + "\n" for k, v in refs.items()))
    source = open_catalog(str(catalog))
    rows = source.read_local()
    resolved = dict(zip(rows.column("item_id").to_pylist(), rows.column("image_ref").to_pylist()))
    # stored as written, not looked up: no symlink target, no hint whether the file exists
    assert resolved["symlink_out"] == str(tree / "catalog" / "images" / "out.png")
    assert resolved["dotdot"] == str(tree / "private.png")

    policy = ImagePolicy().with_root(source.base)
    results = dict(zip(resolved, load(list(resolved.values()), policy)))
    for key in ("dotdot", "dotdot_missing", "absolute", "file_url", "file_url_missing", "symlink_out", "symlinked_dir"):
        assert results[key] == (False, OUTSIDE_ROOTS, False)  # one reason whether the file exists or not
    for key in ("inside", "file_url_inside", "symlink_in"):
        assert results[key] == (True, "", False), key
    missing = resolved["missing_inside"]
    assert results["missing_inside"] == (False, f"cannot read {missing}: No such file or directory", False)

    widened = load([resolved["dotdot"], resolved["symlink_out"]], ImagePolicy(roots=(str(tree),)))
    assert all(ok for ok, _, _ in widened)  # --image-root lets them in


def test_only_http_https_file_and_paths_are_fetched(tmp_path):
    policy = ImagePolicy(roots=(str(tmp_path),))
    for ref, reason in [("ftp://example.com/a.png", "ftp://"), ("gopher://h/x", "gopher://"),
                        (f"file://otherhost{tmp_path}/a.png", "naming host 'otherhost'")]:
        with pytest.raises(ImageFetchError, match="refused by the scheme rule") as refused:
            fetch_bytes(ref, policy)
        assert reason in str(refused.value) and not refused.value.transient
    for url, reason in [("http://[not-ipv6/a.png", "Invalid IPv6 URL"), ("http://h:99999/a.png", "Port out of range"),
                        ("http:///a.png", "it names no host")]:
        with pytest.raises(ImageFetchError, match=f"not a valid URL: {reason}"):
            fetch_bytes(url, policy)


def test_paths_with_spaces_and_non_ascii_are_requested_percent_encoded(server):
    server.routes["/caf%C3%A9%20au%20lait.png?size=large%20x"] = send(png())
    assert len(fetch_bytes(server.url("/caf\u00e9 au lait.png?size=large x"), LOOPBACK)) == len(png())
    assert len(fetch_bytes(server.url("/caf%C3%A9%20au%20lait.png?size=large%20x"), LOOPBACK)) == len(png())


def test_address_rules():
    strict, loose = ImagePolicy(), ImagePolicy(allow_private_hosts=True)
    for text in ("169.254.169.254", "169.254.1.1", "fd00:ec2::254", "fe80::1", "::ffff:169.254.169.254",
                 "2002:a9fe:a9fe::1", "64:ff9b::a9fe:a9fe"):
        for policy in (strict, loose):
            assert "link-local/metadata" in policy.address_refusal(ipaddress.ip_address(text)), text
    for text in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "100.64.0.1", "::1", "fd12::1", "0.0.0.0", "224.0.0.1"):
        assert "private-address rule" in strict.address_refusal(ipaddress.ip_address(text)), text
        assert loose.address_refusal(ipaddress.ip_address(text)) is None, text
    assert strict.address_refusal(ipaddress.ip_address("93.184.216.34")) is None


# Python's audit hook sees every socket.connect of this process (a hook cannot be removed: it records only while
# the fixture below says so).
CONNECTS = []  # the (host, port) connected to
RECORDING = threading.Event()


def _audit(event, args):
    if event == "socket.connect" and RECORDING.is_set():
        CONNECTS.append(args[1])


sys.addaudithook(_audit)


@pytest.fixture
def connects():
    CONNECTS.clear()
    RECORDING.set()
    yield CONNECTS
    RECORDING.clear()


def test_redirect_to_the_metadata_address_is_refused_before_connecting(server, connects):
    server.routes["/hop"] = redirect("http://169.254.169.254/latest/meta-data/iam/security-credentials/")
    with pytest.raises(ImageFetchError) as refused:
        fetch_bytes(server.url("/hop"), LOOPBACK)
    assert str(refused.value).startswith("refused by the link-local/metadata address rule (always refused): "
                                         "169.254.169.254 resolves to 169.254.169.254")
    assert not refused.value.transient
    assert server.requests == ["/hop"]
    assert [address[1] for address in connects] == [server.port]  # the loopback server only, never 169.254.x
    assert not any(address[0].startswith("169.254.") for address in connects)

    connects.clear()
    with pytest.raises(ImageFetchError, match="refused by the private-address rule") as refused:
        fetch_bytes(server.url("/hop"), ImagePolicy())  # loopback itself needs --allow-private-hosts
    assert "127.0.0.1 resolves to 127.0.0.1" in str(refused.value) and connects == []

    with pytest.raises(ImageFetchError, match="private-address rule.*: localhost resolves to"):  # by its address
        fetch_bytes(f"http://localhost:{server.port}/hop", ImagePolicy())
    assert connects == [] and server.requests == ["/hop"]


def test_redirects_are_followed_a_bounded_number_of_times(server):
    server.routes["/a.png"] = send(png())
    server.routes["/r1"] = redirect("/a.png")
    server.routes["/loop"] = redirect("/loop")
    assert decode(fetch_bytes(server.url("/r1"), LOOPBACK), 10**6).size == (40, 30)
    with pytest.raises(ImageFetchError, match="refused by the redirect limit: more than 5 redirects"):
        fetch_bytes(server.url("/loop"), LOOPBACK)
    assert server.requests.count("/loop") == 6


def self_signed_localhost(directory):
    """A certificate for the name localhost only, and its key, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return directory / "cert.pem", directory / "key.pem"


def test_https_is_checked_against_the_host_name_while_connecting_to_the_vetted_address(tmp_path, monkeypatch):
    import ssl

    cert, key = self_signed_localhost(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = Server(tls=context)
    try:
        server.routes["/a.png"] = send(png())
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted as the system's CAs are
        assert decode(fetch_bytes(f"https://localhost:{server.port}/a.png", LOOPBACK), 10**6).size == (40, 30)
        with pytest.raises(ImageFetchError, match="unreachable: SSLCertVerificationError"):  # not issued for the IP
            fetch_bytes(f"https://127.0.0.1:{server.port}/a.png", LOOPBACK)
    finally:
        server.close()


def test_byte_cap_stops_reading(server, tree):
    server.routes["/declared"] = send(b"\0" * 5000)
    server.routes["/endless"] = endless
    policy = ImagePolicy(allow_private_hosts=True, retries=0, max_bytes=4000, roots=(str(tree),))
    for path in ("/declared", "/endless"):
        with pytest.raises(ImageFetchError, match=r"refused by the byte cap: larger than --max-image-bytes \(4000"):
            fetch_bytes(server.url(path), policy)
    (tree / "big.png").write_bytes(b"\0" * 5000)
    with pytest.raises(ImageFetchError, match="refused by the byte cap"):
        fetch_bytes(str(tree / "big.png"), policy)
    inline = ImageLoader(CONFIG, policy)(pa.table({"item_id": ["x"], "image_ref": pa.array([None], pa.string()),
                                                   "image_bytes": pa.array([b"\0" * 5000], pa.binary())}))
    assert inline.column("image_error")[0].as_py().startswith("refused by the byte cap")


def test_pixel_cap_is_checked_from_the_header(server):
    bomb = png_header(100_000, 100_000)  # 10 gigapixels claimed in 57 bytes
    with pytest.raises(ImageFetchError, match=r"refused by the pixel cap: .*--max-image-pixels 40000000"):
        decode(bomb, ImagePolicy().max_pixels)
    with pytest.raises(ImageFetchError, match=r"refused by the pixel cap: 40 x 30 pixels \(--max-image-pixels 1000\)"):
        decode(png(40, 30), 1000)  # under PIL's own threshold of twice the limit: our check
    assert decode(png(40, 30), 1200).size == (40, 30)
    server.routes["/bomb.png"] = send(bomb)
    assert load([server.url("/bomb.png")], LOOPBACK)[0][1].startswith("refused by the pixel cap")


def test_deadline_covers_the_whole_download(server):
    server.routes["/slow.png"] = trickle
    with pytest.raises(ImageFetchError, match=r"deadline passed: .* longer than --image-deadline-s \(1 s\)") as late:
        fetch_bytes(server.url("/slow.png"), ImagePolicy(allow_private_hosts=True, deadline_s=1))
    assert late.value.transient


def test_content_type_and_content(server):
    html = b"<html><body>not a picture</body></html>"
    server.routes["/page"] = send(html, "text/html; charset=utf-8")
    server.routes["/page-as-image.jpg"] = send(html, "image/jpeg")
    server.routes["/untyped"] = send(png(), "application/octet-stream")
    page, page_as_image, untyped = load([server.url(p) for p in ("/page", "/page-as-image.jpg", "/untyped")], LOOPBACK)
    assert page == (False, "refused by the Content-Type rule: text/html is not an image", False)
    ok, reason, transient = page_as_image
    assert not ok and not transient and reason.startswith("cannot decode image: cannot identify image file")
    assert untyped == (True, "", False)


def test_transient_and_permanent_http_failures(server):
    server.routes["/busy"] = send(b"", status=503)
    server.routes["/limited"] = send(b"", status=429)
    from featurestore.raycluster import free_port

    closed = f"http://127.0.0.1:{free_port()}/x.png"
    busy, limited, gone, down = load([server.url("/busy"), server.url("/limited"), server.url("/gone"), closed],
                                     ImagePolicy(allow_private_hosts=True, retries=1, backoff_s=0.01))
    assert busy == (False, "HTTP 503 after 2 attempt(s)", True)
    assert limited == (False, "HTTP 429 after 2 attempt(s)", True)
    assert gone == (False, "HTTP 404", False)
    assert down == (False, "unreachable: ConnectionRefusedError after 2 attempt(s)", True)
    assert server.requests.count("/busy") == 2 and server.requests.count("/gone") == 1


def test_a_batch_is_fetched_in_parallel_within_the_per_host_limit(server):
    """Each request waits until its group of `per_host` requests has arrived, so a fetch that does not run
    them together never gets past the first; the most in flight at once is the limit."""
    state = {"arrived": 0, "active": 0, "most": 0}
    condition = threading.Condition()
    n, per_host = 6, 2

    def grouped(handler):
        with condition:
            position = state["arrived"]
            state["arrived"] += 1
            state["active"] += 1
            state["most"] = max(state["most"], state["active"])
            condition.notify_all()
            group_end = min(n, (position // per_host + 1) * per_host)
            condition.wait_for(lambda: state["arrived"] >= group_end, timeout=10)
        send(png())(handler)
        with condition:
            state["active"] -= 1

    refs = [server.url(f"/img{i}.png") for i in range(n)]
    for i in range(n):
        server.routes[f"/img{i}.png"] = grouped
    results = load(refs, ImagePolicy(allow_private_hosts=True, retries=0, per_host=per_host))
    assert all(ok for ok, _, _ in results), results
    assert state["most"] == per_host


def test_one_slow_url_costs_its_own_deadline_not_the_batch(server):
    """The slow image is served only once a later image of the batch has been requested: fetched one by one,
    it would wait out its deadline and fail."""
    later_requested = threading.Event()

    def slow(handler):
        later_requested.wait(timeout=10)
        send(png())(handler)

    def fast(handler):
        later_requested.set()
        send(png())(handler)

    server.routes.update({"/slow.png": slow, "/fast.png": fast})
    results = load([server.url("/slow.png"), server.url("/fast.png")],
                   ImagePolicy(allow_private_hosts=True, retries=0, deadline_s=5))
    assert results == [(True, "", False), (True, "", False)]


def test_refusals_a_flag_can_lift_are_told_apart_and_the_rules_digest_follows_those_flags(server, tree):
    """What --image-root, --allow-private-hosts and the caps refuse, a later run's flags may allow (the flow then
    fetches it again); the link-local and scheme rules, and what is no image, never."""
    import dataclasses

    policy = ImagePolicy(retries=0, max_bytes=4000, roots=(str(tree / "catalog"),))
    (tree / "catalog" / "big.png").write_bytes(b"\0" * 5000)
    server.routes["/page.png"] = send(b"<html>hi</html>", "text/html")
    cases = {str(tree / "private.png"): True, str(tree / "catalog" / "big.png"): True, server.url("/x.png"): True,
             "http://169.254.169.254/x.png": False, "ftp://host/x.png": False}
    for ref, lifted in cases.items():
        with pytest.raises(ImageFetchError) as refused:
            fetch_bytes(ref, policy)
        assert refused.value.by_rule is lifted and not refused.value.transient, (ref, str(refused.value))
    with pytest.raises(ImageFetchError) as page:
        fetch_bytes(server.url("/page.png"), LOOPBACK)
    with pytest.raises(ImageFetchError) as bomb:
        decode(png_header(100_000, 100_000), policy.max_pixels)  # (decode sets PIL's process-wide limit to it)
    assert (page.value.by_rule, bomb.value.by_rule) == (False, True)
    digest = policy.rules_fingerprint
    assert dataclasses.replace(policy, roots=tuple(reversed((str(tree / "catalog"), str(tree))))).rules_fingerprint \
        == dataclasses.replace(policy, roots=(str(tree / "catalog"), str(tree))).rules_fingerprint != digest
    for lifted in ({"allow_private_hosts": True}, {"max_bytes": 5000}, {"max_pixels": 10}):
        assert dataclasses.replace(policy, **lifted).rules_fingerprint != digest, lifted
    assert dataclasses.replace(policy, deadline_s=5, retries=3, per_host=1).rules_fingerprint == digest


def test_bad_image_settings_name_their_flag(tmp_path):
    (tmp_path / "a-file").write_text("x")
    for settings, message in [
        ({"max_bytes": 0}, "--max-image-bytes must be a positive whole number, got 0"),
        ({"max_bytes": 2.5}, "--max-image-bytes must be a positive whole number, got 2.5"),
        ({"max_pixels": True}, "--max-image-pixels must be a positive whole number, got True"),
        ({"deadline_s": 0}, "--image-deadline-s must be a positive number of seconds, got 0"),
        ({"deadline_s": float("nan")}, "--image-deadline-s must be a positive number of seconds, got nan"),
        ({"roots": (str(tmp_path / "a-file"),)}, f"--image-root {str(tmp_path / 'a-file')!r} is not a directory"),
    ]:
        with pytest.raises(ValueError) as bad:
            ImagePolicy(**settings)
        assert str(bad.value) == message


def test_bad_image_flags_fail_before_ray_starts(sample_catalog):
    """One message each, no traceback, and Ray never started in the process."""
    flags = [["--max-image-bytes", "0"], ["--max-image-pixels", "-5"], ["--image-deadline-s", "inf"],
             ["--image-root", "/no/such/folder"]]
    runs, ray_started = encode_flow_runs([["--catalog", str(sample_catalog), *f] for f in flags])
    assert ray_started is False
    for (flag, _), (rc, stderr) in zip(flags, runs):
        assert rc == 2 and stderr.startswith(f"error: {flag} ") and stderr.count("\n") == 1, stderr


@pytest.mark.e2e
def test_the_flow_refuses_each_rule_and_retries_transient_failures_and_what_wider_rules_allow(
        ray_local, server, tree, sample_catalog):
    """Run 1 records every refusal; run 2 (the server healed) fetches only the transient failures again; run 3,
    with --image-root and --max-image-bytes widened, fetches again what the roots and the caps refused, and
    nothing that no flag allows (the metadata address, HTML)."""
    import dataclasses

    from featurestore.encode import RETRY_PREFIX, encode_catalog, rules_prefix

    healthy = threading.Event()

    def flaky(handler):  # 503 until the test says otherwise, then the photo
        send((sample_catalog.parent / "images" / "chelsea.jpg").read_bytes(), "image/jpeg",
             200 if healthy.is_set() else 503)(handler)

    server.routes.update({
        "/flaky.jpg": flaky, "/hop": redirect("http://169.254.169.254/latest/meta-data/"),
        "/big.png": send(b"\0" * 3_000_000), "/bomb.png": send(png_header(50_000, 50_000)),
        "/page.jpg": send(b"<html>hi</html>", "image/jpeg"), "/slow.png": trickle,
    })
    refs = {"ok": "images/ok.png", "dotdot": "../private.png", "symlink_out": "images/out.png",
            "flaky": server.url("/flaky.jpg"), "metadata": server.url("/hop"), "big": server.url("/big.png"),
            "bomb": server.url("/bomb.png"), "html": server.url("/page.jpg"), "slow": server.url("/slow.png")}
    catalog = tree / "catalog" / "items.jsonl"
    catalog.write_text("".join(json.dumps({"item_id": k, "title": f"item {k}", "image": v}) + "\n"
                               for k, v in refs.items()))
    db_uri = str(tree / "db")
    policy = ImagePolicy(allow_private_hosts=True, max_bytes=2_000_000, deadline_s=2, retries=0)
    first = encode_catalog(str(catalog), db_uri=db_uri, batch_size=4, images=policy)
    assert (first.encoded, first.image_failures, first.image_failures_transient) == (9, 8, 2)
    db = store.connect(db_uri)
    reasons = db.open_table("item_rejects").to_pandas().set_index("item_id")["reason"]
    expected = {"dotdot": OUTSIDE_ROOTS, "symlink_out": OUTSIDE_ROOTS,
                "metadata": "refused by the link-local/metadata address rule", "big": "refused by the byte cap",
                "bomb": "refused by the pixel cap", "html": "cannot decode image", "flaky": "HTTP 503",
                "slow": "deadline passed"}
    by_rule = {"dotdot", "symlink_out", "big", "bomb"}  # what --image-root and the caps' flags decide
    for item, start in expected.items():
        assert reasons[item].startswith(start), (item, reasons[item])
        kind = ("(transient, retried on the next run)" if item in ("flaky", "slow") else
                "(tried again once the flags change the rule)" if item in by_rule else "(permanent)")
        assert kind in reasons[item], (item, reasons[item])
    assert server.requests.count("/hop") == 1
    hashes = db.open_table("items").to_pandas().set_index("item_id")["content_hash"]
    rules = rules_prefix(policy.with_root(catalog.parent))  # the catalog's folder is a root of every run
    assert hashes["flaky"].startswith(RETRY_PREFIX) and hashes["big"].startswith(rules)
    assert {item for item, h in hashes.items() if h.startswith(rules)} == by_rule

    healthy.set()
    second = encode_catalog(str(catalog), db_uri=db_uri, batch_size=4, images=policy)
    assert (second.encoded, second.unchanged, second.image_failures, second.image_failures_transient) == (2, 7, 1, 1)
    items = db.open_table("items").to_pandas().set_index("item_id")
    assert items["image_emb"].notna()["flaky"] and not items.loc["flaky", "content_hash"].startswith(RETRY_PREFIX)
    reasons = db.open_table("item_rejects").to_pandas().set_index("item_id")["reason"]
    assert "flaky" not in reasons.index and reasons["slow"].startswith("deadline passed")
    assert set(reasons.index) == set(expected) - {"flaky"}  # the permanent ones kept, not fetched again
    assert server.requests.count("/big.png") == 1 and server.requests.count("/flaky.jpg") == 2

    wider = dataclasses.replace(policy, roots=(str(tree),), max_bytes=4_000_000)  # the private photo's folder too
    third = encode_catalog(str(catalog), db_uri=db_uri, batch_size=4, images=wider)
    assert (third.encoded, third.unchanged) == (5, 4)  # the four a rule refused, and the slow one
    items = db.open_table("items").to_pandas().set_index("item_id")
    assert items["image_emb"].notna()[["dotdot", "symlink_out"]].all()
    reasons = db.open_table("item_rejects").to_pandas().set_index("item_id")["reason"]
    assert reasons["big"].startswith("cannot decode image") and "(permanent)" in reasons["big"]  # past the cap now
    assert reasons["bomb"].startswith("refused by the pixel cap")
    assert set(reasons.index) == {"metadata", "big", "bomb", "html", "slow"}
    assert server.requests.count("/big.png") == 2 and server.requests.count("/hop") == 1
    assert server.requests.count("/page.jpg") == 1
