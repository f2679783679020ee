"""The two bundled checkpoints, loaded offline as a user would load them.

* ``llava-tiny`` (the default everywhere): its question tokens route to the asked cells at prefill,
  as a real VLM's question looks at the region it asks about; the answer is computed in the prompt.
* ``llava-tiny-late``: the stress case, a model that reads the image only while answering (from the
  generated ``=``), so that scorers reading prompt attention are blind on it.

Each answers a test-split sample as well as its training run measured on the val split, reads the
asked cell, and (the premise of VL-Cache, SnapKV and TGV-KV) only ``llava-tiny``'s question tokens
put more attention on the asked cell than a uniform spread over the image would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlcache.cli.eval import main
from vlcache.digits import DigitScenes, format_prompt, parse_answer
from vlcache.hf.loading import bundled_path

MODELS = ("llava-tiny", "llava-tiny-late")


def _needs(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not (bundled_path(name) / "config.json").is_file(), reason=f"bundled {name} not trained yet"
    )


BUNDLED = [pytest.param(name, marks=_needs(name)) for name in MODELS]


def _load(name: str, attn: str = "sdpa"):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = bundled_path(name)
    model = LlavaForConditionalGeneration.from_pretrained(
        path, attn_implementation={"text_config": attn, "vision_config": "sdpa"}
    ).eval()
    return model, AutoProcessor.from_pretrained(path)


def test_both_bundled_models_fit_in_20_mb() -> None:
    sizes = [f.stat().st_size for name in MODELS for f in Path(bundled_path(name)).glob("*") if f.is_file()]
    assert sum(sizes) <= 20 * 2**20


@pytest.mark.parametrize("name", BUNDLED)
def test_the_shipped_files_have_the_format_of_vlcache_hf_tiny(name: str) -> None:
    """:mod:`vlcache.hf.tiny`'s ``bundled_processor`` / ``bundled_llava`` (what the training script
    builds, and the tests' random checkpoints) are the shipped model's format: the same tokenizer,
    the same processor outputs for a question, the same config and weight names and shapes; and
    both the digits task's prompt and ``image_prompt`` give the shipped processor the same text."""
    from transformers import AutoConfig, AutoProcessor

    from vlcache.digits import IMAGE_SIZE, vocabulary
    from vlcache.hf.inputs import image_prompt
    from vlcache.hf.tiny import bundled_llava, bundled_processor

    path = bundled_path(name)
    built, shipped = bundled_processor(vocabulary(), IMAGE_SIZE), AutoProcessor.from_pretrained(path)
    assert built.tokenizer.get_vocab() == shipped.tokenizer.get_vocab()
    sample = DigitScenes("test", seed=0).sample(0)
    assert image_prompt(shipped, sample.question) == format_prompt(sample.question)
    a = built(images=sample.image, text=format_prompt(sample.question), return_tensors="pt")
    b = shipped(images=sample.image, text=image_prompt(shipped, sample.question), return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def settings(config: dict) -> dict:
        metadata = ("architectures", "dtype", "_name_or_path", "transformers_version")
        return {k: settings(v) if isinstance(v, dict) else v for k, v in config.items() if k not in metadata}

    model = bundled_llava(built)
    assert settings(model.config.to_dict()) == settings(AutoConfig.from_pretrained(path).to_dict())
    trained, _ = _load(name)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in trained.state_dict().items()}


