"""What a module of project_lib imports from project_lib, transitively, read from the source files (tests of training identities)."""
import ast
from pathlib import Path


def project_imports(module: str) -> set[str]:
    "The project_lib modules `module` imports, transitively (from the source files)."
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen: continue
        seen.add(name)
        path = Path("project_lib", *name.split(".")).with_suffix(".py")
        package = name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom): continue
            if node.level: base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif (node.module or "").split(".")[0] == "project_lib": base = node.module.split(".")[1:]   # from project_lib.x import y
            else: continue
            targets = [".".join(base)] + [".".join(base + [a.name]) for a in node.names]   # a module, or modules of a package
            todo += [t for t in targets if t and Path("project_lib", *t.split(".")).with_suffix(".py").is_file()]
    return seen
