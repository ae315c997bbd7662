"""The docs cite only modules that exist: every ``fedllm/....py`` path and every dotted ``fedllm.``
name in the Markdown docs (docs/, README.md, sites/, simulations/*/README.md) must name a real
file, module, or top-level name of a module (a class member, one level down).

Resolved statically (files and ``ast``), so the test imports nothing and takes well under a second.
A dotted name resolves through its longest prefix that is a module or package; the first name
after that must be defined, assigned or imported at the module's top level. ``fedllm.scenarios``
is the data package the wheel builds from ``simulations/``.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PATH_RE = re.compile(r"(?<![\w./-])fedllm/[\w/]*\.py\b")
DOTTED_RE = re.compile(r"(?<![\w./-])fedllm(?:\.[A-Za-z_]\w*)+")


def doc_files() -> list[Path]:
    files = [REPO / "README.md", *(REPO / "docs").rglob("*.md"), *(REPO / "sites").glob("*.md"),
             *(REPO / "simulations").glob("*/README.md")]
    return sorted(f for f in files if f.is_file())


def module_file(parts: list[str]) -> Path | None:
    base = REPO.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _assigned(targets: list[ast.expr]) -> set[str]:
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


@functools.cache
def top_level(path: Path) -> dict[str, ast.AST | None]:
    """Names a module defines at top level (classes keep their node, to look one level down)."""
    names: dict[str, ast.AST | None] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update(dict.fromkeys(_assigned(node.targets)))
        elif isinstance(node, ast.AnnAssign):
            names.update(dict.fromkeys(_assigned([node.target])))
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try, ast.Import, ast.ImportFrom)) else ():
            if isinstance(inner, (ast.Import, ast.ImportFrom)):
                names.update(dict.fromkeys((a.asname or a.name).split(".")[0] for a in inner.names))
    return names


def class_members(node: ast.ClassDef) -> set[str]:
    members = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    for n in node.body:
        if isinstance(n, ast.Assign):
            members |= _assigned(n.targets)
        elif isinstance(n, ast.AnnAssign):
            members |= _assigned([n.target])
    return members


def dotted_exists(name: str) -> bool:
    parts = name.split(".")
    if parts[:2] == ["fedllm", "scenarios"]:
        return (REPO / "simulations").joinpath(*parts[2:]).exists()
    for i in range(len(parts), 0, -1):
        path = module_file(parts[:i])
        if path is None:
            continue
        rest = parts[i:]
        if not rest:
            return True
        names = top_level(path)
        if rest[0] not in names:
            return False
        node = names[rest[0]]
        if len(rest) > 1 and isinstance(node, ast.ClassDef):
            return rest[1] in class_members(node)
        return True
    return False


def citations(text: str) -> list[tuple[int, str, bool]]:
    """(line, cited name, exists) for every fedllm path and dotted name in ``text``."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        found += [(number, m, (REPO / m).is_file()) for m in PATH_RE.findall(line)]
        found += [(number, m, dotted_exists(m)) for m in DOTTED_RE.findall(line)]
    return found


def test_the_checker_tells_real_citations_from_stale_ones():
    text = ("`fedllm/site/runtime.py` and `fedllm/site/per_example.py`; fedllm.site.runtime.SiteRuntime.train_round,\n"
            "fedllm.fastpath.enable, fedllm.config.RunConfig, fedllm.privacy.ledger.verify_ledger (re-exported).\n"
            "Paths elsewhere are not fedllm's: /srv/fedllm/keys/x.py, ~/.cache/fedllm/models.\n"
            "Stale: `fedllm/fastpath/layers.py`, fedllm.keys, fedllm.site.runtime.per_sequence_loss,\n"
            "fedllm.site.runtime.SiteRuntime.no_such_method, fedllm.reports.render.\n")
    results = citations(text)
    assert [(n, ok) for _, n, ok in results] == [
        ("fedllm/site/runtime.py", True), ("fedllm/site/per_example.py", True),
        ("fedllm.site.runtime.SiteRuntime.train_round", True), ("fedllm.fastpath.enable", True),
        ("fedllm.config.RunConfig", True), ("fedllm.privacy.ledger.verify_ledger", True),
        ("fedllm/fastpath/layers.py", False), ("fedllm.keys", False), ("fedllm.site.runtime.per_sequence_loss", False),
        ("fedllm.site.runtime.SiteRuntime.no_such_method", False), ("fedllm.reports.render", False),
    ]


def test_docs_cite_only_modules_that_exist():
    files = doc_files()
    assert REPO / "docs" / "architecture.md" in files and REPO / "README.md" in files
    stale, seen = [], 0
    for path in files:
        for line, name, ok in citations(path.read_text(encoding="utf-8")):
            seen += 1
            if not ok:
                stale.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert seen > 50  # the map alone cites dozens: a broken pattern would find none
    assert stale == [], "docs cite modules that do not exist (moved or renamed?):\n" + "\n".join(stale)
