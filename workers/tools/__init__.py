"""Tool calls: recognising them in a model's text, one parser per model family, in one registry.

A parser turns streamed text into content and complete calls (``Call``). It
holds back only what may be the start of a call (a partial marker), so
content streams as it comes and a half-parsed call never leaks as content;
text that looked like a call but does not parse is given back as content.
Adding a parser is one module here and one line in ``PARSERS``.
"""

from __future__ import annotations

from workers.tools.base import Call, Piece, ToolParser
from workers.tools.hermes import HermesParser
from workers.tools.llama3_json import Llama3JSONParser
from workers.tools.mistral import MistralParser
from workers.tools.pythonic import PythonicParser

#: ``--tool-parser`` names.
PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JSONParser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
}

__all__ = ["PARSERS", "Call", "Piece", "ToolParser"]
