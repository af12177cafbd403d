"""How the S3 store fails: one exception, with messages that name no URL or secret."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import botocore.exceptions


class BucketError(Exception):
    """The store could not be used: unreachable, refused, timed out, interrupted.

    ``status``: the HTTP status when the store answered; ``code``: S3's error code.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def status_of(exc: botocore.exceptions.ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


@contextmanager
def s3_errors(operation: str, name: str) -> Iterator[None]:
    """Turn botocore's exceptions into BucketError with a message that names no URL or secret."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        status = status_of(exc)
        code = exc.response.get("Error", {}).get("Code") or None
        # only the code: S3 error documents may carry the string to sign and the access key id
        reason = f"HTTP {status}" + (f" {code}" if code and code != str(status) else "")
        raise BucketError(f"{operation} {name}: {reason}", status=status, code=code) from None
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError):
        raise BucketError(f"{operation} {name}: cannot connect to the S3 endpoint") from None
    except botocore.exceptions.ReadTimeoutError:
        raise BucketError(f"{operation} {name}: the S3 endpoint did not answer in time") from None
    except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError):
        raise BucketError(f"{operation} {name}: no S3 credentials found") from None
    except (botocore.exceptions.IncompleteReadError, botocore.exceptions.ResponseStreamingError):
        raise BucketError(f"{operation} {name}: the transfer was interrupted") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise BucketError(f"{operation} {name}: {type(exc).__name__}") from None
