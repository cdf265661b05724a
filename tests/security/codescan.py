"""A static scan of framekv's own code for ways untrusted bytes could become running code.

    findings = scan_tree(REPO, SCANNED_DIRS)          # every .py file under those folders
    findings = scan_source(text, "snippet.py")        # one file's text
    print("\\n".join(map(str, findings)))             # path:line: rule: what was found

It walks the syntax tree (`ast`), so comments, docstrings and strings do not count, and
it follows names through imports (`import pickle as p`, `from torch import load as ld`),
simple assignments (`ld = torch.load`), `getattr(mod, "name")`, `__import__("mod")` and
`importlib.import_module("mod")`, so an alias does not hide a call. Rules:

    unpickle           pickle / cPickle / _pickle / dill / marshal / joblib / cloudpickle
                       load(s) and Unpickler, shelve.open, pandas.read_pickle, and
                       from-imports of those names (stored data is never unpickled)
    torch-load         torch.load without a literal weights_only=True
    trust-remote-code  a literal true trust_remote_code (keyword, dict entry, parameter
                       default, assignment): it may only come from the user's flag
    implicit-remote    a transformers from_pretrained / pipeline call that does not pass
                       trust_remote_code: its default prompts or depends on the version
    shell              shell= anything but a literal False; os.system, os.popen,
                       subprocess.getoutput / getstatusoutput, create_subprocess_shell
    eval-exec          eval / exec of anything but a string literal
    yaml-load          yaml.load(_all) without SafeLoader / CSafeLoader / BaseLoader;
                       yaml.unsafe_load(_all), yaml.full_load(_all)
    np-allow-pickle    numpy.load with allow_pickle other than a literal False
    debug-logging      boto3.set_stream_logger, set_debug_logger, logging.basicConfig at
                       DEBUG, getLogger("botocore" / "boto3" / "s3transfer" / "urllib3")
                       .setLevel(DEBUG): botocore's debug log prints signed requests
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SCANNED_DIRS = ("pipeline", "model", "jobs", "bench")
PICKLE_MODULES = ("pickle", "cPickle", "_pickle", "dill", "marshal", "joblib", "cloudpickle", "ray.cloudpickle")
PICKLE_LOADERS = {f"{m}.{f}" for m in PICKLE_MODULES for f in ("load", "loads", "Unpickler")} | {
    "shelve.open", "pandas.read_pickle"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
SHELLS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
          "asyncio.create_subprocess_shell"}
EVALS = {"eval", "exec", "builtins.eval", "builtins.exec"}
YAML_LOADS = {"yaml.load", "yaml.load_all"}
YAML_UNSAFE = {"yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"}
YAML_SAFE_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}
NUMPY_LOADS = {"numpy.load"}
IMPORTERS = {"__import__", "importlib.import_module"}
AWS_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    rule: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.what}"


_COMPUTED = object()  # what `_const` returns for anything but a literal


def _const(node: ast.AST | None):
    """The value of a literal node, else _COMPUTED."""
    return node.value if isinstance(node, ast.Constant) else _COMPUTED


class _Aliases:
    """Local name -> dotted name it stands for, from imports and simple assignments."""

    def __init__(self, tree: ast.AST):
        self.names: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        self.names[a.asname] = a.name
                    else:
                        self.names.setdefault(a.name.split(".")[0], a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    self.names[a.asname or a.name] = f"{node.module}.{a.name}"
        assigns = [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None]
        for _ in range(3):  # a chain of re-assignments (a = pickle.loads; b = a) settles in a few rounds
            for node in assigns:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                value = self.qualify(node.value)
                if value:
                    for t in targets:
                        if isinstance(t, ast.Name) and self.names.get(t.id) != value:
                            self.names[t.id] = value

    def qualify(self, node: ast.AST) -> str | None:
        """Dotted name an expression refers to (`p.loads` -> 'pickle.loads'), else None."""
        if isinstance(node, ast.Name):
            return self.names.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.qualify(node.value)
            return f"{base}.{node.attr}" if base else None
        if isinstance(node, ast.Call):
            func = self.qualify(node.func)
            arg = _const(node.args[0]) if node.args else _COMPUTED
            if func in IMPORTERS and isinstance(arg, str):
                return arg
            if func == "getattr" and len(node.args) >= 2 and isinstance(_const(node.args[1]), str):
                base = self.qualify(node.args[0])
                return f"{base}.{node.args[1].value}" if base else None
        return None


def _keyword(call: ast.Call, name: str) -> ast.keyword | None:
    return next((k for k in call.keywords if k.arg == name), None)


def _truthy_literal(node: ast.AST | None) -> bool:
    value = _const(node)
    return value is not _COMPUTED and bool(value)


class _Scanner(ast.NodeVisitor):
    def __init__(self, tree: ast.AST, path: str):
        self.aliases = _Aliases(tree)
        self.path = path
        self.findings: list[Finding] = []

    def add(self, node: ast.AST, rule: str, what: str) -> None:
        self.findings.append(Finding(self.path, node.lineno, rule, what))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            if node.module and f"{node.module}.{a.name}" in PICKLE_LOADERS:
                self.add(node, "unpickle", f"from {node.module} import {a.name}")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = self.aliases.qualify(node.func) or ""
        if name in PICKLE_LOADERS:
            self.add(node, "unpickle", f"{name}(...)")
        if name in TORCH_LOADS and _const(getattr(_keyword(node, "weights_only"), "value", None)) is not True:
            self.add(node, "torch-load", f"{name}(...) without weights_only=True")
        if name.startswith("transformers.") and (name.endswith(".from_pretrained") or name == "transformers.pipeline"):
            if _keyword(node, "trust_remote_code") is None:
                self.add(node, "implicit-remote", f"{name}(...) without an explicit trust_remote_code")
        shell = _keyword(node, "shell")
        if shell is not None and _const(shell.value) is not False:
            self.add(node, "shell", f"{name or 'call'}(..., shell={ast.unparse(shell.value)})")
        if name in SHELLS:
            self.add(node, "shell", f"{name}(...) runs a shell")
        if name in EVALS and not (node.args and isinstance(_const(node.args[0]), str)):
            self.add(node, "eval-exec", f"{name}(...) of a computed value")
        if name in YAML_UNSAFE:
            self.add(node, "yaml-load", f"{name}(...)")
        if name in YAML_LOADS:
            loader = _keyword(node, "Loader")
            loader_node = loader.value if loader else (node.args[1] if len(node.args) > 1 else None)
            if loader_node is None or self.aliases.qualify(loader_node) not in YAML_SAFE_LOADERS:
                self.add(node, "yaml-load", f"{name}(...) without SafeLoader")
        allow = _keyword(node, "allow_pickle")
        if name in NUMPY_LOADS and allow is not None and _const(allow.value) is not False:
            self.add(node, "np-allow-pickle", f"{name}(..., allow_pickle={ast.unparse(allow.value)})")
        self._debug_logging(node, name)
        for k in node.keywords:
            if k.arg == "trust_remote_code" and _truthy_literal(k.value):
                self.add(node, "trust-remote-code", f"trust_remote_code={ast.unparse(k.value)} in {name or 'a call'}")
        self.generic_visit(node)

    def _is_debug(self, node: ast.AST | None) -> bool:
        value = _const(node)
        return self.aliases.qualify(node) == "logging.DEBUG" if value is _COMPUTED else value in (10, "DEBUG")

    def _debug_logging(self, node: ast.Call, name: str) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("set_debug_logger", "set_stream_logger"):
            self.add(node, "debug-logging", f"{name or ast.unparse(func)}(...)")
        if name == "logging.basicConfig" and self._is_debug(getattr(_keyword(node, "level"), "value", None)):
            self.add(node, "debug-logging", "logging.basicConfig(level=DEBUG)")
        if isinstance(func, ast.Attribute) and func.attr == "setLevel" and node.args and self._is_debug(node.args[0]):
            target = func.value
            if isinstance(target, ast.Call) and self.aliases.qualify(target.func) == "logging.getLogger":
                logger = _const(target.args[0]) if target.args else ""
                if isinstance(logger, str) and logger.split(".")[0] in AWS_LOGGERS:
                    self.add(node, "debug-logging", f"logging.getLogger({logger!r}).setLevel(DEBUG)")

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values):
            if _const(key) == "trust_remote_code" and _truthy_literal(value):
                self.add(node, "trust-remote-code", f"{{'trust_remote_code': {ast.unparse(value)}}}")
        self.generic_visit(node)

    def _defaults(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        a = node.args
        positional = a.posonlyargs + a.args
        pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults))
        pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
        for arg, default in pairs:
            if arg.arg == "trust_remote_code" and _truthy_literal(default):
                self.add(default, "trust-remote-code", f"parameter default trust_remote_code={ast.unparse(default)}")
        self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _defaults

    def _assign(self, node: ast.Assign | ast.AnnAssign) -> None:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for t in targets:
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else None
            if name == "trust_remote_code" and node.value is not None and _truthy_literal(node.value):
                self.add(node, "trust-remote-code", f"{ast.unparse(t)} = {ast.unparse(node.value)}")
        self.generic_visit(node)

    visit_Assign = visit_AnnAssign = _assign


def scan_source(text: str, path: str = "<string>") -> list[Finding]:
    """Findings in one file's source text; a file that does not parse is a finding too."""
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        return [Finding(path, e.lineno or 0, "unparsable", f"cannot be scanned: {e.msg}")]
    scanner = _Scanner(tree, path)
    scanner.visit(tree)
    return sorted(scanner.findings, key=lambda f: (f.line, f.rule))


def python_files(root: Path, dirs: tuple[str, ...] = SCANNED_DIRS) -> list[Path]:
    """Every .py file under root/<dir> for each dir, sorted."""
    return sorted(p for d in dirs for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts)


def scan_tree(root: Path, dirs: tuple[str, ...] = SCANNED_DIRS) -> list[Finding]:
    """Findings in every .py file under the given folders of root, paths relative to root."""
    return [f for p in python_files(root, dirs) for f in scan_source(p.read_text(), p.relative_to(root).as_posix())]
