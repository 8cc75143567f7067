"""Chat formatting through the tokenizer's own chat template."""

from __future__ import annotations

import warnings

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class PromptTooLong(UserWarning):
    pass


def render_prompt(
    tokenizer, prompt: str, system_prompt: str | None = None, think_prefix: bool = False
) -> str:
    """Chat-formatted text up to where the assistant starts (plus '<think>\\n' for reasoning students)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    return render_messages(tokenizer, messages, think_prefix)


def render_messages(tokenizer, messages: list[dict], think_prefix: bool = False) -> str:
    """A whole conversation ({role, content} dicts) formatted up to where the assistant's next turn starts."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text + (THINK_OPEN + "\n" if think_prefix else "")


def prompt_ids(
    tokenizer,
    prompt: str,
    system_prompt: str | None = None,
    think_prefix: bool = False,
    max_tokens: int | None = None,
) -> tuple[list[int], bool]:
    """Token ids of the formatted prompt; a too-long user message is cut from the left (keeps the question end).

    Returns (ids, truncated).
    """
    ids = tokenizer(render_prompt(tokenizer, prompt, system_prompt, think_prefix), add_special_tokens=False)[
        "input_ids"
    ]
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, False
    user_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    overhead = len(ids) - len(user_ids)
    keep = max_tokens - overhead
    if keep <= 0:
        raise ValueError(
            f"the chat template alone needs {overhead} tokens, more than the {max_tokens} available"
        )
    # Cut the user text, not the template, so the final tokens stay the assistant header.
    while True:
        cut = tokenizer.decode(user_ids[-keep:])
        ids = tokenizer(render_prompt(tokenizer, cut, system_prompt, think_prefix), add_special_tokens=False)[
            "input_ids"
        ]
        if len(ids) <= max_tokens or keep <= 1:
            break
        keep -= len(ids) - max_tokens
    warnings.warn(
        f"prompt of {len(user_ids)} tokens cut from the left to fit {max_tokens} tokens",
        PromptTooLong,
        stacklevel=2,
    )
    return ids, True
