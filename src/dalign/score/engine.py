"""The scoring engine: any set of metrics for rows of (prompt ids, response ids), one forward pass per model.

How a pass works. Forward hooks on the modules whose outputs are ``hidden_states[l]`` (``family_of(model)
.layer_output_module(l)``) copy out only the positions we need (the final token of each row, and for logit metrics
the positions that predict response tokens); the hook on the deepest needed module raises a private exception, so
the decoder stops there. Hidden-state-only metric sets therefore never run the blocks above the deepest layer, nor
the LM head. Logit metrics stop at the final norm (``hidden_states[L]``) and apply the LM head to the response
positions only, in chunks: the same numbers as the model's full forward, without its ``[B, T, V]`` logits tensor.

Conventions (the tests check each against an unpadded float64 reference):

- Rows are padded on either side, with an attention mask and explicit position ids (``cumsum(mask) - 1``), so a
  row's numbers do not depend on its batch neighbours or the padding side.
- The *final token* is the last real token of the row: the last response token, or, for an empty response, the
  last prompt token. Token ids are used as given (the sampler's ids end with EOS when generation stopped).
- Logit metrics average over the response tokens; a row with an empty response gets NaN for them.
- ``share_prompt``: rows with identical prompt ids run the prompt once; its KV cache is indexed out to the rows,
  which then run only their response tokens. Same numbers (up to float rounding), fewer FLOPs when prompts are long.
- ``aligned_hidden``: final-token states captured while sampling replace the aligned pass for those layers.
- Low precision: a bf16/fp16 model keeps an fp32 residual stream. With a LoRA adapter (base = adapter disabled),
  both sides run in one paired pass that shares the base's rounding (``dalign.score.paired``); ``paired=False``
  runs them apart, as a base checkpoint always is.

Only LoRA-style adapters are supported (they act inside the decoder modules); prompt-learning adapters are not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from dalign.models.family import cache_kwarg, family_of
from dalign.models.pair import ModelPair
from dalign.score import paired as paired_mod
from dalign.score.metrics import Metric, get_metric

Column = tuple[str, int | None]  # (metric, layer) — layer is None for metrics that are not per layer
Picks = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (batch rows, sequence positions)

LOGIT_CHUNK = 256  # response positions per LM-head matmul: bounds the [chunk, V] logits
# Positions per log-softmax and metric pass on CPU: [8, V] fp32 temporaries stay in L2 cache instead of streaming
# [256, V] ones through memory; KL scoring as a whole ran 1.11x faster (benchmarks/RESULTS.md, cpu_speed). GPUs take
# the whole chunk.
SOFTMAX_ROWS = 8
# Positions (rows x width) per paired pass, so its fp32 [rows, T, 1536] MLP activations stay near cache size. On
# the AMX Xeon, 16 candidates with 256-token responses ran 1.25x faster in passes of 4 than in one, but with 64-token
# responses 1.5x slower (the prompt pass repeats per pass): a budget in positions suits both.
PAIRED_POSITIONS = 2048


class ScoreError(ValueError):
    """Bad scoring input, phrased for the user (names the row and how to fix it)."""


class _StopForward(Exception):
    """Raised by the hook on the deepest needed module to end the forward pass there."""


@dataclass(frozen=True)
class ScoreRow:
    """One candidate: chat-formatted prompt ids and response ids. `key` names it in errors and seeds `random`."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    key: tuple = ()


@dataclass
class _SideOut:
    """What one model's pass returns for a batch."""

    final: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H] final-token states
    logit_states: torch.Tensor | None = None  # [P, H] normed states at positions predicting response tokens
    paired: bool = False  # the aligned side of a paired pass: its LM head is paired with the base's too


