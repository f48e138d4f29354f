"""Llama 3 JSON calls: the whole output is ``{"name": ..., "parameters": {...}}``, several joined by ``;``
(optionally after ``<|python_tag|>``)."""

from __future__ import annotations

import json

from workers.tools.base import Call, WholeOutputParser, call_of

PYTHON_TAG = "<|python_tag|>"


class Llama3JSONParser(WholeOutputParser):
    opener = ("{", PYTHON_TAG)

    def parse(self, payload: str) -> list[Call] | None:
        decoder = json.JSONDecoder()
        text, calls, at = payload.removeprefix(PYTHON_TAG).strip(), [], 0
        while at < len(text):
            try:
                obj, at = decoder.raw_decode(text, at)
            except ValueError:
                return None
            call = call_of(obj, self.names)
            if call is None:
                return None
            calls.append(call)
            while at < len(text) and text[at] in "; \n\t":
                at += 1
        return calls or None
