"""Write ebb's model code into a Hugging Face folder, for `trust_remote_code=True`.

transformers' remote-code loader imports `modeling_ebb.py` from the folder as a module of a package
it makes, after copying every file that a `from .name import ...` line names (transitively), all
from the folder's top level. So ebb's model code goes in as flat files: `models/x/y.py` becomes
`ebb_x_y.py` (a package's `__init__.py` its own name: `models/ops/` is `ebb_ops.py`,
`common/config.py` `ebb_common_config.py`), and every `models.`/`common.` import becomes a relative
one. The two entry files keep their names: `modeling_ebb.py` and `configuration_ebb.py`. The copy is
the code ebb trains with, byte for byte apart from those import lines, so the export never
drifts from the model; what it needs besides the standard library is torch, pydantic and
transformers, and fla on CUDA where installed.

Which files go is found by following the imports of the entry files (those inside functions and
`TYPE_CHECKING` blocks too), plus the modules `models/mixers/__init__.py` imports by name at run
time (every mixer of `PATTERN`).
"""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

from models.mixers import PATTERN

ENTRIES = {"models.hf.modeling_ebb": "modeling_ebb", "models.hf.configuration_ebb": "configuration_ebb"}
OWN_PACKAGES = ("models", "common")
# `import_module(f"models.mixers.{name}")`: the by-name import in models/mixers/__init__.py
DYNAMIC = re.compile(r'import_module\(f"(models(?:\.\w+)*)\.\{(\w+)\}"\)')


class RemoteCodeError(ValueError):
    """ebb's model code uses an import form the export cannot rewrite (a bug in ebb, caught by its tests)."""


def flat_name(module: str) -> str:
    """The file name (without .py) a module of ebb's gets in the exported folder."""
    if module in ENTRIES:
        return ENTRIES[module]
    return "ebb_" + module.removeprefix("models.").replace(".", "_") if module != "models" else "ebb_models"


def _source(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RemoteCodeError(f"cannot find the source of {module}")
    return Path(spec.origin)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _own(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in OWN_PACKAGES


def _imported_modules(module: str, tree: ast.AST, text: str) -> list[str]:
    """ebb's modules that `module` imports (statically, and by name as in models/mixers)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(_own(alias.name) for alias in node.names):
            raise RemoteCodeError(f"{module}: `import {node.names[0].name}` cannot be made relative; use `from ... import ...`")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _own(node.module):
            submodules = [alias.name for alias in node.names if _is_module(f"{node.module}.{alias.name}")]
            if submodules and len(submodules) != len(node.names):
                raise RemoteCodeError(f"{module}: line {node.lineno} imports modules and names together from {node.module}")
            found += [f"{node.module}.{name}" for name in submodules] if submodules else [node.module]
        if isinstance(node, ast.ImportFrom) and node.level:
            raise RemoteCodeError(f"{module}: line {node.lineno} is a relative import; ebb's model code imports absolutely")
    for package, _ in DYNAMIC.findall(text):
        if package != "models.mixers":
            raise RemoteCodeError(f"{module}: imports {package}.* by name; only models.mixers' are known")
        found += [f"models.mixers.{name}" for name in PATTERN.values()]
    return found


def _rewrite(module: str, text: str, tree: ast.AST) -> str:
    """`text` with every import of ebb's modules relative to the folder."""
    lines = text.splitlines(keepends=True)
    edits = []  # (line index, old prefix, new prefix) on the statement's first line
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _own(node.module):
            old = f"from {node.module} import "
            if _is_module(f"{node.module}.{node.names[0].name}"):
                names = ", ".join(f"{flat_name(f'{node.module}.{a.name}')} as {a.asname or a.name}" for a in node.names)
                if "(" in lines[node.lineno - 1] or node.end_lineno != node.lineno:
                    raise RemoteCodeError(f"{module}: line {node.lineno}: put module imports on one line")
                edits.append((node.lineno - 1, lines[node.lineno - 1].strip(), f"from . import {names}"))
            else:
                edits.append((node.lineno - 1, old, f"from .{flat_name(node.module)} import "))
    for index, old, new in edits:
        if old not in lines[index]:
            raise RemoteCodeError(f"{module}: line {index + 1} is not `{old.strip()} ...` on one line")
        lines[index] = lines[index].replace(old, new, 1)
    text = "".join(lines)

    def relative(match: re.Match) -> str:
        return f'import_module(f".{flat_name(match.group(1))}_{{{match.group(2)}}}", __package__)'

    return DYNAMIC.sub(relative, text)


def module_closure() -> dict[str, Path]:
    """Every module of ebb's that the entry files need, with its source file."""
    todo, seen = list(ENTRIES), {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = _source(module)
        seen[module] = path
        text = path.read_text()
        todo += _imported_modules(module, ast.parse(text), text)
    return seen


def write_remote_code(folder: Path) -> list[str]:
    """Write the entry files and ebb's model code they need into `folder`; the file names."""
    modules = module_closure()
    names = []
    for module, path in sorted(modules.items()):
        text = path.read_text()
        rewritten = _rewrite(module, text, ast.parse(text))
        if module == "models.hf.modeling_ebb":
            rewritten += _copy_list(m for m in modules if m not in ENTRIES)
        (folder / f"{flat_name(module)}.py").write_text(rewritten)
        names.append(f"{flat_name(module)}.py")
    return names


def _copy_list(modules) -> str:
    """Lines naming every copied file in `from .x import` form: transformers copies only files named
    so, and some are imported only as modules (`from . import x`) or by name at run time."""
    lines = [
        "\n\n# Added by ebb's export: transformers' remote-code loader copies the files that `from .name import`\n",
        "# lines name, so every file of ebb's model code in this folder is named here once.\n",
    ]
    lines += [f"from .{flat_name(m)} import __name__ as _  # noqa: E402,F401\n" for m in sorted(modules)]
    return "".join(lines)
