"""The package's shape: imports point one way (config -> data -> model -> parallel -> training ->
entry points), `furnace_kernels` imports only torch and triton, there is no import cycle, and
every module imports on its own."""
import ast
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Layer of each first-party package; a module may import its own layer and the ones below.
LAYERS = {"furnace.config": 0, "furnace.tokens": 0, "furnace.presets": 0, "furnace.system": 0, "furnace.data": 1, "furnace.model": 2,
          "furnace.parallel": 3, "furnace.training": 4, "furnace.export": 5,
          "furnace.generate": 5, "furnace.plan": 5, "furnace.eval": 5, "furnace.evaluate": 5,
          "furnace.import_checkpoint": 5}
KERNELS_MAY_IMPORT = {"torch", "triton"}


def modules() -> dict[str, Path]:
    out = {}
    for base, pkg in ((ROOT / "furnace", "furnace"), (ROOT / "kernels", "furnace_kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = [pkg, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = modules()


def _targets(node, package: str) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    base = node.module or ""
    if node.level:
        anchor = package.split(".")
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    # `from pkg import sub` imports the submodule pkg.sub when there is one
    return {base} | {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}


def imports_of(name: str, path: Path, *, nested_only: bool = False) -> set[str]:
    """Every module `name` imports, at any depth of its code (lazy imports included), or with
    `nested_only` just those imported inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    roots = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))] if nested_only \
        else [tree]
    found = set()
    for root in roots:
        for node in ast.walk(root):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found |= _targets(node, package)
    return found


def first_party(target: str) -> str | None:
    """The module of this tree that `target` names (or the package holding it)."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


def layer(name: str) -> int:
    return next(v for k, v in LAYERS.items() if name == k or name.startswith(k + "."))


GRAPH = {name: {m for t in imports_of(name, path) if (m := first_party(t)) and m != name}
         for name, path in MODULES.items()}


def test_imports_point_one_way():
    wrong = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
             for a, deps in GRAPH.items() if a.startswith("furnace.") or a == "furnace"
             for b in deps if b.startswith("furnace.") and layer(b) > layer(a)]
    assert not wrong, "\n".join(wrong)


# The first-party imports made inside a function, each for a reason.
LAZY = {("furnace.training.launch", "furnace.training.trainer"): "the ranks alone load the trainer (seconds)",
        ("furnace.training.launch", "furnace.training.planner"): "the model code loads only for parallel.layout=auto",
        ("furnace_kernels", "furnace_kernels.flash_attention"): "Triton compiles at import: only where it runs",
        ("furnace_kernels", "furnace_kernels.media_attention_triton"): "Triton compiles at import: only where it runs",
        **{("furnace_kernels", f"furnace_kernels.{m}"): "imports triton: only where it runs"
           for m in ("norms", "glu", "rope")},
        ("furnace_kernels.linear_ce", "furnace_kernels.linear_ce_triton"): "imports triton: only where it runs"}


def test_first_party_imports_stand_at_module_top():
    lazy = {(name, m) for name, path in MODULES.items() for t in imports_of(name, path, nested_only=True)
            if (m := first_party(t)) and m != name}
    assert lazy <= set(LAZY), f"imports inside functions (move them to the top): {sorted(lazy - set(LAZY))}"


def test_kernels_import_only_torch_and_triton():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    wrong = [f"{name} imports {t}" for name, path in MODULES.items() if name.startswith("furnace_kernels")
             for t in imports_of(name, path)
             if t.split(".")[0] not in stdlib | KERNELS_MAY_IMPORT and not t.startswith("furnace_kernels")]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module is the first of this tree to be imported in its own process (forked from one
    that holds only the third-party libraries), so a cycle fails whichever module starts it."""
    import subprocess

    code = (
        "import os, sys, importlib, traceback\n"
        "import torch, numpy, PIL.Image, transformers, webdataset, tokenizers, safetensors, yaml, tqdm\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('furnace', 'furnace_kernels')]\n"
        f"names = {sorted(MODULES)!r}\n"
        "failed, running = [], []\n"
        "def finish(pid, r, name):\n"
        "    msg = os.read(r, 4096).decode()\n"
        "    os.close(r)\n"
        "    if os.waitpid(pid, 0)[1] != 0:\n"
        "        failed.append(f'{name}: {msg}')\n"
        "for name in names:\n"
        "    r, w = os.pipe()\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os.close(r)\n"
        "        try:\n"
        "            importlib.import_module(name)\n"
        "            os._exit(0)\n"
        "        except BaseException:\n"
        "            os.write(w, traceback.format_exc()[-2000:].encode())\n"
        "            os._exit(1)\n"
        "    os.close(w)\n"
        "    running.append((pid, r, name))\n"
        "    if len(running) == max(1, len(os.sched_getaffinity(0))):  # one child a core\n"
        "        finish(*running.pop(0))\n"
        "for job in running:\n"
        "    finish(*job)\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
