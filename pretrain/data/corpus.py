"""Documents for a run: local files read through `datasets`, or the embedded corpus (no download)."""
from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

from pretrain.config import DataConfig
from pretrain.data.errors import DataError, first_line

FORMAT_BY_EXTENSION = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".json": "json", ".jsonl": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
COMPRESSION_EXTENSIONS = {".gz", ".bz2", ".xz", ".zst", ".lz4"}
STDLIB_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def embedded_corpus(max_bytes: int) -> list[str]:
    """The Python standard library's own source, one document per file, in path order, up to
    `max_bytes`: real code every Python install carries, so a run needs no download."""
    docs, total = [], 0
    for path in stdlib_sources():
        data = path.read_bytes()[: max_bytes - total]
        text = data.decode("utf-8", errors="ignore")
        if text:
            docs.append(text)
        total += len(data)
        if total >= max_bytes:
            break
    return docs


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIPPED_DIRS]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_documents(cfg: DataConfig) -> list[str]:
    """Every non-empty document of `cfg.path` (the embedded corpus when it is None), in file order."""
    if cfg.path is None:
        return embedded_corpus(cfg.embedded_max_bytes)
    files = resolve_data_files(cfg.path, cfg.format)
    fmt = data_format(files, cfg.format)
    key = "text" if fmt == "text" else cfg.text_key
    docs = read_text_column(fmt, files, key, cfg.cache_dir)
    if not docs:
        raise DataError(f"data.path {describe(files)} holds no non-empty documents")
    return docs


def resolve_data_files(path: str | list[str], fmt: str) -> list[str]:
    """Files named by a file, a directory (searched recursively), a glob, or a list of these."""
    files: list[str] = []
    for spec in [path] if isinstance(path, str) else path:
        if Path(spec).is_dir():
            found = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file() and _is_data_file(p, fmt))
            if not found:
                raise DataError(f"data.path {spec}: directory holds no {' / '.join(sorted(FORMAT_BY_EXTENSION))} files")
        elif Path(spec).is_file():
            found = [spec]
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"data.path {spec} matches no files")
        else:
            raise DataError(f"data.path {spec}: no such file or directory")
        files += found
    return files


def _is_data_file(path: Path, fmt: str) -> bool:
    if path.name.startswith("."):
        return False
    return fmt != "auto" or extension_format(path) is not None


def extension_format(path: str | Path) -> str | None:
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_EXTENSIONS:
        suffixes.pop()
    return FORMAT_BY_EXTENSION.get(suffixes[-1]) if suffixes else None


def data_format(files: list[str], fmt: str) -> str:
    if fmt != "auto":
        return fmt
    formats = set()
    for f in files:
        found = extension_format(f)
        if found is None:
            raise DataError(f"data.path {f}: cannot tell its format from the extension; set data.format")
        formats.add(found)
    if len(formats) > 1:
        raise DataError(f"data.path mixes formats ({', '.join(sorted(formats))}); use one format per run")
    return formats.pop()


def read_text_column(fmt: str, files: list[str], key: str, cache_dir: str | None) -> list[str]:
    """The `key` column of the files through `datasets`; a plain text file is one document."""
    import datasets
    import pyarrow

    files = [f for f in files if os.path.getsize(f) > 0]  # datasets' json reader fails on empty files
    if not files:
        return []
    options = {"sample_by": "document"} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=cache_dir, **options)
    except (datasets.exceptions.DatasetsError, pyarrow.ArrowException) as exc:
        raise DataError(f"data.path {describe(files)}: cannot read as {fmt}: {first_line(exc.__cause__ or exc)}") from exc
    if key not in ds.column_names:
        raise DataError(f"data.text_key {key!r} is not a column of {describe(files)} (columns: {', '.join(ds.column_names)})")
    column = ds.features[key]
    if not (isinstance(column, datasets.Value) and column.dtype in ("string", "large_string")):
        raise DataError(f"data.text_key {key!r} of {describe(files)} is not a text column ({column})")
    return [doc for doc in ds[key] if doc]


def describe(files: list[str]) -> str:
    return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"
