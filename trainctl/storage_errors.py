"""What a storage failure means for the person at the keyboard: botocore/s3fs exceptions
translated, once, into `StorageError`s that name the storage URL and the fix.

Classified by the exception's class names and S3 error codes, so botocore is never imported
here (local-only users never load the S3 stack). The messages are ours: a botocore message can
quote a request URL with its query, and nothing of the credentials ever goes in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from trainctl.env import Env
from trainctl.errors import StorageError, StorageSetupError, StorageUnreachableError, UserError

TIMEOUT_ENV = Env.STORAGE_TIMEOUT_S
DEFAULT_TIMEOUT_S = 10.0
"""How long a storage request may take (connect, then each read) before trainctl gives up
on it, and how long the first request of a command may take, retries included."""

_CREDENTIALS_MISSING = (
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "NoAuthTokenError",
    "ProfileNotFound",
)
_UNREACHABLE = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ProxyConnectionError",
    "FSTimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
)
_REJECTED_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken")
_DENIED = ("AccessDenied", "AllAccessDisabled", "AccountProblem", "403")
_NO_BUCKET = ("NoSuchBucket",)
_BAD_BUCKET = ("InvalidBucketName",)

CREDENTIALS_FIX = (
    "give credentials the standard AWS way: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
    "AWS_PROFILE (~/.aws/credentials), or an instance/pod role"
)


def storage_timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """$TRAINCTL_STORAGE_TIMEOUT_S (seconds, > 0), else `DEFAULT_TIMEOUT_S`."""
    env = os.environ if environ is None else environ
    text = env.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:
        raise UserError(
            "not a storage timeout",
            where=TIMEOUT_ENV,
            value=text,
            fix="give seconds, more than 0 and at most 3600 (e.g. 10)",
        )
    return value


def _names(error: BaseException) -> set[str]:
    return {kind.__name__ for kind in type(error).__mro__}


def _s3_code(error: BaseException) -> str | None:
    """The S3 error code of `error` or of what caused it (s3fs wraps botocore's ClientError
    in an OSError and keeps it as the cause)."""
    seen: BaseException | None = error
    for _ in range(4):  # a short chain: s3fs -> botocore
        if seen is None:
            return None
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            if code:
                return str(code)
        seen = seen.__cause__ or seen.__context__
    return None


def _chain_names(error: BaseException) -> set[str]:
    names: set[str] = set()
    seen: BaseException | None = error
    for _ in range(4):
        if seen is None:
            break
        names |= _names(seen)
        seen = seen.__cause__ or seen.__context__
    return names


def bucket_of(url: str | None) -> str:
    """The bucket of an ``s3://bucket/...`` URL ("" without one)."""
    return url.split("://", 1)[-1].split("/", 1)[0] if url and "://" in url else ""


def translate(
    error: BaseException, url: str | None, timeout_s: float | None = None
) -> StorageError | None:
    """The `StorageError` a person should see for `error`, raised while using `url` (None: not
    known); None when it is none of the failures named here (a bug, or a plain missing object:
    the caller's to handle)."""
    if isinstance(error, StorageError):
        return error
    names = _chain_names(error)
    code = _s3_code(error)
    bucket = f"bucket {bucket_of(url)!r}" if bucket_of(url) else "the bucket"
    waited = f" within {timeout_s:g} s" if timeout_s else ""
    if names & set(_CREDENTIALS_MISSING):
        return StorageSetupError("no credentials to access it", url=url, fix=CREDENTIALS_FIX)
    if code in _REJECTED_CREDENTIALS:
        return StorageSetupError(
            f"the storage rejects the credentials ({code})",
            url=url,
            fix="check the access key, secret and session token in use (AWS_ACCESS_KEY_ID, "
            "AWS_PROFILE...), and that they belong to this endpoint",
        )
    if code in _DENIED:
        return StorageSetupError(
            f"access denied to {bucket}",
            url=url,
            fix="ask for read (and, to launch, write) access to it, or use credentials that "
            "have it (AWS_PROFILE, AWS_ACCESS_KEY_ID)",
        )
    if code in _NO_BUCKET:
        return StorageSetupError(
            f"{bucket} does not exist",
            url=url,
            fix="check the bucket name in --storage / $TRAINCTL_STORAGE (or create the bucket)",
        )
    if code in _BAD_BUCKET or ("ParamValidationError" in names and "bucket" in str(error).lower()):
        return StorageSetupError(
            f"{bucket} is not a valid bucket name",
            url=url,
            fix="bucket names are 3-63 lowercase letters, digits, dots and hyphens: check "
            "--storage / $TRAINCTL_STORAGE",
        )
    if names & set(_UNREACHABLE) or isinstance(error, TimeoutError):
        return StorageUnreachableError(
            f"the storage endpoint did not answer{waited}",
            url=url,
            fix=f"check the endpoint (AWS_ENDPOINT_URL, storage_options.endpoint_url) and the "
            f"network, then retry; {TIMEOUT_ENV} sets how long to wait",
        )
    return None
