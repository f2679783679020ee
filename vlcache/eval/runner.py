"""Generate one sample's answers under a list of compression configs, and score them.

Contract:
* :func:`make_configs` always puts ``full`` at budget 1.0 first (the reference), then every other
  method at every budget, in the order given, without duplicates.
* :func:`evaluate_sample` runs the processor once for the sample, then, for each config, greedy
  :func:`vlcache.generate` with ``max_new_tokens`` and returns one :class:`Record` per config, in
  config order: the decoded answer, its score under the sample's metric, and the compression stats.
* Follow-up protocol (``followup=True``; the sample must carry ``followup``): inside one
  ``VLCache(config).apply(model)`` block, prefill ``<image> Q1`` with compression, generate the
  first answer, then feed the last generated token (which ``generate`` never feeds into the cache)
  followed by `` Q2`` (tokenised without special tokens) on the compressed cache, at positions
  that keep counting from the full sequence length, and decode greedily with
  :func:`vlcache.hf.continuation.continue_greedy`. Both answers are scored; the follow-up is
  appended even when the first answer ended with the end-of-sequence token.
* Prompts: ``digits`` style is ``tasks.format_prompt(question)`` and the answer is the word after
  ``=``; ``chat`` style is :func:`vlcache.hf.inputs.image_prompt` (the serving engines' too): the
  processor's chat template when it has one, else ``<image>\\n question``; the whole stripped
  generation is the answer.
* Text tasks (``passkey`` style, :func:`evaluate_text_sample`): the prompt is the task's
  instruction, the sample's context and its question, as one user turn of the tokenizer's chat
  template when it has one (else the plain text), then the answer prefix; the answer is
  ``passkey.parse_answer`` of the generation. The context's tokens are the layout's span (what an
  image is in a VLM prompt), so the question after it is the post-vision window: VL-Cache scores
  with it, TGV-KV ranks the context by the question's attention. The prompt is prefilled once
  (:func:`vlcache.hf.capture_prefill`, query rows from the smallest ``query_start`` of the
  configs' methods) and every config compresses and decodes from that capture
  (:func:`vlcache.hf.generate_from_prefill`): the tokens ``vlcache.generate`` gives with the same
  spans, at one prefill per sample instead of one per config.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vlcache.config import CompressionConfig, settings_read_by
from vlcache.eval.datasets import TEXT_STYLES, EvalSample
from vlcache.eval.metrics import score
from vlcache.hf.inputs import has_chat_template, image_prompt, move_inputs
from vlcache.hf.loading import LoadedModel

REFERENCE = "full"


@dataclass
class Record:
    """One sample answered under one config.

    Attributes:
        sample, kind: the sample's index and question kind. method, budget: the config.
        prediction: the parsed answer; text: the decoded generation (special tokens dropped);
        tokens: the generated token ids. score: in [0, 1] under the sample's metric.
        kv_kept: ``stats.kept_fraction`` (kept prompt KV entries / all); kv_bytes_before / after:
        the prompt cache's bytes before and after compression. seconds: wall time of this config
        (text tasks: after the shared prefill: scoring, compaction and decoding).
        followup_*: the same for the follow-up question (follow-up mode only, else None).
    """

    sample: int
    kind: str
    method: str
    budget: float
    prediction: str
    text: str
    tokens: list[int]
    score: float
    kv_kept: float
    kv_bytes_before: int
    kv_bytes_after: int
    seconds: float
    followup_kind: str | None = None
    followup_prediction: str | None = None
    followup_text: str | None = None
    followup_tokens: list[int] | None = None
    followup_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.followup_score is None:
            d = {k: v for k, v in d.items() if not k.startswith("followup_")}
        return d


def make_configs(methods: Sequence[str], budgets: Sequence[float], seed: int = 0) -> list[CompressionConfig]:
    """``full`` at 1.0, then each other method × each budget (config errors raise ValueError).
    ``seed`` goes to the methods that have a ``seed`` setting (``random``)."""

    def config(method: str, budget: float) -> CompressionConfig:
        return CompressionConfig.create(method, budget, **settings_read_by(method, {"seed": seed}))

    configs = [config(REFERENCE, 1.0)]
    seen = {(REFERENCE, 1.0)}
    for method in methods:
        if method == REFERENCE:
            continue
        for budget in budgets:
            if (method, float(budget)) not in seen:
                seen.add((method, float(budget)))
                configs.append(config(method, float(budget)))
    return configs


def build_prompt(processor: Any, question: str, style: str) -> str:
    """The text handed to the processor with the image (see the module docstring)."""
    if style == "digits":
        from vlcache.digits import format_prompt

        return format_prompt(question)
    if style != "chat":
        raise ValueError(f"unknown prompt style {style!r}")
    return image_prompt(processor, question, separator="\n")


def parse_prediction(text: str, style: str) -> str:
    """The answer inside a decoded generation."""
    if style == "digits":
        from vlcache.digits import parse_answer

        return parse_answer(text)
    if style == "passkey":
        from vlcache.eval import passkey

        return passkey.parse_answer(text)
    return text.strip()


_CONTEXT_MARK = "<<vlcache:context>>"


def build_text_prompt(tokenizer: Any, sample: EvalSample, style: str) -> tuple[str, tuple[int, int]]:
    """A text task's prompt and the character span ``[start, end)`` of the sample's context in it."""
    if style != "passkey":
        raise ValueError(f"unknown text prompt style {style!r}; text styles: {', '.join(TEXT_STYLES)}")
    if sample.context is None:
        raise ValueError(f"sample {sample.index} has no context")
    from vlcache.eval.passkey import ANSWER_PREFIX, INSTRUCTION

    content = f"{INSTRUCTION}\n\n{_CONTEXT_MARK}\n\n{sample.question}"
    if has_chat_template(tokenizer):
        conversation = [{"role": "user", "content": content}]
        rendered = str(tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
        text = rendered + ANSWER_PREFIX
    else:
        text = f"{content}\n{ANSWER_PREFIX}"
    if text.count(_CONTEXT_MARK) != 1:
        raise ValueError("the tokenizer's chat template does not keep the user message verbatim")
    start = text.index(_CONTEXT_MARK)
    return text.replace(_CONTEXT_MARK, sample.context), (start, start + len(sample.context))


def encode_text_prompt(tokenizer: Any, sample: EvalSample, style: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of :func:`build_text_prompt` and the token span ``[start, end)`` of the context.

    The prompt is tokenised whole (special tokens added only without a chat template, which carries
    its own); tokens that overlap the context's characters make up its span. Tokenizers without
    offsets (slow ones) tokenise the text before, in and after the context separately.
    """
    text, (c0, c1) = build_text_prompt(tokenizer, sample, style)
    special = not has_chat_template(tokenizer)
    try:
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    except NotImplementedError:
        before = list(tokenizer(text[:c0], add_special_tokens=special)["input_ids"])
        inside = list(tokenizer(text[c0:c1], add_special_tokens=False)["input_ids"])
        after = list(tokenizer(text[c1:], add_special_tokens=False)["input_ids"])
        return before + inside + after, (len(before), len(before) + len(inside))
    ids = [int(i) for i in enc["input_ids"]]
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < c1 and b > c0]
    if not inside:
        raise ValueError(f"sample {sample.index}: no token of the context found in the tokenised prompt")
    return ids, (inside[0], inside[-1] + 1)


