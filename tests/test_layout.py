"""The package's shape: no import circle, data flowing one way, short functions, flags only in
the CLI, one trial lifecycle and one slot call."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hpo"


def module_imports() -> dict[str, set[str]]:
    """hpo module -> the hpo modules it imports, at import time or inside a function (a function's
    import runs later, but a circle through it still means two modules that cannot be read, or
    moved, apart); imports under `if TYPE_CHECKING:` never run and are left out."""
    names = {f"hpo.{p.relative_to(PACKAGE).with_suffix('').as_posix().replace('/', '.')}".removesuffix(".__init__")
             for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = f"hpo.{path.relative_to(PACKAGE).with_suffix('').as_posix().replace('/', '.')}".removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        typing_only = {id(sub) for node in ast.walk(tree)
                       if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                       for sub in ast.walk(node)}
        edges: set[str] = set()
        for sub in ast.walk(tree):
            if id(sub) in typing_only:
                continue
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("hpo"):
                edges.add(sub.module)
                edges.update(f"{sub.module}.{a.name}" for a in sub.names)
            elif isinstance(sub, ast.Import):
                edges.update(a.name for a in sub.names if a.name.startswith("hpo"))
        graph[name] = {e for e in edges if e in names and e != name and e != "hpo"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(module_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# The packages in the order data flows; a module may import from its own package or an earlier one.
LAYERS = ["errors", "_private", "spec", "storage", "data", "runtime", "training", "integrations", "search", "ui",
          "execution", "api", "cli", "__main__"]
# Imports that go up a layer, each with why. Validation builds a sampler with Optuna's own
# constructor to check its arguments (imported when a spec names one), so the rule lives once.
ALLOWED_UPWARD: set[tuple[str, str]] = set()  # none, not even a lazy import (issue 45)


def all_imports() -> list[tuple[str, str, int]]:
    """(module, imported hpo module, line) for every import, including those inside functions."""
    out = []
    for path in PACKAGE.rglob("*.py"):
        name = f"hpo.{path.relative_to(PACKAGE).with_suffix('').as_posix().replace('/', '.')}".removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hpo."):
                out.append((name, node.module, node.lineno))
    return out


def test_packages_depend_only_on_earlier_stages() -> None:
    """spec -> storage -> data -> runtime -> training -> search -> ui -> execution -> cli: a
    package that reached up the flow would make the stages impossible to read (or test) alone."""
    def layer(module: str) -> str:
        return module.split(".")[1] if module.count(".") else "__init__"

    upward = [f"{m} -> {to} (line {line})" for m, to, line in all_imports()
              if m != "hpo" and (m, to) not in ALLOWED_UPWARD
              and LAYERS.index(layer(to)) > LAYERS.index(layer(m))]
    assert not upward, "imports against the data flow: " + "; ".join(upward)
    assert set(LAYERS) >= {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
                           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}, \
        "a new top-level module or package: give it a place in LAYERS"


def test_functions_fit_on_a_screen() -> None:
    """A function longer than ~60 lines hides its steps from the reader and from the tests; one
    that must be longer says why in a `# long: ...` comment on its first line."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 65 and "# long:" not in lines[node.lineno - 1]:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over 65 lines: " + ", ".join(long)


def test_only_the_cli_spells_flags() -> None:
    """A flag written outside hpo/cli (a rebuilt `hpo worker` command line, an error naming
    `--gpus`) breaks at run time when the flag is renamed: below the CLI, settings are typed and
    errors name the setting. Docstrings and comments may mention flags."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "cli":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if re.search(r"(^|[\s(\[`])--[a-z][a-z-]+", node.value):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value[:40]!r}")
    assert not offenders, "flags spelled below hpo/cli: " + ", ".join(offenders)


def calls_outside(names: set[str], allowed: set[str]) -> list[str]:
    """`x.name(...)` and `name(...)` calls of any of `names` in modules other than `allowed` (paths
    under hpo/); `x.upload(..., "model.pt", ...)` counts as a call named `upload model.pt`."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        where = path.relative_to(PACKAGE).as_posix()
        if where in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = (node.func.attr if isinstance(node.func, ast.Attribute)
                    else node.func.id if isinstance(node.func, ast.Name) else "")
            if any(isinstance(a, ast.Constant) and a.value == "model.pt" or isinstance(a, ast.Name)
                   and a.id == "MODEL_FILE" for a in node.args):
                name += " model.pt"
            if name in names:
                found.append(f"hpo/{where}:{node.lineno} {name}()")
    return found


