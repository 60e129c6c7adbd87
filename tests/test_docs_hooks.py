"""Meta-test: every hook in collector/hookspecs.py is documented and exercised by a test."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import collector.hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKSPECS = Path(collector.hookspecs.__file__)
PLUGINS_DOC = ROOT / "docs" / "plugins.md"


def hook_signatures() -> dict[str, str]:
    """Each hookspec's name and its signature as written in the source, on one line."""
    tree = ast.parse(HOOKSPECS.read_text(encoding="utf-8"))
    hooks: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        if not any(ast.unparse(d) == "hookspec" for d in node.decorator_list):
            continue
        returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
        hooks[node.name] = f"{node.name}({ast.unparse(node.args)}){returns}"
    return hooks


def test_hookspecs_are_found() -> None:
    """The parser finds the hooks the plugin system is built on (a guard for the tests below)."""
    hooks = hook_signatures()
    assert "collector_register_sinks" in hooks
    assert len(hooks) >= 5
    assert (
        hooks["collector_tenant_failed"]
        == "collector_tenant_failed(tenant: str, error: str) -> None"
    )


def test_every_hook_is_documented_under_its_exact_signature() -> None:
    """docs/plugins.md shows each hook's exact signature, as a heading of its own section."""
    doc = PLUGINS_DOC.read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,4} `?(collector_\w+)`?", doc, flags=re.MULTILINE))
    for name, signature in hook_signatures().items():
        assert signature in doc, f"docs/plugins.md lacks the signature {signature}"
        assert name in headings, f"docs/plugins.md has no section for {name}"


def test_docs_name_no_hook_that_does_not_exist() -> None:
    """Every collector_ hook signature in docs/plugins.md is a real hook."""
    doc = PLUGINS_DOC.read_text(encoding="utf-8")
    documented = set(re.findall(r"\b(collector_\w+)\(", doc))
    assert documented <= set(hook_signatures())


def test_every_hook_is_exercised_by_a_test() -> None:
    """Each hook is implemented by a hookimpl in some test module, so calling it is tested."""
    me = Path(__file__).name
    sources = {
        path.name: path.read_text(encoding="utf-8")
        for path in (ROOT / "tests").glob("test_*.py")
        if path.name != me
    }
    for name in hook_signatures():
        implemented = [file for file, text in sources.items() if re.search(rf"def {name}\(", text)]
        assert implemented, f"no test implements the hook {name}"