def resolve_layers(layers: Sequence[int] | str, num_layers: int) -> list[int]:
    """'all' -> 1..L; otherwise check each layer is in 1..L (hidden_states convention) and sort."""
    if isinstance(layers, str):
        if layers != "all":
            raise ScoreError(f"layers must be a list of ints or 'all', got {layers!r}")
        return list(range(1, num_layers + 1))
    bad = [int(x) for x in layers if not 1 <= int(x) <= num_layers]
    if bad:
        raise ScoreError(
            f"layer(s) {bad} out of range: valid layers are 1..{num_layers} for this model "
            f"(hidden_states[0] is the embedding output and is not scored; {num_layers} is the final normed output)"
        )
    return sorted({int(x) for x in layers})


def _capture(
    model: torch.nn.Module, inputs: dict, wanted: dict[int, Picks], paired: bool = False
) -> dict[int, dict[str, torch.Tensor]]:
    """Run the decoder until the deepest layer in `wanted`, returning the picked positions of each layer's output.
    `paired`: the batch is [base rows; aligned rows] of a bf16 LoRA pair, run as `dalign.score.paired` says."""
    fam = family_of(model)
    stop = max(wanted)
    store: dict[int, dict[str, torch.Tensor]] = {}
    handles = []

    def make_hook(layer: int, picks: Picks):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            store[layer] = {name: h[rows, cols] for name, (rows, cols) in picks.items()}  # gathers copy
            if layer == stop:
                raise _StopForward

        return hook

    for layer, picks in wanted.items():
        handles.append(fam.layer_output_module(layer).register_forward_hook(make_hook(layer, picks)))
    low = paired_mod.low_dtype(fam.model)
    if low is not None:
        # bf16/fp16 weights: the matmuls run in it, the residual stream stays fp32 (the embedding output is
        # upcast, every sublayer output adds onto fp32). A bf16 residual rounds the cosines the guard compares
        # (near 1) to ~4e-3; fp32 keeps bf16 vs fp32 choices alike (benchmarks/cpu_speed.py).
        handles.append(fam.model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.float()))
        if not paired:  # apart: autocast with single casts; paired: the paired linear layers cast themselves
            handles += _cast_matmul_inputs(fam, low)
            handles += _fp32_lora_sums(fam)
    autocast = low is not None and not paired
    try:
        with (
            torch.autocast(fam.model.device.type, dtype=low or torch.bfloat16, enabled=autocast),
            paired_mod.paired_linears(model, inputs["input_ids"].shape[0])
            if paired
            else contextlib.nullcontext(),
        ):
            fam.decoder()(**inputs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(wanted) - set(store))
    if missing:  # a family whose layer_output_module is wrong for this architecture
        raise RuntimeError(f"hooks for layers {missing} never fired on {type(fam.model).__name__}")
    return store


