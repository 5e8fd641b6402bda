"""Settings of the S3-compatible server (moto) the data-stage tests start on loopback.

Ray's workers get the endpoint through the runtime env, as they would get real AWS settings.
"""

MOTO_PORT = 5123
S3_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{MOTO_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
