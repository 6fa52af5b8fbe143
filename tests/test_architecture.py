"""The package's structure (docs/architecture.md) and its one pure design decision, the reference plan."""

import ast
import inspect
import pathlib
import re

import pytest

from trl_unlearn._trl_compat import TRL_ATTRIBUTES
from trl_unlearn.reference import plan_reference

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "trl_unlearn"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"
COMPAT = {"trl_unlearn._trl_compat", "trl_unlearn.evaluation._lm_eval_compat"}


def _modules():
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(name, path):
    """The package modules `name` imports (module-level and inside functions), and the imported names."""
    base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")[: len(base.split(".")) - node.level + 1]
                module = ".".join(parts + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_imports_only_point_down():
    """No import cycle between the package's modules (a package importing its own children aside)."""
    modules = _modules()
    edges = {m: set() for m in modules}
    for m, path in modules.items():
        for module, names in _imports(m, path):
            for target in [module] + [f"{module}.{n}" for n in names]:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != m and not m.startswith(target + "."):
                    edges[m].add(target)
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            cycle = stack[stack.index(m) :] + [m]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if m in seen:
            return
        stack.append(m)
        for t in edges[m]:
            visit(t)
        stack.pop()
        seen.add(m)

    for m in modules:
        visit(m)


def test_private_trl_names_in_one_module_and_no_mock():
    users = set()
    for m, path in _modules().items():
        for module, names in _imports(m, path):
            uses_mock = module.startswith("unittest.mock") or (module == "unittest" and "mock" in names)
            assert not uses_mock, f"{m} uses unittest.mock"
            if module.split(".")[0] in ("trl", "transformers") and any(n.startswith("_") for n in names):
                users.add(m)
    assert users <= {"trl_unlearn._trl_compat"}, users


def _layers():
    """`{component: layer}` from the block in docs/architecture.md (a component: a top-level module or folder)."""
    block = ARCHITECTURE.read_text().split("<!-- layers: read by tests/test_architecture.py -->")[1]
    block = block.split("```text")[1].split("```")[0]
    layers = {}
    for line in block.strip().splitlines():
        head, _, names = line.partition(":")
        for name in names.split():
            layers[name] = int(head.split()[1])
    return layers


def _component(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_imports_follow_the_documented_layers():
    """A module imports its own component or components of layers above (docs/architecture.md), never sideways."""
    layers, modules = _layers(), _modules()
    components = {_component(m) for m in modules} - {None}
    assert components == set(layers), f"undocumented {components - set(layers)}, gone {set(layers) - components}"
    bad = []
    for m, path in modules.items():
        for module, names in _imports(m, path):
            if not module.startswith("trl_unlearn"):
                continue
            for target in [f"{module}.{n}" for n in names] if module == "trl_unlearn" else [module]:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                src, dst = _component(m), _component(target)
                if src is None or dst is None or src == dst:
                    continue
                if layers[dst] >= layers[src]:
                    bad.append(f"{m} (layer {layers[src]}) imports {target} (layer {layers[dst]})")
    assert not bad, "\n".join(bad)


def test_private_upstream_attributes_only_through_the_compat_module():
    """Every `x._name` in the package (outside the compat modules) is either the package's own name or one that
    `_trl_compat.TRL_ATTRIBUTES` lists: a private attribute of TRL's or transformers' trainer used anywhere else
    (e.g. `self._signature_columns`) fails here."""
    import transformers.trainer
    import trl.trainer.dpo_trainer

    upstream = inspect.getsource(trl.trainer.dpo_trainer) + inspect.getsource(transformers.trainer)
    found = []
    for m, path in _modules().items():
        if m in COMPAT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if node.attr not in TRL_ATTRIBUTES and re.search(rf"\.{node.attr}\b", upstream):
                    found.append(f"{m}:{node.lineno} {ast.unparse(node)}")
    assert not found, found


def test_evaluation_needs_no_trainer():
    for m, path in _modules().items():
        if m.startswith("trl_unlearn.evaluation"):
            for module, _ in _imports(m, path):
                assert not module.startswith("trl_unlearn.methods"), (m, module)


def test_nothing_below_the_cli_imports_it():
    for m, path in _modules().items():
        if not m.startswith("trl_unlearn.cli"):
            for module, _ in _imports(m, path):
                assert not module.startswith("trl_unlearn.cli"), (m, module)


@pytest.mark.parametrize(
    "needs_ref,kl,precompute,has_ref,peft,instance,expected",
    [
        # reference-free methods
        (False, False, None, False, False, True, ("none", False, False, False)),
        (False, True, None, False, False, True, ("frozen_copy", False, True, True)),
        (False, True, None, False, False, False, ("frozen_copy", False, True, False)),  # TRL loads it from the path
        (False, True, None, False, True, True, ("adapters_off", False, True, False)),
        # NPO
        (True, False, None, False, False, True, ("precomputed", True, False, False)),
        (True, False, None, True, False, True, ("explicit", False, True, False)),
        (True, False, True, True, False, True, ("precomputed", True, False, False)),
        (True, False, None, False, True, True, ("adapters_off", False, True, False)),
        (True, False, True, False, True, True, ("precomputed", True, False, False)),
        (True, False, False, False, False, True, ("frozen_copy", False, True, True)),
        (True, True, None, False, False, True, ("frozen_copy", False, True, True)),
        (True, True, True, True, False, True, ("explicit", True, True, False)),
    ],
)
def test_plan_reference_table(needs_ref, kl, precompute, has_ref, peft, instance, expected):
    plan = plan_reference(
        forget_needs_reference=needs_ref,
        retain_kl=kl,
        precompute=precompute,
        has_ref_model=has_ref,
        uses_peft=peft,
        model_is_instance=instance,
    )
    assert (plan.kind, plan.precompute_forget, plan.live, plan.copy_model) == expected
    assert plan.describe()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(forget_needs_reference=False, retain_kl=False, precompute=None, has_ref_model=True), "reference-free"),
        (
            dict(forget_needs_reference=True, retain_kl=True, precompute=True, has_ref_model=False),
            "needs a live reference",
        ),
    ],
)
def test_plan_reference_refuses_contradictions(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_reference(uses_peft=False, model_is_instance=True, **kwargs)
