"""The import graph of the non-test code: layers point one way, no cycles.

Layers: errors.py, layout.py and configs (0); data and model (1); trainer
(2); train.py, launch/, research/ and benchmarks/ (3). A module may import
its own layer or a lower one, never a higher one; on top of that model/
imports none of trainer/, data/, configs/ or launch/, and research/ imports
no benchmark. Imports inside functions count like those at the top of a
file.
"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {"errors": 0, "layout": 0, "configs": 0, "data": 1, "model": 1,
          "trainer": 2, "train": 3, "launch": 3, "research": 3,
          "benchmarks": 3}
FORBIDDEN = {"model": ("trainer", "data", "configs", "launch"),
             "research": ("benchmarks",)}


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every .py outside tests/."""
  modules = {}
  for top in LAYERS:
    if os.path.isfile(os.path.join(REPO, top + ".py")):
      modules[top] = os.path.join(REPO, top + ".py")
    for root, dirs, files in os.walk(os.path.join(REPO, top)):
      dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
      for f in files:
        if f.endswith(".py"):
          parts = os.path.relpath(os.path.join(root, f), REPO)[:-3].split(
              os.sep)
          if parts[-1] == "__init__":
            parts.pop()
          modules[".".join(parts)] = os.path.join(root, f)
  return modules


def _resolve(name: str, modules) -> str | None:
  """The longest prefix of `name` that is one of our modules."""
  parts = name.split(".")
  for end in range(len(parts), 0, -1):
    if ".".join(parts[:end]) in modules:
      return ".".join(parts[:end])
  return None


def _edges(modules) -> list[tuple[str, str, int]]:
  """(importer, imported, line) for every import of one of our modules."""
  edges = []
  for name, path in sorted(modules.items()):
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(up + ([node.module] if node.module else []))
        targets = [f"{base}.{a.name}" for a in node.names] + [base]
      else:
        continue
      for target in {_resolve(t, modules) for t in targets} - {None, name}:
        edges.append((name, target, node.lineno))
  return edges


MODULES = _modules()
EDGES = _edges(MODULES)


def _layer(module: str) -> int:
  return LAYERS[module.split(".")[0]]


def test_the_graph_is_read():
  # A parse that found nothing would pass every test below.
  assert {"model.gpt", "trainer.loop", "data.prepare", "train"} <= set(MODULES)
  assert ("trainer.run", "model") in {(a, b) for a, b, _ in EDGES}


def test_no_import_from_a_lower_layer_to_a_higher_one():
  upward = [f"{a} (layer {_layer(a)}, line {line}) imports {b} "
            f"(layer {_layer(b)})" for a, b, line in EDGES
            if _layer(a) < _layer(b)]
  assert upward == []


def test_model_and_research_import_nothing_they_must_not():
  found = [f"{a} (line {line}) imports {b}" for a, b, line in EDGES
           if b.split(".")[0] in FORBIDDEN.get(a.split(".")[0], ())]
  assert found == []


def test_no_import_cycles():
  graph = {m: sorted({b for a, b, _ in EDGES if a == m}) for m in MODULES}
  cycles, state = [], {}  # state: 1 on the path, 2 done

  def visit(module, path):
    state[module] = 1
    for target in graph[module]:
      if state.get(target) == 1:
        cycles.append(" -> ".join(path[path.index(target):] + [target]))
      elif target not in state:
        visit(target, path + [target])
    state[module] = 2

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert cycles == []
