"""Fails on any import cycle among a package's modules, inside one layer too: import-linter's layers contract checks
only the imports between layers, so two modules of one layer that import each other pass it. `make test` runs this
after lint-imports.

  python tools/check_import_cycles.py [PACKAGE]   (default: capfast, from this checkout)

The import graph is grimp's (import-linter's), which counts imports inside functions too. Each strongly connected
component of more than one module is printed as a chain that starts and ends at one module and passes every
module of the component, `a -> b -> a`, with the lines that make each link; the exit status is then 1. Without
one it prints "no import cycles among N modules" and exits with 0.
"""

import sys
from collections import deque
from pathlib import Path

import grimp


def cycles(package: str) -> list[list[str]]:
    """One closed chain [a, b, ..., a] per import cycle in `package` (a strongly connected component of more than
    one module), through every module of the component; [] when the imports form no cycle."""
    return _cycles(_import_graph(package))


def _import_graph(package: str):
    return grimp.build_graph(package, cache_dir=None)


def _cycles(graph) -> list[list[str]]:
    edges = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    return [_closed_chain(component, edges) for component in _strongly_connected(edges) if len(component) > 1]


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm with an explicit stack (no recursion limit): the components of the graph, each sorted.
    `edges` maps every module to the modules it imports."""
    index, low = {}, {}
    stack, on_stack, components = [], set(), []

    def enter(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        return module, iter(sorted(edges[module]))

    for root in sorted(edges):
        if root in index:
            continue
        path = [enter(root)]
        while path:
            module, successors = path[-1]
            for successor in successors:
                if successor not in index:
                    path.append(enter(successor))
                    break
                if successor in on_stack:
                    low[module] = min(low[module], index[successor])
            else:  # every successor seen: leave `module`
                path.pop()
                if path:
                    parent = path[-1][0]
                    low[parent] = min(low[parent], low[module])
                if low[module] == index[module]:
                    components.append(sorted(_pop_component(module, stack, on_stack)))
    return components


def _pop_component(root: str, stack: list, on_stack: set) -> list[str]:
    component = []
    while not component or component[-1] != root:
        component.append(stack.pop())
        on_stack.discard(component[-1])
    return component


def _closed_chain(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """From the component's first module through each of the others and back, by shortest paths inside it."""
    members = set(component)
    chain = [component[0]]
    for target in [*component[1:], component[0]]:
        if target not in chain or target == component[0]:
            chain += _shortest_path(chain[-1], target, edges, members)[1:]
    return chain


def _shortest_path(start: str, goal: str, edges: dict[str, set[str]], members: set[str]) -> list[str]:
    """Breadth-first, within `members`; at least one step, so that start == goal finds the way back."""
    came_from = {}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for successor in sorted(edges[module] & members):
            if successor not in came_from:
                came_from[successor] = module
                if successor == goal:
                    return _unwind(came_from, start, goal)
                queue.append(successor)
    raise ValueError(f"no import path from {start} to {goal}")


def _unwind(came_from: dict, start: str, goal: str) -> list[str]:
    path = [goal]
    while len(path) == 1 or path[-1] != start:
        path.append(came_from[path[-1]])
    return path[::-1]


def describe(chain: list[str], graph) -> str:
    lines = [f"import cycle: {' -> '.join(chain)}"]
    for importer, imported in zip(chain, chain[1:]):
        for detail in graph.get_import_details(importer=importer, imported=imported):
            lines.append(f"  {importer} l.{detail['line_number']}: {detail['line_contents']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    package = argv[0] if argv else "capfast"
    graph = _import_graph(package)
    found = _cycles(graph)
    for chain in found:
        print(describe(chain, graph))
    if found:
        print(f"{len(found)} import cycle(s) among {len(graph.modules)} modules of {package}")
        return 1
    print(f"no import cycles among {len(graph.modules)} modules")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's capfast, not an installed one
    sys.exit(main(sys.argv[1:]))
