"""Mistral-style calls: ``[TOOL_CALLS]`` then a JSON array of ``{"name", "arguments"}`` to the end."""

from __future__ import annotations

from workers.tools.base import MarkerParser


class MistralParser(MarkerParser):
    start, end = "[TOOL_CALLS]", None
    #: ``[TOOL_CALLS]`` is a special token in Mistral's tokenizers.
    needs_special_tokens = True
