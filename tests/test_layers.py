"""The house has one-way stairs: a module imports only from its own layer or the layers below it.

data code knows nothing of models, the model files nothing of the toolkit (they must load from a Hub copy),
losses and metrics nothing of training, evaluation nothing of training, and nothing inside the package imports
the training script. Imports are read from the source (module level and inside functions alike).
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# lowest first; a module's layer is that of the longest prefix listed
LAYERS = [
    ["data_scripts"],
    ["configuration_dualencoder", "backbones_dualencoder"],
    ["modeling_dualencoder"],
    ["dualencoder"],  # processing, losses, metrics, cca, trainable, adapters, distributed, querybank, visualize...
    ["dualencoder.evaluation", "dualencoder.baselines", "dualencoder.rerank"],
    ["dualencoder.training", "dualencoder.apps"],
    ["run_contrastive", "dualencoder.cli"],
]
OURS = ("data_scripts", "configuration_dualencoder", "backbones_dualencoder", "modeling_dualencoder", "dualencoder",
        "run_contrastive")


def layer(module: str) -> int:
    best, found = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, module
    return found


def package_modules():
    files = [REPO / f"{name}.py" for name in ("configuration_dualencoder", "backbones_dualencoder",
                                               "modeling_dualencoder", "run_contrastive")]
    files += sorted((REPO / "dualencoder").rglob("*.py")) + sorted((REPO / "data_scripts").rglob("*.py"))
    for path in files:
        parts = path.relative_to(REPO).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imports_of(module: str, path: Path) -> set[str]:
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package (the model files' own try-block is level 1)
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if base and node.module else (node.module or base)
            else:
                name = node.module
            found.add(name)
    return {name for name in found if name and name.split(".")[0] in OURS}


@pytest.mark.parametrize("module, path", list(package_modules()), ids=lambda value: str(value))
def test_no_module_imports_a_layer_above_its_own(module, path):
    upward = sorted(name for name in imports_of(module, path) if layer(name) > layer(module))
    assert upward == [], f"{module} (layer {layer(module)}) imports {upward}"


def test_the_model_files_import_nothing_of_the_toolkit():
    for name in ("configuration_dualencoder", "backbones_dualencoder", "modeling_dualencoder"):
        toolkit = {imported for imported in imports_of(name, REPO / f"{name}.py")
                   if imported.split(".")[0] in ("dualencoder", "data_scripts", "run_contrastive")}
        assert toolkit == set(), (name, toolkit)
