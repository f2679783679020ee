"""Tiny random LLaVA-1.5, LLaVA-NeXT and Llama models built offline from configs (tests, demo, CI).

Random weights: the outputs mean nothing, but every code path (vision tower, projector, image
token merge, GQA Llama decoder, generate) is the real transformers one.
"""

from __future__ import annotations

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

IMAGE_TOKEN = 120
VOCAB = 128


def _text_config(layers: int, vocab_size: int = VOCAB) -> LlamaConfig:
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return cfg


def _vision_config(image_size: int) -> CLIPVisionConfig:
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=4,
        projection_dim=32,
    )
    return cfg


def tiny_llava(
    seed: int = 0, layers: int = 4, attn: str = "sdpa", image_size: int = 32
) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 layout: CLIP (patch 4) → (image_size/4)² image tokens → 2-layer MLP → Llama (GQA 4/2)."""
    torch.manual_seed(seed)
    patches = (image_size // 4) ** 2
    cfg = LlavaConfig(
        vision_config=_vision_config(image_size),
        text_config=_text_config(layers),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=patches,
        vision_feature_select_strategy="default",
    )
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
