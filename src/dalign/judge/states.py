"""Mean-pooled hidden states of a chat-formatted (prompt, answer) pair: the content judge's features.

Text: the model's chat template with the user prompt (cut from the left to `max_prompt_tokens`: the request is
usually at the end of a long jailbreak template) and the start of the answer (its first `max_answer_tokens`
tokens: whether an answer gives harmful help shows early, and long answers would dominate the cost). A tokenizer
without a chat template (a base model as the feature model) gets a plain transcript instead, `PLAIN_HEAD` after its
BOS token: the probe needs the same layout in training and judging, not instruction following. Per layer we
average the states over the answer tokens and, separately, over the prompt part; the feature is the two means side
by side. The forward pass stops after the deepest requested layer, so only those blocks run.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from dalign.models.chat import render_prompt
from dalign.models.family import family_of

PLAIN_HEAD = "User: {prompt}\nAssistant:\n"


class _Stop(Exception):
    """Raised by the deepest layer's hook: the blocks after it are not needed."""


def pair_ids(
    tok, prompt: str, answer: str, max_prompt_tokens: int, max_answer_tokens: int
) -> tuple[list, int]:
    """(token ids, index where the answer starts) of the chat-formatted, truncated pair."""
    user = tok(prompt, add_special_tokens=False)["input_ids"]
    if len(user) > max_prompt_tokens:
        prompt = tok.decode(user[-max_prompt_tokens:])
    if tok.chat_template:
        text = render_prompt(tok, prompt)
    else:
        text = (tok.bos_token or "") + PLAIN_HEAD.format(prompt=prompt)
    head = tok(text, add_special_tokens=False)["input_ids"]
    body = tok(answer, add_special_tokens=False)["input_ids"][:max_answer_tokens]
    return head + body, len(head)


@torch.inference_mode()
def pooled_states(
    model,
    tok,
    pairs: list[tuple[str, str]],
    layers: list[int],
    *,
    max_prompt_tokens: int = 64,
    max_answer_tokens: int = 128,
    batch_size: int = 8,
    progress=None,
) -> np.ndarray:
    """float32 array (len(pairs), len(layers), 2 * hidden): [answer mean, prompt mean] per layer.

    Every answer must be non-empty (the judge labels empty answers `error` before asking for features).
    `progress(n)` is called after each batch with the number of pairs done in it.
    """
    fam = family_of(model)
    device = next(model.parameters()).device
    encoded = [pair_ids(tok, p, a, max_prompt_tokens, max_answer_tokens) for p, a in pairs]
    if any(len(ids) == start for ids, start in encoded):
        raise ValueError("pooled_states needs a non-empty answer for every pair")
    order = sorted(range(len(pairs)), key=lambda i: len(encoded[i][0]))  # similar lengths share a batch
    hidden = model.config.hidden_size
    out = np.zeros((len(pairs), len(layers), 2 * hidden), dtype=np.float32)
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)
    hooks = []
    for layer in set(layers):

        def hook(_mod, _inp, output, layer=layer):
            captured[layer] = (output[0] if isinstance(output, tuple) else output).float()
            if layer == deepest:
                raise _Stop

        hooks.append(fam.layer_output_module(layer).register_forward_hook(hook))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    try:
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            width = max(len(encoded[i][0]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            answer = torch.zeros((len(rows), width))
            head = torch.zeros((len(rows), width))
            for j, i in enumerate(rows):
                seq, start = encoded[i]
                ids[j, : len(seq)] = torch.tensor(seq)
                head[j, :start] = 1
                answer[j, start : len(seq)] = 1
            mask = (head + answer).long()
            with contextlib.suppress(_Stop):
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            # Right padding is safe here: causal attention never lets a real token see the padding after it.
            for k, layer in enumerate(layers):
                h = captured[layer].cpu()
                for w, part in ((answer, 0), (head, 1)):
                    mean = (h * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
                    out[rows, k, part * hidden : (part + 1) * hidden] = mean.numpy()
            if progress is not None:
                progress(len(rows))
    finally:
        for h in hooks:
            h.remove()
    return out


def answer_mean(x: np.ndarray) -> np.ndarray:
    """The answer-token half of `pooled_states` features (the content probe reads only the answer)."""
    return x[..., : x.shape[-1] // 2]


def layer_answer_means(x: np.ndarray) -> np.ndarray:
    """(pairs, layers * hidden): the answer-token means of every layer of `pooled_states`, side by side."""
    return answer_mean(x).reshape(len(x), -1)
