"""An S3-compatible server (moto) whose locked buckets refuse unencrypted writes, as AWS does
under the bucket policy it recommends for encryption at rest:

    {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
     "Resource": "arn:aws:s3:::BUCKET/*",
     "Condition": {"Null": {"s3:x-amz-server-side-encryption": "true"}}}

moto stores bucket policies but ignores their conditions (it would refuse every write), so the
policy is evaluated here, in front of moto, for the requests S3 authorizes as s3:PutObject and
that carry the header when encrypted: PutObject, CopyObject and CreateMultipartUpload
(UploadPart and CompleteMultipartUpload belong to an upload created encrypted). A refused
request gets S3's 403 AccessDenied. Run as a script (``python s3_policy.py PORT BUCKET...``)
for a server in its own process, or use ``server()`` for one in a thread of this process.
"""

from __future__ import annotations

import sys
import threading
from urllib.parse import parse_qs

REFUSED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied (bucket policy: no x-amz-server-side-encryption header)"
    b"</Message></Error>"
)
# query parameters of PUT requests on an object that are not PutObject / CopyObject
NOT_A_WRITE = {"partNumber", "uploadId", "tagging", "acl", "retention", "legal-hold"}


def unencrypted_write(environ: dict, locked: set[str]) -> bool:
    """True for a request that the policy on its (locked) bucket refuses."""
    if "HTTP_X_AMZ_SERVER_SIDE_ENCRYPTION" in environ:
        return False
    bucket, _, key = environ.get("PATH_INFO", "").lstrip("/").partition("/")
    if bucket not in locked or not key:  # not an object request (bucket settings are allowed)
        return False
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    if environ["REQUEST_METHOD"] == "PUT":
        return not (NOT_A_WRITE & query.keys())
    return environ["REQUEST_METHOD"] == "POST" and "uploads" in query


def refusing_unencrypted(app, locked: set[str], refused: list | None = None):
    """`app` (moto's WSGI app) behind the policy on the `locked` buckets; each refused
    (method, path) is appended to `refused` when given."""

    def wsgi(environ, start_response):
        if unencrypted_write(environ, locked):
            if refused is not None:
                refused.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO")))
            start_response(
                "403 Forbidden",
                [("Content-Type", "application/xml"), ("Content-Length", str(len(REFUSED)))],
            )
            return [REFUSED]
        return app(environ, start_response)

    return wsgi


def _app(locked: set[str], refused: list | None = None):
    from moto.server import DomainDispatcherApplication, create_backend_app

    return refusing_unencrypted(DomainDispatcherApplication(create_backend_app), locked, refused)


def server(port: int, locked: set[str], refused: list | None = None):
    """A started server in a daemon thread of this process; call .shutdown() to stop it."""
    import logging

    from moto.server import MotoRequestHandler
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    srv = make_server(
        "127.0.0.1", port, _app(locked, refused), True, request_handler=MotoRequestHandler
    )
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


if __name__ == "__main__":
    from moto.server import MotoRequestHandler
    from werkzeug.serving import run_simple

    run_simple(
        "127.0.0.1",
        int(sys.argv[1]),
        _app(set(sys.argv[2:])),
        threaded=True,
        request_handler=MotoRequestHandler,
    )
