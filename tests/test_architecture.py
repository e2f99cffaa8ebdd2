"""The layering of ringminus (README "Architecture"), checked on the source: which top-level
package imports which (runtime imports; ``if TYPE_CHECKING:`` ones are annotations only), no
import cycle between packages, no module reaching into another package's private names, and
the features using the core only through its services."""
import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

from ringminus.emulator.plugins import SERVICES

PACKAGE = Path(__file__).resolve().parents[1] / "ringminus"
FEATURES = ("intercepts", "svm", "smm", "hypercalls", "platform")
# What each layer may import (besides itself and the standard library).
ALLOWED = {
    "arch": set(),
    "binlayout": set(),
    "decode": {"arch"},
    "emulator": {"arch", "decode", "binlayout"},
    "intercepts": {"arch", "decode", "emulator", "binlayout"},
    "hypercalls": {"arch", "decode", "emulator"},
    "svm": {"arch", "decode", "emulator", "binlayout", "intercepts"},
    "smm": {"arch", "decode", "emulator", "binlayout"},
    "platform": {"arch", "decode", "emulator", "smm"},
    "machine": {"arch", "decode", "emulator", *FEATURES},
    "cli": {"arch", "decode", "emulator", "machine", "harness", "sigint", *FEATURES},
}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ringminus"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def _runtime_imports(name: str, path: Path):
    """(module imported, names) for every import outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("ringminus"):
                yield target, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ringminus"):
                    yield alias.name, []


def _package_graph() -> dict[str, set[str]]:
    graph = defaultdict(set)
    for name, path in _modules():
        for target, names in _runtime_imports(name, path):
            targets = [target] if target != "ringminus" else [
                f"ringminus.{n}" if (PACKAGE / n).is_dir() or (PACKAGE / f"{n}.py").exists() else "ringminus"
                for n in names]
            for module in targets:
                if _top(module) != _top(name):
                    graph[_top(name)].add(_top(module))
    return graph


def test_each_layer_imports_only_the_layers_below_it():
    graph = _package_graph()
    for package, allowed in ALLOWED.items():
        assert graph.get(package, set()) <= allowed, f"{package} imports {sorted(graph[package] - allowed)}"


def test_no_import_cycle_between_packages():
    graph = _package_graph()

    def reaches(start, goal, seen=()):
        return any(nxt == goal or nxt not in seen and reaches(nxt, goal, (*seen, nxt)) for nxt in graph.get(start, ()))
    cycles = [package for package in graph if reaches(package, package)]
    assert not cycles, f"packages in an import cycle: {cycles}"


def test_no_module_imports_a_private_name_of_another_package():
    for name, path in _modules():
        for target, names in _runtime_imports(name, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private or _top(target) == _top(name), f"{name} imports {private} from {target}"


@pytest.mark.parametrize("feature", FEATURES)
def test_features_use_the_core_through_its_services(feature):
    # ``machine.X`` in a feature is a service of the core, or state a feature keeps on the
    # machine (its own or another's: machine.smm, machine.svm…), never a private name.
    kept = {"smm", "svm", "smram", "chipset", "hypercalls", "last_exit", "pending_hypercall", "checker_caches",
            "outside_guest_checks", "svm_caches", "smm_codecs", "smm_guest_mode_hooks", "board"}
    registry = {name for name in dir(__import__("ringminus").Machine) if name.startswith("add_") or name.startswith("set_")}
    used = set()
    for path in (PACKAGE / feature).rglob("*.py"):
        used |= set(re.findall(r"\bmachine\.(\w+)", path.read_text()))
    unknown = sorted(used - set(SERVICES) - kept - registry)
    assert not unknown, f"{feature} uses machine.{unknown}: not a service (emulator/plugins.SERVICES)"