def prepare_inputs(loaded: LoadedModel, sample: EvalSample, style: str) -> dict[str, Any]:
    """Processor outputs for the sample (batch 1) on the model's device; floats in its dtype."""
    prompt = build_prompt(loaded.processor, sample.question, style)
    batch = loaded.processor(images=sample.load_image(), text=prompt, return_tensors="pt")
    return move_inputs(batch, loaded.device, loaded.dtype)


def evaluate_sample(
    loaded: LoadedModel,
    sample: EvalSample,
    configs: Sequence[CompressionConfig],
    *,
    style: str,
    max_new_tokens: int,
    followup: bool = False,
) -> list[Record]:
    """Answer ``sample`` under every config (one :class:`Record` each, in order)."""
    if followup and sample.followup is None:
        raise ValueError(f"sample {sample.index} has no follow-up question")
    inputs = prepare_inputs(loaded, sample, style)
    records = []
    for config in configs:
        t0 = time.perf_counter()
        if followup:
            assert sample.followup is not None
            tokens, stats, f_tokens = _generate_followup(
                loaded, inputs, config, sample.followup.question, max_new_tokens
            )
        else:
            import vlcache

            result = vlcache.generate(loaded.model, inputs, config, max_new_tokens=max_new_tokens)
            tokens, stats, f_tokens = result.new_tokens.tolist(), result.stats, None
        seconds = time.perf_counter() - t0
        record = _record(loaded, sample, config, style, tokens, stats, seconds)
        if f_tokens is not None and sample.followup is not None:
            second = sample.followup
            record.followup_kind = second.kind
            record.followup_text = loaded.tokenizer.decode(f_tokens, skip_special_tokens=True)
            record.followup_prediction = parse_prediction(record.followup_text, style)
            record.followup_tokens = f_tokens
            record.followup_score = score(second.metric, record.followup_prediction, second.answers)
        records.append(record)
    return records


