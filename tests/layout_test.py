"""The package's shape: layers by role, no import circle, no private name across modules."""

import ast
import re
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'vgg_flax')
# Lower layers never import higher ones (README, "Layout"). The command lines
# (vgg_flax.train, evaluate, ...) are the top layer.
LAYERS = {'runtime': 0, 'io': 0, 'config': 0, 'models': 1, 'data': 1, 'interop': 2,
          'training': 3, 'sweeps': 4}
TOP = 5


def _modules():
  """{'vgg_flax.x.y': path} for every module of the package."""
  found = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].replace(os.sep, '.')
        found[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = (
            os.path.join(dirpath, name))
  return found


MODULES = _modules()


def _imports(path):
  """(module, line, imported names) of every vgg_flax import outside `if TYPE_CHECKING`."""
  tree = ast.parse(open(path).read())
  skipped = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.If) and 'TYPE_CHECKING' in ast.dump(node.test):
      skipped |= {id(n) for n in ast.walk(node)}
  for node in ast.walk(tree):
    if id(node) in skipped:
      continue
    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('vgg_flax'):
      for alias in node.names:
        target = f'{node.module}.{alias.name}'
        yield (target if target in MODULES else node.module), node.lineno, alias.name
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith('vgg_flax'):
          yield alias.name, node.lineno, alias.name


def _layer(module):
  parts = module.split('.')
  if len(parts) == 1:
    return TOP  # vgg_flax/__init__.py: the package's API.
  return LAYERS.get(parts[1], TOP)


GRAPH = {m: sorted({t for t, _, _ in _imports(p) if t in MODULES and t != m})
         for m, p in MODULES.items()}


def test_lower_layers_never_import_higher_ones():
  wrong = [f'{m} imports {t}' for m, targets in GRAPH.items() for t in targets
           if _layer(t) > _layer(m) and not t.startswith(m + '.')]
  assert wrong == []


def test_no_import_circle():
  # A package's __init__ importing its own modules is not a circle.
  graph = {m: [t for t in ts if not (m == t.rpartition('.')[0] and m in MODULES)]
           for m, ts in GRAPH.items()}
  state, cycles = {}, []

  def visit(node, path):
    state[node] = 'open'
    for nxt in graph.get(node, ()):
      if state.get(nxt) == 'open':
        cycles.append(' -> '.join(path[path.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = 'done'
  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert cycles == []


def test_no_private_name_is_imported_across_modules():
  private = [f'{m}:{line} imports {name}' for m, p in MODULES.items()
             for _, line, name in _imports(p) if name.startswith('_')]
  assert private == []


@pytest.mark.parametrize('package', sorted({os.path.dirname(p) for p in MODULES.values()}))
def test_packages_stay_small(package):
  modules = [n for n in os.listdir(package) if n.endswith('.py') and n != '__init__.py']
  assert len(modules) <= 12, sorted(modules)


def test_no_module_grows_past_400_lines():
  long = {m: n for m, p in MODULES.items() if (n := len(open(p).read().splitlines())) > 400}
  assert long == {}


def test_the_readme_layout_table_is_the_tree():
  """Each package's row of README.md's Layout table names exactly its modules."""
  readme = open(os.path.join(ROOT, 'README.md')).read()
  rows = {}
  for line in readme.split('## Layout', 1)[1].splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) == 3 and cells[0].startswith('`vgg_flax/'):
      rows[cells[0].strip('`')] = sorted(re.findall(r'`(\w+)`', cells[1]))
  tree = {f'vgg_flax/{os.path.basename(d)}/': sorted(
      n[:-3] for n in os.listdir(d) if n.endswith('.py') and n != '__init__.py')
          for d in {os.path.dirname(p) for p in MODULES.values()} if d != PACKAGE}
  tree['vgg_flax/*.py'] = sorted(
      n[:-3] for n in os.listdir(PACKAGE)
      if n.endswith('.py') and n not in ('__init__.py', '__main__.py', 'config.py'))
  tree['vgg_flax/config.py'] = []
  assert rows == tree
