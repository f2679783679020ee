"""`ExportSpec`: the JSON file (``export.json``) that makes an export directory self-describing.

A runtime loads the directory from it alone: which graph files exist, the model's shape (layers,
heads, KV heads, head dim, hidden size, vocabulary), the image token, the attention scale and the
names of every graph's inputs and outputs. No onnx import here: runtimes and the builder read it
without the exporter.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vlcache.export import names

#: ``export.json``'s ``format``: what kind of export directory this is.
EXPORT_FORMAT_NAME = "vlcache-onnx"
#: ``export.json``'s ``format_version``: bump when the export's layout or a field's meaning changes
#: (an artifact's manifest is versioned apart, by :data:`vlcache.config.ARTIFACT_FORMAT`).
#: 2: ``attention`` (the fused decoder's ``past_length.l`` inputs); version 1 files are read as
#: ``attention="standard"``, the only decoder they could hold.
EXPORT_FORMAT_VERSION = 2
#: versions :meth:`ExportSpec.load` reads
READABLE_FORMAT_VERSIONS = (1, 2)


@dataclass
class ExportSpec:
    """What :func:`vlcache.export.export_llava` wrote.

    Attributes:
        num_layers, num_heads, num_kv_heads, head_dim, hidden_size, vocab_size: the language model.
        attention_scale: its softmax scale (what scoring must use).
        image_token_id: the placeholder id expanded to one token per visual feature (None: no vision graph).
        image_size: (H, W) of ``pixel_values``; image_seq_length: features per image.
        eos_token_id: ids that end generation (from the model's generation config; may be empty).
        max_input_len: the longest sequence (prompt + generated) the export was made for.
        opset, dtype: of the graphs.
        attention: the decoder's attention, ``fused`` (ONNX Runtime's GroupQueryAttention on
            preallocated KV buffers, ``past_length.l`` inputs) or ``standard`` (standard ONNX ops,
            Concat-appended KV: what TensorRT builds from); see :mod:`vlcache.export.llava`.
        graphs: role -> file name (``vision``, ``embed``, ``decoder``, ``post_vision_stats``, ``compact_kv``).
        io: role -> {"inputs": [...], "outputs": [...]} tensor names.
        engines: role -> TensorRT engine file, when a builder added them (empty for ONNX only).
        source: free-form description of the exported model (class, config name).
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    attention_scale: float
    image_token_id: int | None
    image_size: tuple[int, int] | None
    image_seq_length: int | None
    eos_token_id: list[int]
    max_input_len: int
    opset: int
    dtype: str
    graphs: dict[str, str]
    io: dict[str, dict[str, list[str]]]
    engines: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    #: format 1 exports hold the standard decoder only
    attention: str = names.ATTENTION_STANDARD
    format: str = EXPORT_FORMAT_NAME
    format_version: int = EXPORT_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / names.SPEC_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ExportSpec:
        """Read ``DIR/export.json``; a clear ValueError when it is missing or not this format."""
        path = Path(directory) / names.SPEC_FILE
        if not path.is_file():
            raise ValueError(f"{directory} is not a vlcache export: {names.SPEC_FILE} not found there")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT_NAME:
            raise ValueError(f"{path} is not a {EXPORT_FORMAT_NAME} description")
        if data.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise ValueError(
                f"{path} has format_version {data.get('format_version')}, this vlcache reads "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}; re-export the model"
            )
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{path} lacks fields: {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("image_size") is not None:
            kwargs["image_size"] = tuple(kwargs["image_size"])
        if kwargs.get("attention", names.ATTENTION_STANDARD) not in names.ATTENTION_VARIANTS:
            raise ValueError(
                f"{path}: attention {kwargs['attention']!r} is not one of {', '.join(names.ATTENTION_VARIANTS)}"
            )
        return cls(**kwargs)

    def graph_path(self, directory: str | Path, role: str) -> Path:
        if role not in self.graphs:
            raise ValueError(f"this export has no {role!r} graph (it has: {', '.join(sorted(self.graphs))})")
        return Path(directory) / self.graphs[role]
