"""Offline wiring check of the Terraform under infra/ (run by infra/check.sh).

`terraform validate` needs the providers, which CI cannot download; this
checks what needs none, from the parsed HCL (python-hcl2, which checkov
brings):
- every `var.X` a directory uses is declared there, every `local.X` defined;
- every module call passes only variables the module declares and every
  variable that has no default;
- every `module.M.O` names a module called in that directory and an output
  that module declares.
Usage: python check-wiring.py INFRA_DIR
"""

import os
import re
import sys

import hcl2

META_ARGS = {"source", "version", "count", "for_each", "depends_on", "providers"}
REF = re.compile(r"\b(var|local|module)\.([A-Za-z0-9_-]+)(?:\.([A-Za-z0-9_-]+))?")


def strings(node):
    """Every string in a parsed HCL tree (expressions come back as strings)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            if not k.startswith("__"):
                yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def load(directory):
    """Variables (name -> has default), outputs, locals, module calls and all strings of a directory."""
    info = {"variables": {}, "outputs": set(), "locals": set(), "modules": {}, "strings": []}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".tf"):
            continue
        path = os.path.join(directory, name)
        with open(path) as f:
            tree = hcl2.load(f)
        for block in tree.get("variable", []):
            for var, body in block.items():
                info["variables"][var] = "default" in body
        for block in tree.get("output", []):
            info["outputs"].update(block.keys())
        for block in tree.get("locals", []):
            info["locals"].update(k for k in block if not k.startswith("__"))
        for block in tree.get("module", []):
            for mod, body in block.items():
                info["modules"][mod] = body
        info["strings"].extend(strings(tree))
    return info


def module_dir(directory, call):
    """The directory of a module call's (local) source."""
    source = call["source"]
    if isinstance(source, list):
        source = source[0]
    return os.path.normpath(os.path.join(directory, source))


def check(directory, problems):
    info = load(directory)
    rel = os.path.relpath(directory)
    for s in info["strings"]:
        for kind, name, attr in REF.findall(s):
            if kind == "var" and name not in info["variables"]:
                problems.append(f"{rel}: var.{name} is not declared")
            elif kind == "local" and name not in info["locals"]:
                problems.append(f"{rel}: local.{name} is not defined")
            elif kind == "module":
                if name not in info["modules"]:
                    problems.append(f"{rel}: module.{name} is not called here")
                    continue
                source = module_dir(directory, info["modules"][name])
                outputs = load(source)["outputs"]
                if attr and attr not in outputs:
                    problems.append(f"{rel}: module.{name}.{attr}: {os.path.relpath(source)} has no output {attr}")
    for mod, body in info["modules"].items():
        source = module_dir(directory, body)
        variables = load(source)["variables"]
        passed = {k for k in body if not k.startswith("__") and k not in META_ARGS}
        for arg in sorted(passed - variables.keys()):
            problems.append(f"{rel}: module {mod} passes {arg}, which {os.path.relpath(source)} does not declare")
        for var in sorted(v for v, has_default in variables.items() if not has_default and v not in passed):
            problems.append(f"{rel}: module {mod} does not pass {var}, which has no default")


def main():
    infra = sys.argv[1] if len(sys.argv) > 1 else "infra"
    dirs = []
    for root, _, files in os.walk(infra):
        if any(f.endswith(".tf") for f in files) and ".terraform" not in root:
            dirs.append(root)
    problems = []
    for d in sorted(dirs):
        check(d, problems)
    for p in sorted(set(problems)):
        print(p, file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"terraform wiring: ok ({len(dirs)} directories)")


if __name__ == "__main__":
    main()
