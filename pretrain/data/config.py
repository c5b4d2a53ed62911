"""The `data` section of a run config: one source or a weighted blend, tokenizer, held-out share,
packing and prefetch."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config import Strict

DataFormat = Literal["auto", "text", "json", "parquet", "arrow"]


class SourceConfig(Strict):
    """One source of a data blend; how `path` is read is in the README (Data)."""

    path: str | list[str] | None = Field(
        None,
        description="a Megatron prefix (PREFIX.bin/.idx), text/jsonl/parquet/arrow file(s) (file, directory or glob), "
        "a saved Hugging Face dataset directory, or hf:NAME for a hub dataset; None = embedded corpus",
    )
    weight: float = Field(1.0, gt=0, description="share of the blend (weights are normalised)")
    type: Literal["auto", "indexed", "files", "hf", "embedded"] = Field("auto", description="auto: decided from path (README)")
    format: DataFormat = "auto"
    text_key: str = "text"
    subset: str | None = Field(None, description="hf: the dataset's configuration name")
    split: str = Field("train", description="hf and saved datasets: the split to read")
    streaming: bool = Field(False, description="files and hf: read as a stream instead of tokenizing everything up front")


class DataConfig(Strict):
    path: str | list[str] | None = Field(
        None, description="one-source shorthand for sources: [{path}] (text/jsonl/parquet/arrow, a Megatron prefix, hf:NAME); None = embedded corpus"
    )
    sources: list[SourceConfig] | None = Field(None, description="weighted blend of sources; exclusive with data.path")
    format: DataFormat = "auto"
    text_key: str = "text"
    tokenizer: str = Field("byte", description="'byte' or a local Hugging Face tokenizer path")
    val_fraction: float = Field(0.02, ge=0, lt=1, description="fraction of documents held out for evaluation")
    embedded_max_bytes: int = Field(4_000_000, gt=0, description="size of the embedded corpus")
    cache_dir: str | None = Field(None, description="datasets cache for prepared files; None = the datasets default")
    packing: Literal["rows", "varlen"] = Field(
        "rows", description="rows: batch_size rows of seq_len tokens; varlen: one padding-free row of whole documents, batch_size*seq_len tokens at most"
    )
    prefetch: int = Field(4, ge=0, description="batches a background thread prepares ahead; 0 = in the training thread")

    @model_validator(mode="after")
    def _one_way_to_name_sources(self) -> "DataConfig":
        if self.path is not None and self.sources is not None:
            raise ValueError("set data.path (one source) or data.sources (a blend), not both")
        if self.sources == []:
            raise ValueError("data.sources is empty; omit it for the embedded corpus")
        return self

    def source_list(self) -> list[SourceConfig]:
        """`sources`, or the one source `path` (with `format`, `text_key`) stands for."""
        if self.sources is not None:
            return self.sources
        return [SourceConfig(path=self.path, format=self.format, text_key=self.text_key)]
