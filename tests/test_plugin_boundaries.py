"""Plugins depend on the core, never on each other: no module under plugins/<a>/ imports
plugins/<b>/ for a != b (imports inside one sub-package are that plugin's own business), and the
core imports no plugin at all. Read from the source with the AST, so a lazy import inside a
function counts as much as one at the top."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PLUGINS, CORE = ROOT / "plugins", ROOT / "core"


def module_name(file: pathlib.Path, package_root: pathlib.Path, package: str) -> list[str]:
    parts = [*package.split("."), *file.relative_to(package_root).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(file: pathlib.Path, package_root: pathlib.Path, package: str):
    """(line, absolute module name) of every import in ``file``, relative ones resolved."""
    here = module_name(file, package_root, package)
    is_package = file.name == "__init__.py"
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), filename=str(file))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_package else here[:-1]
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base)
                if node.module:
                    yield node.lineno, f"{prefix}.{node.module}"
                else:  # from . import x: x may be a module of that package
                    for alias in node.names:
                        yield node.lineno, f"{prefix}.{alias.name}"
            else:
                yield node.lineno, node.module
                if node.module in ("handforge", "handforge.plugins"):  # from handforge.plugins import datasets
                    for alias in node.names:
                        yield node.lineno, f"{node.module}.{alias.name}"


def plugin_of(module: str) -> str | None:
    """The built-in sub-package a module name belongs to (``handforge.plugins.metrics.x`` -> metrics)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["handforge", "plugins"] else None


def cross_imports(plugins_root: pathlib.Path) -> list[str]:
    found = []
    for file in sorted(plugins_root.rglob("*.py")):
        relative = file.relative_to(plugins_root)
        if len(relative.parts) < 2:  # plugins/__init__.py lists the built-ins by name, imports none
            continue
        own = relative.parts[0]
        for line, module in imported_modules(file, plugins_root, "handforge.plugins"):
            other = plugin_of(module)
            if other is not None and other != own:
                found.append(f"plugins/{relative}:{line} imports {module}")
    return found


def test_no_plugin_imports_another_plugin():
    assert cross_imports(PLUGINS) == []


def test_the_core_imports_no_plugin():
    found = [f"core/{f.relative_to(CORE)}:{line} imports {module}"
             for f in sorted(CORE.rglob("*.py"))
             for line, module in imported_modules(f, CORE, "handforge")
             if module == "handforge.plugins" or plugin_of(module)]
    assert found == []


@pytest.mark.parametrize("source, caught", [
    ("from handforge.plugins.metrics.weights import fetch\n", True),   # absolute
    ("def f():\n    from ..metrics import prdc\n", True),               # relative, inside a function
    ("import handforge.plugins.metrics.prdc\n", True),
    ("from handforge.plugins import metrics\n", True),
    ("from .pairs import check_size\n", False),                         # its own sub-package
    ("from handforge.plugins.backbones.pairs import check_size\n", False),
    ("from handforge.weights import locate\n", False),                  # the core
])
def test_the_walk_sees_every_form_of_import(tmp_path, source, caught):
    """The checker itself, on a fake plugins tree: a backbone module with one import."""
    (tmp_path / "backbones").mkdir()
    (tmp_path / "backbones" / "__init__.py").write_text("")
    (tmp_path / "backbones" / "net.py").write_text(source)
    assert bool(cross_imports(tmp_path)) is caught