def _record(
    loaded: LoadedModel,
    sample: EvalSample,
    config: CompressionConfig,
    style: str,
    tokens: list[int],
    stats: Any,
    seconds: float,
) -> Record:
    """Decode, parse and score one generation."""
    text = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    prediction = parse_prediction(text, style)
    return Record(
        sample=sample.index,
        kind=sample.kind,
        method=config.method,
        budget=config.budget,
        prediction=prediction,
        text=text,
        tokens=tokens,
        score=score(sample.metric, prediction, sample.answers),
        kv_kept=float(stats.kept_fraction),
        kv_bytes_before=int(stats.kv_bytes_before),
        kv_bytes_after=int(stats.kv_bytes_after),
        seconds=seconds,
    )


def _generate_followup(
    loaded: LoadedModel, inputs: dict[str, Any], config: CompressionConfig, question: str, max_new_tokens: int
) -> tuple[list[int], Any, list[int]]:
    """First answer, its stats and the follow-up answer's tokens (see the module docstring)."""
    import torch

    from vlcache.hf.continuation import continue_greedy
    from vlcache.hf.session import VLCache

    model = loaded.model
    prompt_len = inputs["input_ids"].shape[-1]
    q2 = loaded.tokenizer(f" {question}", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with VLCache(config).apply(model) as session, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
        sequences = out.sequences
        new_ids = torch.cat([sequences[:, -1:], q2.to(sequences.device)], dim=1)
        second = continue_greedy(
            model,
            out.past_key_values,
            new_ids,
            start_position=sequences.shape[1] - 1,
            max_new_tokens=max_new_tokens,
            eos_token_id=loaded.eos_token_id,
        )
    if session.stats is None:
        raise RuntimeError("the model ran no prefill through its text decoder; is it a supported model?")
    return sequences[0, prompt_len:].tolist(), session.stats, second.tolist()


def evaluate_text_sample(
    loaded: LoadedModel,
    sample: EvalSample,
    configs: Sequence[CompressionConfig],
    *,
    style: str,
    max_new_tokens: int,
) -> tuple[list[Record], dict[str, Any]]:
    """Answer a text sample under every config from one prefill (see the module docstring).

    Returns the records (in config order) and the sample's facts: ``prompt_tokens``,
    ``context_span`` (token positions) and ``prefill_seconds``.
    """
    import torch

    from vlcache.hf import capture_prefill, generate_from_prefill
    from vlcache.methods import PromptLayout, get_method

    ids, span = encode_text_prompt(loaded.tokenizer, sample, style)
    if span[1] >= len(ids):
        raise ValueError(f"sample {sample.index}: nothing follows the context, so there is no question window")
    layout = PromptLayout(len(ids), (span,))
    methods = [get_method(c) for c in configs]
    query_start = min((m.query_start(layout) for m in methods if m.compresses), default=len(ids) - 1)
    input_ids = torch.tensor([ids], device=loaded.device)
    t0 = time.perf_counter()
    prefill = capture_prefill(loaded.model, {"input_ids": input_ids}, spans=(span,), query_start=query_start)
    prefill_seconds = time.perf_counter() - t0
    records = []
    for config in configs:
        t0 = time.perf_counter()
        result = generate_from_prefill(
            loaded.model, prefill, config, max_new_tokens=max_new_tokens, eos_token_id=loaded.eos_token_id
        )
        seconds = time.perf_counter() - t0
        records.append(_record(loaded, sample, config, style, result.new_tokens.tolist(), result.stats, seconds))
    info = {"prompt_tokens": len(ids), "context_span": list(span), "prefill_seconds": prefill_seconds}
    return records, info
