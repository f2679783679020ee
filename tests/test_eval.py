"""The fidelity harness `vlcache-eval`: metrics, datasets, the CLI end to end, follow-up mode.

The model is a random-weight checkpoint in the exact format of the bundled `llava-tiny`, built with
:mod:`vlcache.hf.tiny`'s ``bundled_processor`` / ``bundled_llava``, what the training script builds
(weights rescaled so greedy answers vary with the input, which makes the budget-1.0 equivalence
checks meaningful).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlcache.cli.eval import main
from vlcache.errors import UserError
from vlcache.eval.datasets import load_jsonl, load_task
from vlcache.eval.metrics import anls, exact_match, levenshtein, normalize_vqa, score, vqa_accuracy
from vlcache.hf.loading import resolve_model
from vlcache.tokens import IMAGE_TOKEN_TEXT

REPO = Path(__file__).resolve().parents[1]


def _common(checkpoint: Path, out: Path) -> list[str]:
    return ["--model", str(checkpoint), "--out", str(out), "--threads", "1"]


def _final_json(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    return json.loads(lines[-1])


def _table_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    """(method, budget) -> the remaining cells of each table row."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["method", "budget"]) + 2
    rows = {}
    for line in lines[start:]:
        cells = line.split()
        if len(cells) < 5 or line.startswith(("wrote", "{")):
            break
        rows[(cells[0], cells[1])] = cells[2:]
    return rows


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# --- metrics -----------------------------------------------------------------------------------------


def test_exact_match() -> None:
    assert exact_match("7", ["7"]) == 1.0
    assert exact_match("  Yes ", ["yes"]) == 1.0
    assert exact_match("7", ["1", "17"]) == 0.0
    assert exact_match("", ["0"]) == 0.0


def test_vqa_normalisation() -> None:
    assert normalize_vqa("The Two dogs!") == "2 dogs"
    assert normalize_vqa("yes.") == "yes"
    assert normalize_vqa("3.5") == "3.5"
    assert normalize_vqa("1,000") == "1000"
    assert normalize_vqa("dont know") == "don't know"
    assert normalize_vqa("red-white") == "red white"
    assert normalize_vqa("a cat , an owl") == "cat owl"
    assert normalize_vqa("none") == "0"


def test_vqa_accuracy() -> None:
    ten = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", ten) == pytest.approx(0.9)  # (3 · 2/3 + 7 · 1) / 10
    assert vqa_accuracy("3", ten) == pytest.approx(1.0)
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)  # (1 · 0 + 9 · 1/3) / 10
    assert vqa_accuracy("4", ten) == 0.0
    # fewer than 4 references: exact match after normalisation
    assert vqa_accuracy("The Cat.", ["cat"]) == 1.0
    assert vqa_accuracy("dog", ["cat", "kitten"]) == 0.0


def test_anls() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert anls("Hello", ["hello"]) == 1.0
    assert anls("helo", ["hello"]) == pytest.approx(0.8)  # NL = 1/5
    assert anls("abc", ["xyz"]) == 0.0
    assert anls("abcd", ["abxy"]) == 0.0  # NL = 0.5 reaches the threshold
    assert anls("helo", ["world", "hello"]) == pytest.approx(0.8)  # best answer counts
    assert score("anls", "", [""]) == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", "a", ["a"])


# --- datasets ----------------------------------------------------------------------------------------


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (10, 200, 30)).save(path)
    return path


