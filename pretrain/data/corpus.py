"""Documents for a run: local files read through `datasets`, or the embedded corpus (no download)."""
from __future__ import annotations

import glob
import os
import socket
import sys
import sysconfig
from pathlib import Path
from urllib.parse import urlparse

from common.errors import first_line
from pretrain.data.errors import DataError

FORMAT_BY_EXTENSION = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".json": "json", ".jsonl": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
COMPRESSION_EXTENSIONS = {".gz", ".bz2", ".xz", ".zst", ".lz4"}
HUB_PROBE_TIMEOUT_S = 3.0
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


def datasets_module():
    """`datasets`, its progress bars off unless stderr is a terminal: in a log they are noise
    around the one line a failure prints."""
    import datasets

    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    return datasets


def load_documents(path: str | list[str], fmt: str = "auto", text_key: str = "text", cache_dir: str | None = None) -> list[str]:
    """Every non-empty document of the files `path` names, in file order."""
    ds, key, name = open_files(path, fmt, text_key, cache_dir)
    return non_empty(ds, key, name)


def load_hf_documents(name: str, subset: str | None, split: str, text_key: str, cache_dir: str | None) -> list[str]:
    """The non-empty `text_key` documents of a saved dataset directory (`save_to_disk`) or a hub dataset."""
    return non_empty(open_hf(name, subset, split, text_key, cache_dir), text_key, name)


def non_empty(ds, key: str, name: str) -> list[str]:
    docs = [doc for doc in ds[key] if doc] if ds is not None else []
    if not docs:
        raise DataError(f"data source {name} holds no non-empty documents")
    return docs


def open_files(path: str | list[str], fmt: str, text_key: str, cache_dir: str | None, streaming: bool = False):
    """(dataset or None when every file is empty, its text column, a name for messages) of the
    files `path` names, read through `datasets`; a plain text file is one document."""
    import pyarrow

    datasets = datasets_module()

    files = resolve_data_files(path, fmt)
    fmt = data_format(files, fmt)
    key, name = ("text" if fmt == "text" else text_key), describe(files)
    files = [f for f in files if os.path.getsize(f) > 0]  # datasets' json reader fails on empty files
    if not files:
        return None, key, name
    options = {"sample_by": "document"} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=cache_dir, streaming=streaming, **options)
    except (datasets.exceptions.DatasetsError, pyarrow.ArrowException) as exc:
        raise DataError(f"data source {name}: cannot read as {fmt}: {first_line(exc.__cause__ or exc)}") from exc
    check_text_column(ds, key, name)
    return ds, key, name


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub (HF_ENDPOINT) answers within a few seconds."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def work_offline() -> None:
    """Hub datasets from the local cache only: `datasets` and `huggingface_hub` read these flags
    at each call. Without them an unreachable hub costs half a minute of retries, each logged."""
    import datasets
    import huggingface_hub.constants

    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def open_hf(name: str, subset: str | None, split: str, text_key: str, cache_dir: str | None, streaming: bool = False):
    """A saved dataset directory (`save_to_disk`) or a hub dataset, its `text_key` column checked.
    When the hub cannot be reached, a hub dataset is read from the cache, or not at all."""
    datasets = datasets_module()

    offline = False
    if not Path(name).is_dir() and not hub_reachable():
        work_offline()
        offline = True
    try:
        if Path(name).is_dir():
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"data source {name} has no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
            ds = ds.to_iterable_dataset() if streaming else ds
        else:
            ds = datasets.load_dataset(name, subset, split=split, cache_dir=cache_dir, streaming=streaming)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:  # ConnectionError is an OSError
        where = " (the Hugging Face Hub cannot be reached, and it is not in the datasets cache)" if offline else ""
        raise DataError(f"data source {name}: cannot load it with datasets{where}: {first_line(exc)}") from None
    check_text_column(ds, text_key, name)
    return ds


def resolve_data_files(path: str | list[str], fmt: str) -> list[str]:
    """Files named by a file, a directory (searched recursively), a glob, or a list of these."""
    files: list[str] = []
    for spec in [path] if isinstance(path, str) else path:
        if Path(spec).is_dir():
            found = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file() and _is_data_file(p, fmt))
            if not found:
                raise DataError(f"data source {spec}: directory holds no {' / '.join(sorted(FORMAT_BY_EXTENSION))} files")
        elif Path(spec).is_file():
            found = [spec]
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"data source {spec} matches no files")
        else:
            raise DataError(f"data source {spec}: no such file or directory")
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
            raise DataError(f"data source {f}: cannot tell its format from the extension; set data.format")
        formats.add(found)
    if len(formats) > 1:
        raise DataError(f"data.path mixes formats ({', '.join(sorted(formats))}); use one format per run")
    return formats.pop()


def check_text_column(ds, key: str, name: str) -> None:
    """Column `key` of a `datasets` dataset exists and holds text (a stream's first example for one
    whose features are unknown until read)."""
    import datasets

    if ds.features is None:
        first = next(iter(ds), None)
        if first is not None and not isinstance(first.get(key), str):
            raise DataError(f"data.text_key {key!r} is not a text column of {name} (columns: {', '.join(first)})")
        return
    if key not in ds.column_names:
        raise DataError(f"data.text_key {key!r} is not a column of {name} (columns: {', '.join(ds.column_names)})")
    column = ds.features[key]
    if not (isinstance(column, datasets.Value) and column.dtype in ("string", "large_string")):
        raise DataError(f"data.text_key {key!r} of {name} is not a text column ({column})")


def describe(files: list[str]) -> str:
    return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"
