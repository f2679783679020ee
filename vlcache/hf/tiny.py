"""Tiny LLaVA-1.5, LLaVA-NeXT and Llama models built offline from configs (tests, demo, CI), and the
format of the bundled ``llava-tiny`` (its tokenizer, processor and model before training).

Random weights (:func:`tiny_llava`, :func:`tiny_llava_next`, :func:`tiny_llama`): the outputs mean
nothing, but every code path (vision tower, projector, image token merge, GQA Llama decoder,
generate) is the real transformers one. Their token ids are ``0..VOCAB-1``, with pad, bos and eos at
0, 1, 2 as in :data:`SPECIALS`, and the image placeholder at :data:`IMAGE_TOKEN`.

The bundled format (:func:`bundled_tokenizer`, :func:`bundled_processor`, :func:`bundled_llava`):
what ``scripts/train_tiny_llava.py`` trains and saves, and what the tests and benchmarks build when
they need a checkpoint of that format with random weights. The words and image size are the task's
(:func:`vlcache.digits.vocabulary`, :data:`vlcache.digits.IMAGE_SIZE`); they are passed in,
as this layer does not import the harness. Both kinds share the vision and text configs below: CLIP
with patch :data:`PATCH`, a GQA Llama with 4 query and 2 key/value heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from vlcache.tokens import IMAGE_TOKEN_TEXT

IMAGE_TOKEN = 120
VOCAB = 128
#: patch size of every tiny vision tower (random ones and the bundled llava-tiny's)
PATCH = 4
#: the bundled format's special tokens, ids 0-4 in this order; the task's words follow them
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN_TEXT]
PAD_ID, BOS_ID, EOS_ID = (SPECIALS.index(t) for t in ("<pad>", "<s>", "</s>"))


def _text_config(
    layers: int,
    vocab_size: int = VOCAB,
    *,
    hidden: int = 64,
    intermediate: int = 128,
    max_positions: int = 2048,
    ids: tuple[int, int, int] = (PAD_ID, BOS_ID, EOS_ID),
    **extra: Any,
) -> LlamaConfig:
    """A GQA Llama (4 query heads, 2 key/value heads); ``ids``: pad, bos, eos."""
    pad, bos, eos = ids
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        **extra,
    )
    return cfg


def _vision_config(image_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 2) -> CLIPVisionConfig:
    """A CLIP tower with patch :data:`PATCH` (MLP 2 × ``hidden``, projection ``hidden``)."""
    cfg = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=PATCH,
        projection_dim=hidden,
    )
    return cfg


def _llava_config(
    text: LlamaConfig,
    image_token: int,
    image_size: int,
    *,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    **extra: Any,
) -> LlavaConfig:
    """LLaVA-1.5: a :func:`_vision_config` tower on ``image_size`` pixels, one placeholder per patch
    (CLS dropped, ``default``), then ``text``."""
    return LlavaConfig(
        vision_config=_vision_config(image_size, hidden=vision_hidden, layers=vision_layers, heads=vision_heads),
        text_config=text,
        image_token_index=image_token,
        image_seq_length=(image_size // PATCH) ** 2,
        vision_feature_select_strategy="default",
        **extra,
    )


def tiny_llava(
    seed: int = 0, layers: int = 4, attn: str = "sdpa", image_size: int = 32
) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 layout: CLIP (patch 4) → (image_size/4)² image tokens → 2-layer MLP → Llama (GQA 4/2)."""
    torch.manual_seed(seed)
    cfg = _llava_config(_text_config(layers), IMAGE_TOKEN, image_size)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation({"text_config": attn, "vision_config": "sdpa"})
    return model


def tiny_llava_next(seed: int = 0, layers: int = 4, attn: str = "sdpa") -> LlavaNextForConditionalGeneration:
    """LLaVA-NeXT layout: anyres tiles of 16×16 (grid pinpoints 16×32, 32×16, 32×32) with newline tokens."""
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(
        vision_config=_vision_config(16),
        text_config=_text_config(layers),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        image_seq_length=16,
    )
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.set_attn_implementation({"text_config": attn, "vision_config": "sdpa"})
    return model


