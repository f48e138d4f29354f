"""Pythonic calls (Llama 3.2/4 style): the whole output is a Python list of calls, ``[get(city="Paris"), ...]``,
with literal arguments only."""

from __future__ import annotations

import ast
import json

from workers.tools.base import Call, WholeOutputParser


class PythonicParser(WholeOutputParser):
    opener = ("[",)

    def parse(self, payload: str) -> list[Call] | None:
        try:
            tree = ast.parse(payload, mode="eval").body
        except SyntaxError:
            return None
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args
                    and node.func.id in self.names):
                return None
            try:
                args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
            except ValueError:
                return None
            calls.append(Call(node.func.id, json.dumps(args, ensure_ascii=False)))
        return calls