@pytest.mark.parametrize("name", BUNDLED)
def test_budget_one_is_the_full_cache(name: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["--model", name, "--methods", "vlcache", "--budgets", "1.0,0.1", "--samples", "2", "--out", str(out)]
    assert main(argv + ["--threads", "1", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    for s in results["samples"]:
        assert s["predictions"][0]["tokens"] == s["predictions"][1]["tokens"]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_matches_its_recorded_accuracy(name: str, tmp_path: Path) -> None:
    """Loaded offline through vlcache-eval, the shipped model answers the test split as well as its
    training run measured on the val split (within sampling noise): the checkpoint, tokenizer and
    processor that ship are the ones that were trained and measured."""
    recorded = float(json.loads((bundled_path(name) / "training_log.json").read_text())["val_accuracy"])
    n = 96
    out = tmp_path / "acc"
    argv = ["--model", name, "--methods", "full", "--budgets", "1.0", "--samples", str(n), "--out", str(out)]
    assert main(argv + ["--threads", "1", "--no-progress"]) == 0
    acc = json.loads((out / "results.json").read_text())["results"][0]["accuracy"]
    sigma = math.sqrt(max(recorded * (1 - recorded), 0.01) / n)
    assert abs(acc - recorded) <= 4 * sigma + 0.03, (acc, recorded)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_reads_the_asked_cell(name: str) -> None:
    """Lookup questions on the test split (digit images never seen in training), full cache, plain
    transformers `generate`: the model reads the asked cell (the answer prior is 0.10), and asking
    about another cell of the same image changes the answer whenever the two cells differ, most of
    the time. It also counts and compares, well above those kinds' priors (0.29 and 0.5)."""
    model, processor = _load(name)

    def answer(image: Image.Image, question: str) -> str:
        inputs = processor(images=image, text=format_prompt(question), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        return parse_answer(
            processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        )

    n, hits, moved, differing = 40, 0, 0, 0
    for s in DigitScenes("test", seed=11, mix={"lookup": 1.0}).take(n):
        hits += answer(s.image, s.question) in s.answers
        r, c = s.cells[0]
        r2, c2 = (r + 2) % 4, (c + 1) % 4  # another cell of the same scene
        if s.grid[r2, c2] != s.grid[r, c]:
            differing += 1
            moved += answer(s.image, f"what is at row {r2} col {c2} ?") == str(int(s.grid[r2, c2]))
    assert hits / n >= 0.85, (hits, n)
    assert moved / differing >= 0.75, (moved, differing)
    for kind, seed, floor in (("count", 12, 0.5), ("compare", 13, 0.6)):
        asked = list(DigitScenes("test", seed=seed, mix={kind: 1.0}).take(30))
        right = sum(answer(s.image, s.question) in s.answers for s in asked)
        assert right / len(asked) >= floor, (kind, right)


def question_attention_on_asked_cell(name: str, n: int = 24) -> list[float]:
    """Per decoder layer: the attention the question's tokens (the prompt after the image) put on
    the asked cell's 16 image tokens, as a share of what they put on all 256 image tokens; mean over
    heads, question positions and ``n`` test lookups. A uniform spread over the image gives 1/16."""
    from vlcache.digits import cell_of_patch

    model, processor = _load(name, attn="eager")
    image_id = model.config.image_token_index
    shares: list[list[float]] = []
    for s in DigitScenes("test", seed=21, mix={"lookup": 1.0}).take(n):
        inputs = processor(images=s.image, text=format_prompt(s.question), return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
        ids = inputs["input_ids"][0]
        image_pos = (ids == image_id).nonzero().flatten()
        in_cell = torch.tensor([cell_of_patch(i) == tuple(s.cells[0]) for i in range(len(image_pos))])
        question = slice(int(image_pos[-1]) + 1, len(ids))
        row = []
        for attn in out.attentions:  # (1, H, T, T)
            a = attn[0, :, question]  # (H, τ, T)
            on_image = a[..., image_pos].sum(-1)
            on_cell = a[..., image_pos[in_cell]].sum(-1)
            row.append(float((on_cell / on_image).mean()))
        shares.append(row)
    return torch.tensor(shares).mean(0).tolist()


@_needs("llava-tiny")
@_needs("llava-tiny-late")
def test_only_the_default_models_question_looks_at_the_asked_cell() -> None:
    """VL-Cache's premise, as a property of the shipped models: llava-tiny's question tokens attend
    to the asked cell well above uniform in some layer; llava-tiny-late's do not in any layer."""
    uniform = 1 / 16
    routed = question_attention_on_asked_cell("llava-tiny")
    late = question_attention_on_asked_cell("llava-tiny-late")
    assert max(routed) >= 1.5 * uniform, routed
    assert max(late) < 1.5 * uniform, late