def test_jsonl_loading(tmp_path: Path) -> None:
    _image(tmp_path / "imgs" / "a.png")
    absolute = _image(tmp_path / "elsewhere" / "b.png")
    lines = [
        {"image": "imgs/a.png", "question": "what colour ?", "answers": ["green"] * 10},
        {},  # replaced by a blank line below
        {"image": str(absolute), "question": "text ?", "answers": ["abc"], "metric": "anls", "kind": "ocr"},
        {"image": "imgs/a.png", "question": "third ?", "answers": ["x"]},
    ]
    text = "\n".join("" if not obj else json.dumps(obj) for obj in lines) + "\n"
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    task = load_jsonl(path, None, "vqa")
    assert [s.index for s in task.samples] == [1, 3, 4]
    assert task.samples[0].metric == "vqa" and task.samples[0].kind == "all"
    assert task.samples[0].image_path == tmp_path / "imgs" / "a.png"
    assert task.samples[1].metric == "anls" and task.samples[1].kind == "ocr"
    assert task.samples[1].load_image().size == (64, 64)
    assert len(load_jsonl(path, 2, "exact").samples) == 2
    assert load_jsonl(path, 2, "exact").samples[0].metric == "exact"
    with pytest.raises(UserError, match="holds 3 samples, fewer than the 5"):
        load_jsonl(path, 5)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ('{"image": "a.png", "answers": ["x"]}', "line 2: 'question' must be a non-empty string"),
        ('{"image": "a.png", "question": "q ?", "answers": "x"}', "line 2: 'answers' must be a non-empty list"),
        ('{"image": "a.png", "question": "q ?", "answers": []}', "line 2: 'answers' must be a non-empty list"),
        ('{"image": "a.png", "question": "q ?", "answers": ["x"], "metric": "bleu"}', "line 2: unknown metric"),
        ('{"image": "missing.png", "question": "q ?", "answers": ["x"]}', "line 2: image file not found"),
        ('{"image": "bad.png", "question": "q ?", "answers": ["x"]}', "line 2: cannot read image"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    _image(tmp_path / "a.png")
    (tmp_path / "bad.png").write_text("not an image")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"image": "a.png", "question": "q ?", "answers": ["x"]}) + "\n" + line + "\n")
    with pytest.raises(UserError, match=message):
        load_jsonl(path)


def test_digits_task() -> None:
    task = load_task("digits", 3, split="test", seed=0, followup=True)
    assert len(task.samples) == 3 and task.prompt_style == "digits"
    first = task.samples[0]
    assert first.followup is not None and first.followup.question != first.question
    with pytest.raises(UserError, match="--metric applies to JSONL"):
        load_task("digits", 3, metric="vqa")
    with pytest.raises(UserError, match="unknown task"):
        load_task("nonsense", 3)


