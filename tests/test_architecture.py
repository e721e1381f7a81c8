"""The structure the README's architecture section promises: layers that import one way,
and model facts declared with the model, checked where they are declared."""
import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch.nn as nn

import featurezoo as fz
from featurezoo.cfg import ModelCfg, generate_default_cfgs
from tests.zoo import zoo_models

PACKAGE = Path(fz.__file__).parent

# Bottom to top; a module may import only from its own layer's lower entries and the layers below.
LAYERS = [
    ["featurezoo.cfg", "featurezoo.atomic", "featurezoo._optional", "featurezoo.freezing", "featurezoo.validate"],
    ["featurezoo.registry"],
    ["featurezoo.features", "featurezoo.checkpoint"],
    ["featurezoo.builder"],
    ["featurezoo.factory"],
    ["featurezoo.layers", "featurezoo.necks", "featurezoo.models", "featurezoo.detection", "featurezoo.fx",
     "featurezoo.discovery",
     "featurezoo.onnx_export", "featurezoo.inference"],
    ["featurezoo.cli", "featurezoo.extract"],
]


def _layer_of(module: str) -> int:
    for depth, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return depth
    raise AssertionError(f"{module} is in no layer of LAYERS: add it")


def _package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        name = ".".join(parts)
        if name not in ("featurezoo", "featurezoo.__main__"):
            yield name, path


MODULES = dict(_package_modules())


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer_of(name)


# featurezoo/__init__.py imports the public API and the zoo, so importing any submodule runs it; the
# check is therefore on what each module's *own* imports pull in, read from its source, plus one fresh
# interpreter per layer that imports the layer's modules without the package's __init__ side effects.
def _own_imports(name: str, path: Path, tree: ast.Module):
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("featurezoo"):
                if node.module is None or target in MODULES and MODULES[target].name == "__init__.py":
                    # "from . import x" / "from .pkg import x": x may be a submodule
                    for alias in node.names:
                        sub = f"{target}.{alias.name}"
                        yield node, (sub if sub in MODULES else target)
                else:
                    yield node, target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("featurezoo"):
                    yield node, alias.name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_one_way(name):
    """No module imports a layer above its own, and no featurezoo import hides inside a function."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    own = _layer_of(name)
    for node, target in _own_imports(name, path, tree):
        assert id(node) in top_level, (
            f"{name}:{node.lineno} imports {target} inside a function or block; imports of featurezoo "
            f"modules belong at the top of the module"
        )
        if target == "featurezoo":
            assert name.startswith(("featurezoo.cli", "featurezoo.extract")), (
                f"{name}:{node.lineno} imports the package root (which imports everything)")
            continue
        assert _layer_of(target) <= own, f"{name}:{node.lineno} imports {target}, a layer above it"


@pytest.mark.parametrize("depth", range(len(LAYERS) - 1))
def test_library_never_loads_a_layer_above(depth):
    """Loaded alone, in a fresh interpreter, the modules of a layer pull in nothing above it
    (read from sys.modules; the package root is bypassed so its re-exports do not count)."""
    names = [n for n in MODULES if _layer_of(n) == depth and n.count(".") == 1 or n in LAYERS[depth]]
    code = (
        "import importlib.util, json, sys, types\n"
        f"root = types.ModuleType('featurezoo'); root.__path__ = [{str(PACKAGE)!r}]\n"
        "sys.modules['featurezoo'] = root\n"
        f"for name in {sorted(set(names))!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('featurezoo.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    above = [m for m in loaded if _layer_of(m) > depth]
    assert not above, f"layer {LAYERS[depth]} loads {above}"


# -- declared model facts -----------------------------------------------------------------------


# Heads a cfg names that exist only with an option (MindCV's GoogLeNet builds its aux heads on request).
OPTIONAL_HEADS = {"googlenet": {"aux_logits": True}}


@pytest.mark.parametrize("name", zoo_models())
def test_declared_cfg_names_real_modules_and_timm_models(name):
    cfg = fz.get_model_cfg(name)
    assert cfg.name == name and (cfg.url == "" or cfg.url.startswith("https://")), cfg
    model = fz.build_on_meta(name, **OPTIONAL_HEADS.get(name, {}))
    assert model.default_cfg == cfg
    for module in cfg.first_conv_names + cfg.classifier_names:
        assert isinstance(model.get_submodule(module), nn.Module), f"{name}: cfg names {module!r}"
    assert isinstance(model.get_submodule(cfg.first_conv_names[0]), nn.Conv2d)
    if cfg.timm_twin:
        assert cfg.timm_twin in timm.list_models(), f"{name}: timm has no model {cfg.timm_twin!r}"
    if cfg.input_sides or cfg.fixed_input_size or cfg.min_input_size:
        assert cfg.size_note


def test_a_misspelt_declaration_is_an_error_where_it_is_made():
    with pytest.raises(ValueError, match="unknown key.*'urll'"):
        generate_default_cfgs({"net": {"urll": "x"}})
    with pytest.raises(ValueError, match="timm_twins names model.*'resnet5O'"):
        generate_default_cfgs({"resnet50": {}}, timm_twins={"resnet5O": "resnet50"})
    with pytest.raises(ValueError, match="without timm_twins"):
        generate_default_cfgs({"resnet50": {}}, timm_renames=((r"^fc\.", "classifier."),))
    with pytest.raises(ValueError, match="not a regular expression"):
        ModelCfg(name="x", timm_twin="y", timm_renames=(("(", "a"),))
    with pytest.raises(ValueError, match="size_note"):
        ModelCfg(name="x", fixed_input_size=True)
    with pytest.raises(ValueError, match=r"min_input_size must be \(channels, height, width\)"):
        ModelCfg(name="x", min_input_size=(75, 75), size_note="why")


def test_a_builder_missing_from_its_modules_default_cfgs_is_an_error_at_registration():
    namespace = {"default_cfgs": generate_default_cfgs({"fz_arch_test_a": {}})}
    exec("def fz_arch_test_b(pretrained=False, **kwargs):\n    return None\n", namespace)
    with pytest.raises(ValueError, match="declares default_cfgs but has no entry for 'fz_arch_test_b'"):
        fz.register_model(namespace["fz_arch_test_b"])
    assert not fz.is_model("fz_arch_test_b")


def test_registry_answers_from_declarations_without_building(monkeypatch):
    """list_models and get_model_cfg never call a builder."""
    import featurezoo.registry as registry

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(registry, "call_builder", refuse)
    assert fz.list_models("resnet*", exclude="resnetv2*") == [
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    cfg = fz.get_model_cfg("vgg16")
    assert cfg.fixed_input_size and cfg.valid_padding and cfg.url.endswith(".ckpt")
    assert dataclasses.replace(cfg) == cfg
