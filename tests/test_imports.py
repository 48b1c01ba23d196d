"""Arrows point one way: no module of spinenet_tf imports one of a higher layer, at module
level or inside a function."""

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "spinenet_tf"

# Bottom to top. A module belongs to its longest matching prefix; it may import modules of
# lower layers, and of its own layer only inside its own entry (ops may use ops, not data).
LAYERS = [
    ["spinenet_tf.specs", "spinenet_tf.ops", "spinenet_tf.console"],
    # Drawings paste Mask R-CNN's masks with spinenet_tf.ops.masks.
    ["spinenet_tf.layers", "spinenet_tf.data", "spinenet_tf.evaluation", "spinenet_tf.visualize"],
    ["spinenet_tf.models"],
    ["spinenet_tf.tasks"],
    ["spinenet_tf.training", "spinenet_tf.convert", "spinenet_tf.tools"],
    # Serving loads what training writes (gin experiments, checkpoints).
    ["spinenet_tf.serving"],
    # The commands and the public API.
    [
        "spinenet_tf",
        "spinenet_tf.train",
        "spinenet_tf.export",
        "spinenet_tf.predict",
        "spinenet_tf.convert.__main__",
    ],
]


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, entry) of a module by its longest matching prefix."""
    best = None
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            if module == entry or module.startswith(entry + "."):
                if best is None or len(entry) > len(best[1]):
                    best = (index, entry)
    if best is None:
        raise KeyError(f"{module} is in no layer of tests/test_imports.py LAYERS")
    return best


def module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, package_dir: Path):
    """Yields (line, imported spinenet_tf module) for every import statement of a file,
    wherever it is (module level, functions, branches)."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # `from spinenet_tf import specs` imports a module; `from x import name` its
                # package.
                candidate = f"{base}.{alias.name}"
                is_module = (package_dir.parent / Path(*candidate.split("."))).with_suffix(
                    ".py"
                ).exists() or (package_dir.parent / Path(*candidate.split("."))).is_dir()
                yield node.lineno, candidate if is_module else base


def violations(package_dir: Path = PACKAGE_DIR) -> list[str]:
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        source = module_name(path, package_dir)
        source_layer, source_entry = layer_of(source)
        for line, target in sorted(set(imported_modules(path, package_dir))):
            if target != "spinenet_tf" and not target.startswith("spinenet_tf."):
                continue
            target_layer, target_entry = layer_of(target)
            if target_layer > source_layer or (
                target_layer == source_layer and target_entry != source_entry
            ):
                found.append(
                    f"{path.relative_to(package_dir.parent)}:{line}: {source} (layer "
                    f"{source_layer}, {source_entry}) imports {target} (layer {target_layer}, "
                    f"{target_entry})"
                )
    return found


def test_every_module_has_a_layer():
    for path in PACKAGE_DIR.rglob("*.py"):
        layer_of(module_name(path, PACKAGE_DIR))


def test_no_module_imports_a_higher_layer():
    found = violations()
    assert not found, "imports that point up:\n" + "\n".join(found)


def test_an_upward_import_is_named(tmp_path):
    """The check fails, naming module and import, on a low module importing a high one,
    inside a function (where a cycle used to hide) as at module level."""
    package = tmp_path / "spinenet_tf"
    (package / "ops").mkdir(parents=True)
    (package / "training").mkdir()
    for init in (package, package / "ops", package / "training"):
        (init / "__init__.py").write_text("")
    (package / "training" / "trainer.py").write_text("")
    (package / "ops" / "boxes.py").write_text(
        "import numpy\n\ndef f():\n    from spinenet_tf.training import trainer\n"
    )
    (package / "ops" / "anchors.py").write_text("from ..training.trainer import Trainer\n")
    found = violations(package)
    assert len(found) == 2
    assert "spinenet_tf.ops.boxes (layer 0, spinenet_tf.ops) imports " in found[1]
    assert "spinenet_tf.training.trainer" in found[1] and "boxes.py:4" in found[1]
    assert "spinenet_tf.ops.anchors" in found[0] and "spinenet_tf.training.trainer" in found[0]
