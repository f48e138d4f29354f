"""schemathesis hooks for tests/test_fuzz.py: aim generated requests at the live model, and at another
tenant's things.

Without the first hook almost every generated body names a model nobody
serves and stops at a 404, never reaching dispatch, workers or streaming.
When ``REDSERVE_FUZZ_FOREIGN`` names a JSON file of another tenant's ids
and secret text, generated path parameters often become those ids, and the
``no_foreign_data`` check fails any response that carries that tenant's data.
"""

import itertools
import json
import os

import schemathesis

_FOREIGN = json.loads(open(os.environ["REDSERVE_FUZZ_FOREIGN"]).read()) if os.environ.get(
    "REDSERVE_FUZZ_FOREIGN") else None
#: Which foreign id a path parameter may be swapped for.
_PARAMS = {"file_id": "files", "batch_id": "batches", "response_id": "responses"}
#: Every other generated value is swapped, the others stay as generated. (Not ``random``: hypothesis seeds
#: the global generator the same way for every example.)
_TURN = itertools.count()


def _foreign(kind: str) -> str | None:
    n = next(_TURN)
    ids = _FOREIGN[kind] if _FOREIGN else []
    return ids[(n // 2) % len(ids)] if ids and n % 2 == 0 else None


@schemathesis.hook
def map_body(ctx, body):  # noqa: ANN001, ANN201 - schemathesis' hook signature
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = "echo"
    if _FOREIGN and isinstance(body, dict) and "input_file_id" in body and (foreign := _foreign("files")):
        body["input_file_id"] = foreign
    return body


@schemathesis.hook
def map_path_parameters(ctx, path_parameters):  # noqa: ANN001, ANN201
    if _FOREIGN and path_parameters:
        for name, kind in _PARAMS.items():
            if name in path_parameters and (foreign := _foreign(kind)):
                path_parameters[name] = foreign
    return path_parameters


@schemathesis.check
def no_foreign_data(ctx, response, case):  # noqa: ANN001, ANN201
    """The other tenant's secret text never appears, nor an id of its that the request did not itself name."""
    if not _FOREIGN:
        return None
    text = (response.content or b"").decode("utf-8", "replace")
    sent = str(response.request.url) + str(response.request.body or "")
    if _FOREIGN["marker"] in text:
        raise AssertionError(f"another tenant's content in a {response.status_code} response")
    for kind in _PARAMS.values():
        for foreign in _FOREIGN[kind]:
            if foreign in text and foreign not in sent:
                raise AssertionError(f"another tenant's id {foreign} in a {response.status_code} response")
    return None