class _CastOnce:
    """Forward pre-hook: an fp32 activation entering a linear layer is cast to the weights' dtype once.

    Autocast would cast it again at every layer that reads it (q, k and v read one normed state; gate and up
    another), and PEFT would cast it back to fp32 for LoRA factors kept in fp32 (`load_pair` keeps them in the
    model's dtype). The values are the same as autocast's.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.src: torch.Tensor | None = None
        self.out: torch.Tensor | None = None

    def __call__(self, module, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            return None
        # Identity suffices: decoders make new tensors between reads, they do not edit them in place.
        if x is not self.src:
            self.src, self.out = x, x.to(self.dtype)
        return (self.out, *args[1:])


def _cast_matmul_inputs(fam, low: torch.dtype) -> list:
    """Hooks that feed the decoder's linear layers `low` inputs, cast once each (see `_CastOnce`), and make the
    rotary cos/sin `low` (as in a plain bf16 forward) so queries, keys and the KV cache stay `low` too."""
    cast = _CastOnce(low)
    handles = [
        m.register_forward_pre_hook(cast)
        for m in fam.decoder().modules()
        if isinstance(m, torch.nn.Linear) or hasattr(m, "base_layer")  # PEFT's LoRA wrappers
    ]
    rotary = getattr(fam.decoder(), "rotary_emb", None)
    if rotary is not None:

        def to_low(module, args, out):
            if isinstance(out, tuple) and all(isinstance(t, torch.Tensor) for t in out):
                return tuple(t.to(low) if t.is_floating_point() else t for t in out)
            return None

        handles.append(rotary.register_forward_hook(to_low))
    return handles


def _fp32_lora_sums(fam) -> list:
    """Hooks that upcast the frozen matmul's output in the LoRA wrappers of `Family.residual_writers`, so that
    W x + B A x is summed in fp32 before it joins the fp32 residual stream.

    The LoRA term is the whole difference between the aligned and the base pass; summed in bf16 it is rounded to
    2^-9 of |W x|, a large share of the term itself. The base pass (adapter off) gets the same values as before.
    """

    def upcast(module, args, out):
        return out.float() if isinstance(out, torch.Tensor) and out.dtype != torch.float32 else None

    return [
        m.base_layer.register_forward_hook(upcast) for m in fam.residual_writers() if hasattr(m, "base_layer")
    ]


def _lm_head(model: torch.nn.Module, paired: bool = False) -> Callable:
    """states -> raw logits in the head's dtype; `paired`: (aligned states, base states) -> (the base's raw
    logits, the head applied to the difference), the aligned side's logits being their sum (`dalign.score.paired`).
    `ScoreEngine._logp` upcasts, sums and softcaps them slice by slice: whole fp32 [chunk, V] copies would stream
    through memory (paired KL scoring spent 16 % of its time on them)."""
    head = family_of(model).model.get_output_embeddings()
    low = head.weight.dtype

    def apply(states: torch.Tensor) -> torch.Tensor:
        return head(states.to(low))  # fp32 residual states of a bf16 model (see _capture)

    def apply_paired(sa: torch.Tensor, sb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff = torch.nn.functional.linear((sa.float() - sb.float()).to(low), head.weight)  # the bias once
        return head(sb.to(low)), diff

    return apply_paired if paired else apply


def _softcap(model: torch.nn.Module) -> float | None:
    """The cap Gemma 2/3 squash their logits to after the LM head (`ScoreEngine._logp`), or None."""
    return getattr(family_of(model).model.config, "final_logit_softcapping", None)


class ScoreEngine:
    """Computes metric columns for rows; see the module docstring for the conventions.

    `metrics` are registered names (`dalign.score.metrics`), `layers` the latent layers (or 'all').
    """

    def __init__(
        self,
        pair: ModelPair,
        metrics: Sequence[str],
        layers: Sequence[int] | str = (12,),
        batch_size: int = 16,
        share_prompt: bool = False,
        padding_side: str = "right",
        seed: int = 0,
        paired: bool = True,
    ):
        if padding_side not in ("left", "right"):
            raise ScoreError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if batch_size < 1:
            raise ScoreError(f"batch_size must be >= 1, got {batch_size}")
        self.pair = pair
        self.metrics: list[Metric] = [get_metric(m) for m in dict.fromkeys(metrics)]
        if not self.metrics:
            raise ScoreError("no metrics requested")
        self.num_layers = pair.family.num_layers
        per_layer = any(m.per_layer for m in self.metrics)
        self.layers = resolve_layers(layers, self.num_layers) if per_layer else []
        if per_layer and not self.layers:
            raise ScoreError("latent metrics need at least one layer")
        if any(m.needs_base_logits or m.per_layer for m in self.metrics) and not pair.has_base:
            raise ScoreError("these metrics compare against a base model: give model.adapter or model.base")
        self._check_base_shape()
        self.batch_size = batch_size
        self.share_prompt = share_prompt
        self.padding_side = padding_side
        self.seed = seed
        # bf16/fp16 LoRA pairs run both sides in one batch sharing their rounding (dalign.score.paired)
        self.paired = paired and paired_mod.supported(pair)
        self.vocab = pair.family.model.get_input_embeddings().weight.shape[0]
        # each side's own logit cap: a base checkpoint may be of another family
        self.cap_a = _softcap(pair.model)
        self.cap_b = self.cap_a if pair.base_model is None else _softcap(pair.base_model)

    def _check_base_shape(self) -> None:
        if self.pair.base_model is None:
            return
        fa, fb = self.pair.family, family_of(self.pair.base_model)
        va = fa.model.get_input_embeddings().weight.shape[0]
        vb = fb.model.get_input_embeddings().weight.shape[0]
        if va != vb:
            raise ScoreError(
                f"aligned and base models have different vocabularies ({va} vs {vb} embeddings): the same token "
                f"ids mean different tokens; use a base with the aligned model's tokenizer"
            )
        if fa.num_layers != fb.num_layers:
            raise ScoreError(f"aligned model has {fa.num_layers} layers but base has {fb.num_layers}")

    # ---- public ------------------------------------------------------------------------------------------------
    @property
    def columns(self) -> list[Column]:
        out: list[Column] = []
        for m in self.metrics:
            out += [(m.name, layer) for layer in self.layers] if m.per_layer else [(m.name, None)]
        return out

    def score(
        self,
        rows: Sequence[ScoreRow],
        aligned_hidden: dict[int, torch.Tensor] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> dict[Column, np.ndarray]:
        """Score `rows`; returns {(metric, layer): float64 array aligned with rows}.

        `aligned_hidden` maps layer -> [len(rows), H] final-token states of the aligned model (captured while
        sampling); those layers skip the aligned pass. `progress(n)` is called after each batch of n rows.
        """
        # Keyless rows are named by position, so errors point at them and `random` differs between them.
        rows = [r if r.key else replace(r, key=(i,)) for i, r in enumerate(rows)]
        self._validate(rows, aligned_hidden)
        out = {c: np.full(len(rows), np.nan) for c in self.columns}
        for idx in self._batches(rows):
            batch = [rows[i] for i in idx]
            captured = {lay: h[idx] for lay, h in aligned_hidden.items()} if aligned_hidden else None
            for col, vals in self._score_batch(batch, captured).items():
                out[col][idx] = vals.detach().cpu().double().numpy()
            if progress:
                progress(len(idx))
        return out

    # ---- checks and batching -------------------------------------------------------------------------------
    def _validate(self, rows: Sequence[ScoreRow], aligned_hidden: dict[int, torch.Tensor] | None) -> None:
        for r in rows:
            name = r.key
            if len(r.prompt_ids) == 0:
                raise ScoreError(
                    f"row {name}: candidate has no prompt (empty prompt_ids); score (prompt, response) pairs — "
                    f"the final-token and response-position conventions need at least one prompt token"
                )
            ids = [*r.prompt_ids, *r.response_ids]
            bad = [t for t in ids if not 0 <= int(t) < self.vocab]
            if bad:
                raise ScoreError(
                    f"row {name}: token id {bad[0]} outside the model's vocabulary 0..{self.vocab - 1}; were the "
                    f"samples made with another tokenizer?"
                )
        for layer, h in (aligned_hidden or {}).items():
            if h.shape[0] != len(rows):
                raise ScoreError(f"aligned_hidden[{layer}] has {h.shape[0]} rows for {len(rows)} candidates")
            bad_rows = (~torch.isfinite(h).all(-1)).nonzero().flatten().tolist()
            if bad_rows:
                raise ScoreError(
                    f"captured hidden state hidden_l{layer} of row {rows[bad_rows[0]].key} is NaN/inf; "
                    f"resample that candidate or score without capture"
                )

    def _batches(self, rows: Sequence[ScoreRow]) -> list[list[int]]:
        """Index batches; long rows first and similar lengths together (less padding)."""
        if not self.share_prompt:
            order = sorted(
                range(len(rows)), key=lambda i: -(len(rows[i].prompt_ids) + len(rows[i].response_ids))
            )
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(tuple(int(t) for t in r.prompt_ids), []).append(i)
        ordered = sorted(groups.items(), key=lambda kv: -len(kv[0]))
        batches, cur = [], []
        for _, members in ordered:  # whole groups per batch, so a prompt runs once
            cur += members
            if len(cur) >= self.batch_size:
                batches.append(cur)
                cur = []
        return batches + ([cur] if cur else [])

    # ---- one batch -----------------------------------------------------------------------------------------
    def _score_batch(
        self, batch: list[ScoreRow], captured: dict[int, torch.Tensor] | None
    ) -> dict[Column, torch.Tensor]:
        hidden = [m for m in self.metrics if m.per_layer]
        token = [m for m in self.metrics if m.kind == "token"]
        need_a_logits = bool(token)
        need_b_logits = any(m.needs_base_logits for m in token)
        a_layers = [lay for lay in self.layers if not (captured and lay in captured)] if hidden else []
        b_layers = list(self.layers) if hidden else []

        out: dict[Column, torch.Tensor] = {}
        if self.paired and a_layers == b_layers and (b_layers or need_b_logits):
            a, b = self._side_pair(batch, b_layers, need_a_logits)
        else:
            a, b = self._sides_apart(batch, a_layers, b_layers, need_a_logits, need_b_logits)
        if hidden:
            dev = self.pair.device
            for layer in self.layers:
                ha = captured[layer].to(dev) if captured and layer in captured else a.final[layer]
                for m in hidden:  # no cast down: a captured fp32 state stays fp32 (metrics upcast both)
                    out[(m.name, layer)] = m.fn(ha, b.final[layer])
        if token:
            out.update(self._token_metrics(batch, token, a, b))
        keys = [r.key for r in batch]
        for m in self.metrics:
            if m.kind == "row":
                out[(m.name, None)] = m.fn(keys, self.seed)
        return out

    def _sides_apart(
        self, batch: list[ScoreRow], a_layers: list[int], b_layers: list[int], a_logits: bool, b_logits: bool
    ) -> tuple[_SideOut | None, _SideOut | None]:
        """One pass per side: the aligned model, then the base (the adapter disabled, or the base checkpoint)."""
        a = b = None
        if a_layers or a_logits:
            with self.pair.aligned() as model:
                a = self._side(model, batch, a_layers, a_logits, "aligned")
        if b_layers or b_logits:
            with self.pair.base() as model:
                b = self._side(model, batch, b_layers, b_logits, "base")
        return a, b

    def _side_pair(self, batch: list[ScoreRow], layers: list[int], logits: bool) -> tuple[_SideOut, _SideOut]:
        """Both sides in one paired pass over [batch; batch] (`dalign.score.paired`): row k is the base side of
        candidate k, row n + k its aligned side."""
        parts, cur, width = [], [], 0  # consecutive candidates, 2 x count x widest within PAIRED_POSITIONS
        for r in batch:
            w = len(r.response_ids) + (0 if self.share_prompt else len(r.prompt_ids))
            if cur and 2 * (len(cur) + 1) * max(width, w) > PAIRED_POSITIONS:
                parts.append(cur)
                cur, width = [], 0
            cur.append(r)
            width = max(width, w)
        parts.append(cur)
        sides: dict[str, list[_SideOut]] = {"a": [], "b": []}
        for part in parts:
            n, p = len(part), int(self._lengths(part).sum())
            with self.pair.aligned() as model:
                res = self._side(model, part + part, layers, logits, "aligned or base", paired=True)
            ls = res.logit_states
            sides["b"].append(
                _SideOut({k: h[:n] for k, h in res.final.items()}, None if ls is None else ls[:p])
            )
            sides["a"].append(
                _SideOut({k: h[n:] for k, h in res.final.items()}, None if ls is None else ls[p:])
            )

        def join(outs: list[_SideOut], paired: bool) -> _SideOut:
            final = {lay: torch.cat([x.final[lay] for x in outs]) for lay in layers}
            ls = None if outs[0].logit_states is None else torch.cat([x.logit_states for x in outs])
            return _SideOut(final, ls, paired)

        return join(sides["a"], True), join(sides["b"], False)

    def _side(
        self, model, batch: list[ScoreRow], layers: list[int], logits: bool, side: str, paired: bool = False
    ) -> _SideOut:
        fn = self._side_shared if self.share_prompt else self._side_padded
        res = fn(model, batch, layers, logits, paired)
        for layer, h in res.final.items():
            bad = (~torch.isfinite(h).all(-1)).nonzero().flatten().tolist()
            if bad:
                raise ScoreError(
                    f"{side} model: NaN/inf hidden state at layer {layer} for row {batch[bad[0]].key}; "
                    f"check the model's dtype (float16 overflows) and the row's tokens"
                )
        if res.logit_states is not None and not torch.isfinite(res.logit_states).all():
            bad_pos = int((~torch.isfinite(res.logit_states).all(-1)).nonzero().flatten()[0])
            row = int(torch.repeat_interleave(torch.arange(len(batch)), self._lengths(batch))[bad_pos])
            raise ScoreError(
                f"{side} model: NaN/inf final-norm state at a response position of row {batch[row].key}; "
                f"check the model's dtype (float16 overflows) and the row's tokens"
            )
        return res

    @staticmethod
    def _lengths(batch: list[ScoreRow]) -> torch.Tensor:
        return torch.tensor([len(r.response_ids) for r in batch], dtype=torch.long)

    def _side_padded(
        self, model, batch: list[ScoreRow], layers: list[int], logits: bool, paired: bool = False
    ) -> _SideOut:
        dev = self.pair.device
        seqs = [[int(t) for t in (*r.prompt_ids, *r.response_ids)] for r in batch]
        n = torch.tensor([len(s) for s in seqs])
        p = torch.tensor([len(r.prompt_ids) for r in batch])
        width = int(n.max())
        offset = width - n if self.padding_side == "left" else torch.zeros_like(n)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, int(offset[b]) : int(offset[b]) + len(s)] = torch.tensor(s)
        cols = torch.arange(width)[None, :]
        mask = (cols >= offset[:, None]) & (cols < (offset + n)[:, None])
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        rows_idx = torch.arange(len(batch))
        final_pick = (rows_idx.to(dev), (offset + n - 1).to(dev))
        wanted: dict[int, Picks] = {layer: {"final": final_pick} for layer in layers}
        if logits:
            r = n - p
            lrows = torch.repeat_interleave(rows_idx, r)
            # Position j-1 predicts token j: response tokens p..n-1 are predicted by positions p-1..n-2.
            within = torch.arange(int(r.sum())) - torch.repeat_interleave(r.cumsum(0) - r, r)
            lcols = torch.repeat_interleave(offset + p - 1, r) + within
            wanted.setdefault(self.num_layers, {})["logit"] = (lrows.to(dev), lcols.to(dev))
        if not wanted:
            return _SideOut()
        inputs = {
            "input_ids": ids.to(dev),
            "attention_mask": mask.long().to(dev),
            "position_ids": pos.to(dev),
        }
        inputs["use_cache"] = False
        with torch.inference_mode():
            got = _capture(model, inputs, wanted, paired)
        return _SideOut(
            final={layer: got[layer]["final"] for layer in layers},
            logit_states=got[self.num_layers]["logit"] if logits else None,
        )

    def _side_shared(
        self, model, batch: list[ScoreRow], layers: list[int], logits: bool, paired: bool = False
    ) -> _SideOut:
        """Prompt pass once per distinct prompt (left-padded), then the responses on the indexed-out KV cache.
        `paired` (batch = [rows; rows]): each half's prompts run apart, so prompt g pairs with prompt G + g."""
        from transformers import DynamicCache

        dev = self.pair.device
        keys: dict[tuple, int] = {}
        half = len(batch) // 2 if paired else len(batch)
        group = torch.tensor(
            [keys.setdefault((i >= half, *map(int, r.prompt_ids)), len(keys)) for i, r in enumerate(batch)]
        )
        prompts = [k[1:] for k in keys]
        plen = torch.tensor([len(pr) for pr in prompts])
        pw = int(plen.max())
        pids = torch.zeros(len(prompts), pw, dtype=torch.long)
        for g, pr in enumerate(prompts):
            pids[g, pw - len(pr) :] = torch.tensor(pr)
        pmask = torch.arange(pw)[None, :] >= (pw - plen)[:, None]
        ppos = (pmask.long().cumsum(-1) - 1).clamp(min=0)
        wanted_layers = sorted(set(layers) | ({self.num_layers} if logits else set()))
        if not wanted_layers:
            return _SideOut()
        g_idx = torch.arange(len(prompts), device=dev)
        last = (g_idx, torch.full((len(prompts),), pw - 1, device=dev))
        fam = family_of(model)
        cache = DynamicCache(config=fam.model.config)
        ckw = cache_kwarg(fam.model)
        with torch.inference_mode():
            got_p = _capture(
                model,
                {
                    "input_ids": pids.to(dev),
                    "attention_mask": pmask.long().to(dev),
                    "position_ids": ppos.to(dev),
                    "use_cache": True,
                    ckw: cache,
                },
                {layer: {"last": last} for layer in wanted_layers},
                paired,
            )
        r = self._lengths(batch)
        live = (r > 0).nonzero().flatten()  # rows with a response to run
        got_r: dict[int, dict[str, torch.Tensor]] = {}
        if len(live):
            rl = r[live]
            rw = int(rl.max())
            rids = torch.zeros(len(live), rw, dtype=torch.long)
            for m, b in enumerate(live.tolist()):
                rids[m, : int(rl[m])] = torch.tensor([int(t) for t in batch[b].response_ids])
            rmask = torch.arange(rw)[None, :] < rl[:, None]
            mask = torch.cat([pmask[group[live]], rmask], dim=1)
            rpos = plen[group[live]][:, None] + torch.arange(rw)[None, :]
            cache.batch_select_indices(
                group[live].to(dev)
            )  # one cache row per candidate (a copy, not a view)
            m_idx = torch.arange(len(live))
            wanted: dict[int, Picks] = {
                layer: {"final": (m_idx.to(dev), (rl - 1).to(dev))} for layer in layers
            }
            if logits:
                k = (
                    rl - 1
                )  # positions 0..r-2 predict tokens 1..r-1; token 0 is predicted by the prompt's last
                lrows = torch.repeat_interleave(m_idx, k)
                lcols = torch.arange(int(k.sum())) - torch.repeat_interleave(k.cumsum(0) - k, k)
                wanted.setdefault(self.num_layers, {})["logit"] = (lrows.to(dev), lcols.to(dev))
            with torch.inference_mode():
                got_r = _capture(
                    model,
                    {
                        "input_ids": rids.to(dev),
                        "attention_mask": mask.long().to(dev),
                        "position_ids": rpos.to(dev),
                        "use_cache": True,
                        ckw: cache,
                    },
                    wanted,
                    paired,
                )
        slot = torch.full((len(batch),), -1, dtype=torch.long)
        slot[live] = torch.arange(len(live))
        final = {}
        for layer in layers:
            h = got_p[layer]["last"][group.to(dev)].clone()
            if len(live):
                h[live.to(dev)] = got_r[layer]["final"]
            final[layer] = h
        states = None
        if logits:
            last_l = got_p[self.num_layers]["last"]
            pieces = []
            start = 0
            resp = got_r.get(self.num_layers, {}).get("logit")
            for b in range(len(batch)):
                if r[b] == 0:
                    continue
                k = int(r[b]) - 1
                pieces.append(last_l[int(group[b])][None])
                pieces.append(resp[start : start + k])
                start += k
            states = torch.cat(pieces) if pieces else last_l[:0]
        return _SideOut(final=final, logit_states=states)

    # ---- logit metrics ---------------------------------------------------------------------------------------
    def _token_metrics(self, batch: list[ScoreRow], token: list[Metric], a: _SideOut, b: _SideOut | None):
        r = self._lengths(batch)
        dev = self.pair.device
        row_of = torch.repeat_interleave(torch.arange(len(batch)), r).to(dev)
        targets = torch.tensor([int(t) for x in batch for t in x.response_ids], dtype=torch.long, device=dev)
        sums = {m.name: torch.zeros(len(batch), dtype=torch.float64, device=dev) for m in token}
        need_b = any(m.needs_base_logits for m in token)
        total = int(r.sum())
        step = SOFTMAX_ROWS if dev.type == "cpu" else LOGIT_CHUNK
        with torch.inference_mode():
            for s in range(0, total, LOGIT_CHUNK):
                e = min(s + LOGIT_CHUNK, total)
                zb = zd = None
                if a.paired and need_b:  # one shared head (`paired.supported`), its rounding shared too
                    with self.pair.aligned() as model:
                        zb, zd = _lm_head(model, paired=True)(a.logit_states[s:e], b.logit_states[s:e])
                    za = zb
                else:  # re-enter the contexts per chunk: the base head differs when the adapter trains lm_head
                    with self.pair.aligned() as model:
                        za = _lm_head(model)(a.logit_states[s:e])
                    if need_b:
                        with self.pair.base() as model:
                            zb = _lm_head(model)(b.logit_states[s:e])
                for u in range(0, e - s, step):
                    v = min(u + step, e - s)
                    la = self._logp(za[u:v], self.cap_a, None if zd is None else zd[u:v])
                    lb = self._logp(zb[u:v], self.cap_b) if zb is not None else None
                    for m in token:
                        vals = m.fn(la, lb if m.needs_base_logits else None, targets[s + u : s + v])
                        sums[m.name].index_add_(0, row_of[s + u : s + v], vals.double())
        out = {}
        count = r.to(dev).double()
        for m in token:
            mean = torch.where(
                count > 0, sums[m.name] / count.clamp(min=1), torch.full_like(count, float("nan"))
            )
            out[(m.name, None)] = m.finalize(mean) if m.finalize else mean
        return out

    @staticmethod
    def _logp(logits: torch.Tensor, cap: float | None, diff: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities of raw LM-head logits (+ `diff`, a paired head's aligned side), softcapped to `cap` as
        the model does. At least fp32; fp64 models (the tests' reference) keep fp64."""
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if diff is not None:
            z = z + diff.to(z.dtype)
        if cap:
            z = torch.tanh(z / cap) * cap
        return torch.log_softmax(z, dim=-1)


def retokenize(
    tokenizer,
    prompt: str,
    response_ids: Sequence[int],
    system_prompt: str | None = None,
    think_prefix: bool = False,
) -> tuple[list[int], list[int]]:
    """The paper's text round-trip: decode the response without special tokens, re-apply the chat template to
    (prompt, response), re-tokenize, and split at the generation prompt. For reproducing their numbers only:
    the final token becomes the template's end-of-turn suffix rather than the generated one.
    """
    from dalign.models.chat import THINK_OPEN, render_prompt

    text = tokenizer.decode(list(response_ids), skip_special_tokens=True)
    if think_prefix:
        text = THINK_OPEN + "\n" + text
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": text},
    ]
    full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    head = tokenizer(render_prompt(tokenizer, prompt, system_prompt, False), add_special_tokens=False)[
        "input_ids"
    ]
    # Split at the longest common prefix: BPE merges across the boundary can shift it by a token.
    k = 0
    while k < min(len(head), len(full) - 1) and head[k] == full[k]:
        k += 1
    return list(full[:k]), list(full[k:])


__all__ = ["Column", "ScoreEngine", "ScoreError", "ScoreRow", "resolve_layers", "retokenize"]
