"""Hermes-style calls (Qwen, Hermes, many others): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""

from __future__ import annotations

from workers.tools.base import MarkerParser


class HermesParser(MarkerParser):
    start, end = "<tool_call>", "</tool_call>"
