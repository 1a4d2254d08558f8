"""The package's layout (docs/layout.md): each unit imports only units below it, modules stay
under 400 lines and each says what it owns (read from the source with ast), and the modules'
old names still import."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "jaxconcept"

# Units (a top-level module or package) from the bottom up; a unit may import units of lower layers
# only (imports inside a unit are its own business).
LAYERS = [
    {"jaxconcept"},  # the package's root (its version)
    {"config", "store"},
    {"data", "nets"},
    {"vdm", "rundir"},
    {"runs"},
    {"train", "analysis"},
    {"elicit"},
    {"sd"},
    {"demo"},
    {"commands"},
    {"cli"},
    {"__main__"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def modules():
    for p in sorted(ROOT.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        yield p, "jaxconcept" if parts == ("__init__",) else parts[0]


def imported_units(tree):
    """The jaxconcept units a module imports anywhere in its body (functions included); the
    package uses absolute imports only."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not node.level, "relative import"
            name = node.module or ""
            if name == "jaxconcept":
                yield from (a.name for a in node.names)
            elif name.startswith("jaxconcept."):
                yield name.split(".")[1]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "jaxconcept":
                    yield "jaxconcept"
                elif a.name.startswith("jaxconcept."):
                    yield a.name.split(".")[1]


def test_units_import_only_lower_layers():
    wrong = []
    for p, unit in modules():
        assert unit in LAYER, f"{p}: unit {unit!r} has no layer in this test (and docs/layout.md)"
        for dep in set(imported_units(ast.parse(p.read_text()))):
            if dep == unit:
                continue
            if dep not in LAYER:
                wrong.append(f"{p.relative_to(ROOT)} imports jaxconcept.{dep}, which no layer holds")
            elif LAYER[dep] >= LAYER[unit]:
                wrong.append(f"{p.relative_to(ROOT)} ({unit}, layer {LAYER[unit]}) imports {dep} (layer {LAYER[dep]})")
    assert not wrong, "\n".join(wrong)


def test_modules_are_small_and_say_what_they_own():
    for p, _ in modules():
        text = p.read_text()
        assert len(text.splitlines()) <= 400, f"{p.relative_to(ROOT)}: {len(text.splitlines())} lines"
        if p.name != "__main__.py":
            doc = ast.get_docstring(ast.parse(text))
            assert doc and len(doc.splitlines()[0]) > 20, f"{p.relative_to(ROOT)}: no first line saying what it owns"


def test_the_rule_sees_a_wrong_import(tmp_path):
    """The layer rule can fail: an upward import is named."""
    tree = ast.parse("def f():\n    from jaxconcept.train import loop\n")
    units = set(imported_units(tree))
    assert units == {"train"} and LAYER["train"] > LAYER["data"]


def test_old_module_names_still_import_with_a_warning_naming_the_new_place():
    import importlib
    import importlib.util

    import pytest

    jc = importlib.import_module("jaxconcept")
    with pytest.warns(DeprecationWarning, match=r"jaxconcept\.diffusion is now jaxconcept\.vdm"):
        from jaxconcept import diffusion
    assert diffusion is importlib.import_module("jaxconcept.vdm")
    for old, new in jc.MOVED.items():  # every entry names a module that exists
        assert importlib.util.find_spec(new) is not None, (old, new)
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        jc.nonsense
