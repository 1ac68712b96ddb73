"""Names a job's files are stored under: its id (a path segment) and the storage URL.

Checked where a spec is loaded (`trainctl.spec`) and wherever a command takes them from its
flags or the environment (`trainctl.store`, the CLI): one message and the fix, a `UserError`.
"""

from __future__ import annotations

import re

from trainctl.errors import UserError

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Job ids become path segments and Slurm job names: no `/`, no `..`, at most 64 characters."""

URL_SCHEMES = ("file", "s3")
S3_BUCKET_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
"""Bucket names botocore sends at all (S3's own rule, 3-63 lowercase letters, digits, dots and
hyphens, is stricter: legacy and S3-compatible stores accept more, and answer for themselves)."""


def check_job_id(job_id: str, where: str = "--job-id") -> str:
    """Return `job_id` if it is a safe path segment, else raise a UserError."""
    if not JOB_ID_PATTERN.fullmatch(job_id) or ".." in job_id:
        raise UserError(
            "invalid job id",
            where=where,
            value=job_id,
            fix="use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit",
        )
    return job_id


def check_storage_url(url: str, where: str = "storage") -> str:
    """Accept a plain path, file:// or s3://bucket[/prefix]; raise a UserError otherwise."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        if scheme not in URL_SCHEMES:
            raise UserError(
                f"unsupported storage scheme {scheme!r}",
                where=where,
                value=url,
                fix="use a local path, file:///abs/path or s3://bucket/prefix",
            )
        if scheme == "s3" and not rest.split("/", 1)[0]:
            raise UserError(
                "s3 URL has no bucket",
                where=where,
                value=url,
                fix="use s3://bucket/prefix",
            )
        if scheme == "s3" and not S3_BUCKET_PATTERN.fullmatch(rest.split("/", 1)[0]):
            raise UserError(
                "not a valid S3 bucket name",
                where=where,
                value=url,
                fix="bucket names are 3-63 lowercase letters, digits, dots and hyphens",
            )
        if scheme == "file" and not rest.startswith("/"):
            raise UserError(
                "file URL must be absolute",
                where=where,
                value=url,
                fix="use file:///abs/path or a plain path",
            )
    elif not url.strip():
        raise UserError("empty storage path", where=where, value=url, fix="give a path or URL")
    elif (typo := re.match(r"(s3|file):/*(?=[^/])", url)) is not None:
        # `s3:/bucket` has no `://`: it would be a local directory named `s3:`.
        scheme = typo[1]
        meant = f"{scheme}://{'/' if scheme == 'file' else ''}{url[typo.end() :]}"
        raise UserError(
            f"a mistyped {scheme}:// URL (as a path it would be a local directory named "
            f"'{scheme}:')",
            where=where,
            value=url,
            fix=f"did you mean {meant}?",
        )
    return url
