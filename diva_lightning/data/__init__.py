"""Data: record schema and loaders, the procedural visual-counting world, variant text edits."""

from diva_lightning.data.schema import (
    LoadReport,
    QuestionRecord,
    RecordError,
    RowProblem,
    decode_image,
    load_records,
    load_records_with_report,
    write_records,
)
from diva_lightning.data.variants import VariantText, render_variant, variant_prompt
from diva_lightning.data.world import (
    format_response,
    generate_world,
    render_tensor,
    world_corpus,
    write_world,
)

__all__ = [
    "LoadReport",
    "QuestionRecord",
    "RecordError",
    "RowProblem",
    "VariantText",
    "decode_image",
    "format_response",
    "generate_world",
    "load_records",
    "load_records_with_report",
    "render_tensor",
    "render_variant",
    "variant_prompt",
    "world_corpus",
    "write_records",
    "write_world",
]