def test_bundled_model_missing_says_where(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("vlcache.hf.loading.bundled_path", lambda name: tmp_path / "models" / name)
    with pytest.raises(UserError, match=r"not found at .*llava-tiny.*cannot be downloaded"):
        resolve_model("llava-tiny")


# --- the CLI -------------------------------------------------------------------------------------------


def test_cli_end_to_end(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["--methods", "vlcache,snapkv", "--budgets", "1.0,0.1", "--samples", "3", "--seed", "1"]
    assert main(argv + _common(checkpoint, out)) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "gen" in captured.err  # the tqdm bar
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "results.csv", "results.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder left behind

    line = _final_json(captured.out)
    results = json.loads((out / "results.json").read_text())
    assert line["results"] == results["results"]
    assert line["n"] == results["n"] == 3 and line["mode"] == results["mode"] == "single"
    pairs = [(r["method"], r["budget"]) for r in line["results"]]
    assert pairs == [("full", 1.0), ("vlcache", 1.0), ("vlcache", 0.1), ("snapkv", 1.0), ("snapkv", 0.1)]

    table = _table_rows(captured.out)
    assert len(table) == len(pairs)  # full appears once
    for r in line["results"]:
        assert table[(r["method"], str(r["budget"]))] == [_fmt(r["accuracy"]), _fmt(r["relative"]), _fmt(r["kv_kept"])]
        assert r["kv_kept"] == pytest.approx(r["budget"], abs=0.01)
        assert set(r["per_kind"]) <= {"lookup", "count", "compare"}

    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,budget,n,accuracy,relative,kv_kept") and len(csv_lines) == 6

    # budget 1.0 of every method answers exactly like the full cache, sample by sample
    samples = results["samples"]
    assert len(samples) == 3
    for s in samples:
        preds = {(p["method"], p["budget"]): p for p in s["predictions"]}
        assert set(preds) == set(pairs)
        for method in ("vlcache", "snapkv"):
            assert preds[(method, 1.0)]["tokens"] == preds[("full", 1.0)]["tokens"]
            assert preds[(method, 1.0)]["prediction"] == preds[("full", 1.0)]["prediction"]
    full = line["results"][0]
    assert full["accuracy"] == pytest.approx(sum(s["predictions"][0]["score"] for s in samples) / 3)

    # an existing non-empty --out is refused, and replaced with --force
    with pytest.raises(SystemExit) as exc:
        main(argv + _common(checkpoint, out) + ["--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "not empty; pass --force" in err and "Traceback" not in err
    assert (
        main(
            ["--methods", "random", "--budgets", "0.5", "--samples", "1", "--no-progress", "--force"]
            + _common(checkpoint, out)
        )
        == 0
    )
    assert json.loads((out / "results.json").read_text())["n"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_cli_jsonl_task(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _image(tmp_path / "data" / "a.png")
    lines = [
        {"image": "a.png", "question": "how many 3 ?", "answers": ["2"], "kind": "count"},
        {"image": "a.png", "question": "what is at row 0 col 1 ?", "answers": ["7"], "metric": "anls"},
    ]
    data = tmp_path / "data" / "vqa.jsonl"
    data.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    out = tmp_path / "run"
    argv = ["--task", str(data), "--methods", "h2o", "--budgets", "0.2", "--no-progress", "--max-tokens", "2"]
    assert main(argv + _common(checkpoint, out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == 2 and [s["metric"] for s in results["samples"]] == ["vqa", "anls"]
    assert results["max_new_tokens"] == 2  # --max-tokens overrides the task's 4
    assert all(1 <= len(p["tokens"]) <= 2 for s in results["samples"] for p in s["predictions"])
    assert set(results["results"][0]["per_kind"]) == {"count", "all"}
    assert _final_json(capsys.readouterr().out)["results"] == results["results"]


def test_cli_followup(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["--methods", "vlcache,tgvkv", "--budgets", "1.0,0.05", "--samples", "2", "--followup", "--no-progress"]
    assert main(argv + _common(checkpoint, out)) == 0
    captured = capsys.readouterr()
    line = _final_json(captured.out)
    results = json.loads((out / "results.json").read_text())
    assert line["results"] == results["results"] and line["mode"] == "followup"
    table = _table_rows(captured.out)
    for r in line["results"]:
        assert {"followup_accuracy", "followup_relative", "followup_per_kind"} <= set(r)
        cells = table[(r["method"], str(r["budget"]))]
        assert cells[3:] == [_fmt(r["followup_accuracy"]), _fmt(r["followup_relative"])]
    for s in results["samples"]:
        assert s["followup"]["question"] != s["question"]
        preds = {(p["method"], p["budget"]): p for p in s["predictions"]}
        full = preds[("full", 1.0)]
        for method in ("vlcache", "tgvkv"):
            assert preds[(method, 1.0)]["followup_tokens"] == full["followup_tokens"]
        assert all(len(p["followup_tokens"]) >= 1 for p in preds.values())

    # the full-cache follow-up equals greedy decoding of the whole dialogue from scratch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlcache.digits import format_prompt
    from vlcache.eval.datasets import load_digits

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    sample = load_digits(1, "test", 0, followup=True).samples[0]
    full = results["samples"][0]["predictions"][0]
    assert sample.followup is not None
    inputs = processor(images=sample.image, text=format_prompt(sample.question), return_tensors="pt")
    q2 = processor.tokenizer(f" {sample.followup.question}", add_special_tokens=False)["input_ids"]
    ids = torch.cat([inputs["input_ids"], torch.tensor([full["tokens"] + q2])], dim=1)
    with torch.no_grad():
        again = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=inputs["pixel_values"],
            max_new_tokens=4,
            do_sample=False,
        )
    assert again[0, ids.shape[1] :].tolist() == full["followup_tokens"]


def test_cli_llava_next_with_chat_template(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A local LLaVA-NeXT checkpoint whose processor has a chat template, on a JSONL task."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from vlcache.digits import vocabulary
    from vlcache.eval.runner import build_prompt
    from vlcache.hf.loading import load_model
    from vlcache.hf.tiny import bundled_tokenizer

    tok = bundled_tokenizer(vocabulary())
    pinpoints = [[16, 32], [32, 16], [32, 32]]
    template = (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}" + IMAGE_TOKEN_TEXT + " "
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ={% endif %}"
    )
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": 16},
            crop_size={"height": 16, "width": 16},
            image_grid_pinpoints=pinpoints,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        ),
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN_TEXT),
        image_grid_pinpoints=pinpoints,
        image_seq_length=16,
    )
    torch.manual_seed(0)
    ckpt = tmp_path / "llava-next"
    LlavaNextForConditionalGeneration(config).save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    loaded = load_model(str(ckpt))
    assert loaded.model_type == "llava_next"
    assert build_prompt(loaded.processor, "how many 3 ?", "chat") == f"{IMAGE_TOKEN_TEXT} how many 3 ? ="

    from vlcache.digits import DigitScenes

    scene = DigitScenes("test", 0)[0]
    scene.image.save(tmp_path / "scene.png")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": "scene.png", "question": scene.question, "answers": list(scene.answers)}))
    out = tmp_path / "run"
    argv = ["--model", str(ckpt), "--task", str(data), "--methods", "vlcache", "--budgets", "1.0,0.1"]
    assert main(argv + ["--out", str(out), "--threads", "1", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    preds = results["samples"][0]["predictions"]
    assert preds[0]["tokens"] == preds[1]["tokens"]  # budget 1.0 == full
    assert results["results"][2]["kv_kept"] == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "vlcache,magic"], "unknown method 'magic'; known methods: "),
        (["--budgets", "0.1,0"], "budget 0 is outside (0, 1]"),
        (["--budgets", "1.5"], "budget 1.5 is outside (0, 1]"),
        (["--budgets", "abc"], "bad budget 'abc'"),
        (["--samples", "0"], "--samples must be >= 1"),
        (["--samples", "many"], "argument --samples: invalid int value: 'many'"),
        (["--split", "dev"], "argument --split: invalid choice: 'dev'"),
        (["--max-tokens", "0"], "argument --max-tokens: must be >= 1, got 0"),
        (["--model", "{tmp}/nowhere"], "model directory not found"),
        (["--model", "{tmp}/bert"], "not a supported VLM (model_type 'bert')"),
        (["--task", "{tmp}/missing.jsonl"], "task file not found"),
        (["--task", "{tmp}/bad.jsonl"], "bad.jsonl line 1: not valid JSON"),
        (["--task", "{tmp}/bad.jsonl", "--followup"], "--followup needs --task digits"),
        (["--metric", "anls"], "--metric applies to JSONL"),
    ],
)
def test_cli_errors_are_one_line(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    out = tmp_path / "run"
    argv = _common(checkpoint, out) + ["--samples", "1", "--no-progress"] + [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("vlcache-eval: error: ")
    assert message in captured.err
    assert not out.exists()


def test_failure_leaves_nothing(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("vlcache.eval.report.plot_accuracy", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="disk full"):
        main(
            ["--methods", "streaming", "--budgets", "0.5", "--samples", "1", "--no-progress"] + _common(checkpoint, out)
        )
    assert list(tmp_path.iterdir()) == []
    assert '{"results"' not in capsys.readouterr().out
