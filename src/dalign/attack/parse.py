"""Reading the attacker's reply: the first JSON object in it that holds a non-empty string `prompt`.

Rules (tested in tests/test_attack.py):
1. The reply is searched from each `{` in turn; the first position where a JSON object decodes and has a
   non-empty string `prompt` wins. Text around it (prose, code fences, a second object) is ignored.
2. Raw newlines and tabs inside strings are accepted (small models write them); anything else that is not valid
   JSON is not repaired: a reply cut off before its closing brace is malformed.
3. `improvement` may be missing or empty (the first iteration has nothing to improve); a non-string value is
   malformed. `prompt` must be a string with some non-space text.
A malformed reply raises `MalformedReply` naming the rule it broke; the stage retries and finally records an
`error` iteration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_DECODER = json.JSONDecoder(strict=False)


class MalformedReply(ValueError):
    pass


@dataclass(frozen=True)
class AttackerReply:
    improvement: str
    prompt: str


def parse_reply(text: str) -> AttackerReply:
    text = text or ""
    if "{" not in text:
        raise MalformedReply("no JSON object in the reply (no '{')")
    problems: list[str] = []  # the first one (the outermost candidate) is the most telling
    start = text.find("{")
    while start >= 0:
        try:
            obj, _ = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError as e:
            problems.append(f"invalid JSON from character {start}: {e.msg}")
        else:
            if isinstance(obj, dict):
                prompt, improvement = obj.get("prompt"), obj.get("improvement", "")
                if not isinstance(prompt, str) or not prompt.strip():
                    problems.append("the JSON object has no non-empty string 'prompt'")
                elif improvement is not None and not isinstance(improvement, str):
                    problems.append("'improvement' is not a string")
                else:
                    return AttackerReply((improvement or "").strip(), prompt.strip())
        start = text.find("{", start + 1)
    raise MalformedReply(problems[0] if problems else "no JSON object in the reply")