def tiny_llama(seed: int = 0, layers: int = 4, attn: str = "sdpa", vocab_size: int = VOCAB) -> LlamaForCausalLM:
    """A text-only Llama (GQA 4/2, hidden 64) for text tasks; tokens 0, 1, 2 are pad, bos, eos."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_text_config(layers, vocab_size)).eval()
    model.set_attn_implementation(attn)
    return model


def bundled_tokenizer(words: Sequence[str]) -> Any:
    """The bundled format's word-level tokenizer: :data:`SPECIALS`, then ``words``; text is split on
    whitespace and gets ``<s>`` in front; the image placeholder is an additional special token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN_TEXT]})
    return fast


def bundled_processor(words: Sequence[str], image_size: int) -> Any:
    """The bundled format's LlavaProcessor: :func:`bundled_tokenizer` over ``words`` and a CLIP image
    processor that resizes and crops to ``image_size`` square, normalised with mean 0.5, std 0.5."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=bundled_tokenizer(words),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def bundled_llava(
    processor: Any, *, vision_hidden: int = 128, vision_layers: int = 4, hidden: int = 128, layers: int = 4
) -> LlavaForConditionalGeneration:
    """The bundled format's untrained model for ``processor`` (:func:`bundled_processor`; its crop size
    is the image size): CLIP (``vision_hidden`` × ``vision_layers``, 4 heads, patch :data:`PATCH`,
    features of the last layer) → 2-layer GELU MLP → Llama (``hidden`` × ``layers``, GQA 4/2, MLP
    3 × ``hidden``, untied head), sdpa attention. The defaults are llava-tiny's size. Training mode,
    initialised from torch's current random state."""
    tokenizer = processor.tokenizer
    image_size = int(processor.image_processor.crop_size["height"])
    text = _text_config(
        layers,
        len(tokenizer),
        hidden=hidden,
        intermediate=3 * hidden,
        max_positions=512,
        ids=(tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id),
        tie_word_embeddings=False,
    )
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN_TEXT)
    cfg = _llava_config(
        text,
        image_token,
        image_size,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        vision_heads=4,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    # PyTorch-default init of the patch convolution: HF's CLIP init makes image features nearly
    # identical across images, and training then sits at the answer prior.
    model.model.vision_tower.embeddings.patch_embedding.reset_parameters()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _prompt(before: list[int], images: list[int], after: list[int], gap: list[int]) -> torch.Tensor:
    ids: list[int] = list(before)
    for i, n in enumerate(images):
        if i:
            ids += gap
        ids += [IMAGE_TOKEN] * n
    ids += after
    return torch.tensor([ids])


def random_text(n: int, generator: torch.Generator) -> list[int]:
    """n random ordinary token ids (never the image token or specials)."""
    return torch.randint(3, IMAGE_TOKEN, (n,), generator=generator).tolist()


def llava_inputs(
    model: LlavaForConditionalGeneration, num_images: int = 1, question_len: int = 12, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Processor-like inputs: ``input_ids`` with image placeholders, ``attention_mask``, ``pixel_values``."""
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size  # type: ignore[union-attr]
    n = model.config.image_seq_length
    ids = _prompt([1] + random_text(3, g), [n] * num_images, random_text(question_len, g), random_text(2, g))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if num_images:
        inputs["pixel_values"] = torch.randn(num_images, 3, size, size, generator=g)
    return inputs


def llava_next_inputs(
    model: LlavaNextForConditionalGeneration,
    image_size: tuple[int, int] = (30, 20),
    question_len: int = 12,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Inputs for one anyres image of ``image_size`` (h, w); the placeholder count is what the model
    will produce for it, so ``input_ids`` match the features exactly."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    tile = model.config.vision_config.image_size  # type: ignore[union-attr]
    sizes = torch.tensor([list(image_size)])
    tiles = image_size_to_num_patches(sizes[0], model.config.image_grid_pinpoints, tile)
    pixel_values = torch.randn(1, tiles, 3, tile, tile, generator=g)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes)
    pooled = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    n = sum(f.shape[0] for f in pooled)
    ids = _prompt([1] + random_text(3, g), [n], random_text(question_len, g), [])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixel_values,
        "image_sizes": sizes,
    }