def test_one_lifecycle_starts_and_ends_every_trial() -> None:
    """One-at-a-time and fused trials are claimed, told their state, given their best model and
    rid of their checkpoints in hpo/runtime/lifecycle.py alone (issue 29): a second home for any
    of it is where the two kinds of trial would drift apart."""
    offenders = calls_outside({"tell", "optimize", "claim", "remove_checkpoint", "upload model.pt", "set_constraint",
                               "requeue"}, {"runtime/lifecycle.py", "storage/artifacts.py", "storage/retry.py"})
    assert not offenders, "a trial started or ended outside the lifecycle: " + ", ".join(offenders)


def test_one_module_writes_every_trial_ending() -> None:
    """A live trial's ending, a dead worker's trial (stale or orphaned), an abandoned one and a lost
    rank's are written in hpo/runtime/lifecycle.py alone (issue 45): their reason, retry cap and
    checkpoint rule cannot drift apart. Optuna's own fail_stale_trials would fail a trial without
    its reason, so it is not called either. _private.py holds the private APIs it reaches."""
    offenders = calls_outside({"tell", "set_trial_state_values", "fail_stale_trials"},
                              {"runtime/lifecycle.py", "_private.py"})
    assert not offenders, "a trial's final state written outside the lifecycle: " + ", ".join(offenders)


def test_workers_take_trial_slots_with_one_call() -> None:
    """Creating a trial within the study's budget is one call (hpo/search/slots.py): the budget
    lock (made or taken), the count and `study.ask` never appear in a worker loop."""
    offenders = calls_outside({"ask", "acquire", "BudgetLock"}, {"search/slots.py", "search/proxy.py", "search/results.py",
                                                   "storage/budget_lock.py"})
    offenders += [f"{m} imports the budget lock" for m, to, _ in all_imports()
                  if to == "hpo.storage.budget_lock" and m.startswith("hpo.execution")]
    assert not offenders, "trial slots taken outside hpo/search/slots.py: " + ", ".join(offenders)


def test_one_run_sequence() -> None:
    """`hpo run`, `hpo worker`, forked workers and `hpo.run()` open a run the same way, each by a
    function named for what it opens (hpo.execution.launch: run_spec, join_study, forked_run;
    issue 45): the study held on a SQLite file and the storage opened in one step (`_storage`),
    the user's code and data prepared where a spec is run or a study joined; a second copy of
    either step drifts."""
    homes = {"sole_writer": {"_storage"}, "prepare": {"run_spec", "join_study"}}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in homes
                        and func.name not in homes[node.func.id]):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {func.name} calls "
                                     f"{node.func.id}()")
    assert not offenders, "the run sequence outside its step: " + ", ".join(offenders)


def test_no_module_reaches_into_another_modules_private_members() -> None:
    """`x._name` is for x's own class, `_name` for its own module: a module that reaches into
    another's (a runner setting `trial._state`, a CLI command importing `_open`) breaks when that
    one changes its insides. Optuna's and torch's private members go through hpo/_private.py."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_private.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                own = (isinstance(base, ast.Name) and base.id in ("self", "cls")) or (
                    isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super")
                if not own and ast.unparse(node) != "os._exit":  # os._exit is public, despite its name
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hpo"):
                offenders += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {node.module}.{a.name}"
                              for a in node.names if a.name.startswith("_") and a.name != "_private"]
    assert not offenders, "private members used from outside: " + ", ".join(offenders)


def test_only_front_ends_write_to_the_terminal() -> None:
    """The library reports through the listener, a note on the study handle, or an exception; only
    the front ends write to the terminal (issue 45): the CLI, the listener of a worker forked from a
    run (it has no terminal of its own to share a status line on) and the small parent that watches
    `hpo run` (it prints the run's last line after its child is gone)."""
    front_ends = {"execution/supervisor.py"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        where = path.relative_to(PACKAGE).as_posix()
        if where.startswith(("cli/", "starter/")) or where in front_ends:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else ""
            if called == "print" and not _inside(path, node, "Notes"):
                offenders.append(f"hpo/{where}:{node.lineno}")
    assert not offenders, "printed outside a front end: " + ", ".join(offenders)


def _inside(path: Path, node: ast.AST, class_name: str) -> bool:
    """Whether `node` is in the body of class `class_name` of the file at `path`."""
    for cls in ast.walk(ast.parse(path.read_text())):
        if isinstance(cls, ast.ClassDef) and cls.name == class_name:
            if any(getattr(n, "lineno", None) == node.lineno for n in ast.walk(cls)):
                return True
    return False
