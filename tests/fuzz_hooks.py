"""schemathesis hooks for tests/test_fuzz.py: aim generated requests at the live model.

Without this almost every generated body names a model nobody serves and
stops at a 404, never reaching dispatch, workers or streaming.
"""

import schemathesis


@schemathesis.hook
def map_body(ctx, body):  # noqa: ANN001, ANN201 - schemathesis' hook signature
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = "echo"
    return body
