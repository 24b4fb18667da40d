"""Object-store settings from one place: the standard AWS environment.

    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN   credentials (or a profile / instance role)
    AWS_ENDPOINT_URL                                              an S3-compatible server (http://host:port)
    AWS_REGION                                                    the bucket's region
    AWS_ALLOW_HTTP                                                "true" for a plain-http endpoint

`storage_options(uri)` maps them to LanceDB/Lance storage options for an s3:// URI, and `filesystem(uri)` to a
pyarrow S3FileSystem with the same settings (Ray Train's storage, Ray Data and pyarrow readers). The values go
from the driver's environment into the objects that need them (a LanceDB connection, a pickled file system,
a read task's arguments); nothing here writes them to a file.
"""
from __future__ import annotations

import os

import pyarrow.fs

S3_SCHEME = "s3://"
# environment variable -> LanceDB (object_store) storage option
ENV_TO_OPTION = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token",
    "AWS_ENDPOINT_URL": "aws_endpoint",
    "AWS_REGION": "aws_region",
    "AWS_ALLOW_HTTP": "allow_http",
}


def storage_options(uri: str) -> dict[str, str]:
    """LanceDB storage options for `uri` from the AWS environment variables that are set; {} for a URI that is
    not s3:// (a local path, or another store that reads its own environment)."""
    if not uri.startswith(S3_SCHEME):
        return {}
    return {option: os.environ[name] for name, option in ENV_TO_OPTION.items() if os.environ.get(name)}


def filesystem(uri: str, options: dict[str, str] | None = None, **s3_args) -> tuple[pyarrow.fs.FileSystem, str]:
    """(pyarrow file system, path on it) for a local path or URI; an s3:// one gets `options`, by default
    `storage_options(uri)` (a Ray worker is given the driver's: its own environment may not have them), and
    `s3_args` for pyarrow's S3FileSystem (timeouts, retries)."""
    options = storage_options(uri) if options is None else options
    if not uri.startswith(S3_SCHEME) or not (options or s3_args):  # local, another scheme, or S3 through a profile
        return pyarrow.fs.FileSystem.from_uri(uri)  # or instance role: pyarrow's own lookup
    endpoint = options.get("aws_endpoint")
    s3 = pyarrow.fs.S3FileSystem(
        access_key=options.get("aws_access_key_id"), secret_key=options.get("aws_secret_access_key"),
        session_token=options.get("aws_session_token"), region=options.get("aws_region"),
        endpoint_override=endpoint, scheme="http" if endpoint and endpoint.startswith("http://") else "https",
        **s3_args)
    return s3, uri[len(S3_SCHEME):].rstrip("/")


def unusable_bucket(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why the bucket of an s3:// `uri` cannot be used with the AWS environment's settings (a wrong endpoint or
    credentials, no such bucket), or None: one request, tried once and cut off after `timeout_s`, so a flow says
    so before Ray starts instead of retrying for minutes. Other URIs: None."""
    if not uri.startswith(S3_SCHEME):
        return None
    fs, path = filesystem(uri, connect_timeout=timeout_s, request_timeout=timeout_s,
                          retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1))
    bucket = path.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            return f"the bucket {bucket!r} does not exist at {os.environ.get('AWS_ENDPOINT_URL') or 'AWS'}"
    except OSError as error:
        return f"the bucket {bucket!r} cannot be read ({str(error).strip().splitlines()[0]})"
    return None


def uri_of(uri: str, path: str) -> str:
    """The URI of `path` on `filesystem(uri)`'s file system (pyarrow paths drop the s3:// scheme)."""
    return S3_SCHEME + path if uri.startswith(S3_SCHEME) and not path.startswith(S3_SCHEME) else path
