#!/usr/bin/env python3
"""Fails if the modules of a crate import each other in a circle.

Reads every `crate::a::b` path (in `use` lines and in code) and every `super::` import of each source file of the
given crates, resolves it to the module file it names, and looks for cycles between files. A module may use the
vocabulary its parent `mod.rs` defines (types declared there), which is not counted: declaring a child module is
not an import. Comments are ignored.

Usage: python3 scripts/module-cycles.py crates/envelope-sidecar/src [more/src ...]
"""
import os
import re
import sys


def modules(root):
    """Module path (tuple) -> file, for every .rs file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
            if rel[-1] in ("mod", "lib", "main"):
                rel = rel[:-1]
            out[tuple(rel)] = os.path.join(dirpath, f)
    return out


def strip_comments(text):
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def resolve(mods, path):
    """The longest module prefix of `path` that is a module file."""
    for n in range(len(path), -1, -1):
        if tuple(path[:n]) in mods:
            return tuple(path[:n])
    return ()


def edges(mods):
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        text = strip_comments(open(f).read())
        # Test modules may reach anything.
        text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
        for hit in re.finditer(r"\bcrate((?:::\w+)+)", text):
            target = resolve(mods, hit.group(1).split("::")[1:])
            if target != m and target != () and not is_ancestor(target, m):
                graph[m].add(target)
        is_mod_rs = f.endswith("mod.rs") or f.endswith("lib.rs")
        base = m if is_mod_rs else m[:-1]
        for hit in re.finditer(r"\b((?:super::)+)(\w+(?:::\w+)*)", text):
            up = hit.group(1).count("super::")
            start = base[: len(base) - up] if up <= len(base) else ()
            target = resolve(mods, list(start) + hit.group(2).split("::"))
            if target != m and target != () and not is_ancestor(target, m):
                graph[m].add(target)
    return graph


def is_ancestor(a, b):
    return len(a) < len(b) and b[: len(a)] == a


def cycles(graph):
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for t in sorted(graph[n]):
            if state.get(t) == 1:
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def main():
    bad = False
    for root in sys.argv[1:]:
        for c in cycles(edges(modules(root))):
            bad = True
            print(f"{root}: import cycle: " + " -> ".join("::".join(m) or "crate" for m in c))
    if bad:
        sys.exit(1)
    print("module-cycles: no import cycles in " + ", ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
