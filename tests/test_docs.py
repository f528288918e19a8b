"""The docs stay true to the code: every command shown in README.md and docs/*.md parses against
the real CLI, every script and make target it names exists, and every relative link resolves.

Commands are taken from ``` fenced blocks only: a line starting with `rmt-deploy` (after any
`VAR=value` prefix), `torchrun ... -m rmt_deploy.cli`, `python|torchrun <script>.py`, `make`,
`serve run` (Ray's CLI on our application) or `pip install 'rmt-deploy[extra]'`. Lines are joined
over trailing `\\` and `# comments` are stripped (shlex). A block tagged ```text is program
output (the demo's summary starts with "rmt-deploy demo:") and holds no commands. Nothing is
run: a command is parsed with click's `make_context`, which checks names, types, choices and
required options.
"""
from __future__ import annotations

import ast
import importlib
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from rmt_deploy.cli import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOC_FILES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250

_FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`+[^`]*`+")
_PYTHON_LANGS = {"python", "py", "pycon"}
_OUTPUT_LANGS = {"text", "output"}  # program output, not commands


@dataclass(frozen=True)
class Snippet:
    """One logical line (or a whole python block) from a fenced block of a doc file."""

    path: Path
    line: int      # 1-based line where it starts
    text: str
    lang: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def _read_blocks(path: Path) -> tuple[list[Snippet], list[Snippet], list[tuple[int, str]]]:
    """(shell logical lines, python blocks, prose lines outside fences) of one markdown file."""
    shell, python, prose = [], [], []
    fence, lang, block, block_start = None, "", [], 0
    pending, pending_start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        match = _FENCE.match(raw)
        if fence is None:
            if match:
                fence, lang, block, block_start = match.group(1), match.group(2).lower(), [], number + 1
            else:
                prose.append((number, raw))
            continue
        if raw.strip().startswith(fence):  # closing fence
            if lang in _PYTHON_LANGS:
                python.append(Snippet(path, block_start, "\n".join(block), lang))
            if pending:
                shell.append(Snippet(path, pending_start, pending, lang))
            fence, pending = None, ""
            continue
        block.append(raw)
        if lang in _PYTHON_LANGS or lang in _OUTPUT_LANGS:
            continue
        stripped = raw.strip()
        if not pending:
            pending_start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        if pending:
            shell.append(Snippet(path, pending_start, pending, lang))
        pending = ""
    return shell, python, prose


def _collect():
    shell, python, prose = [], [], {}
    for path in DOC_FILES:
        s, p, text = _read_blocks(path)
        shell += s
        python += p
        prose[path] = text
    return shell, python, prose


SHELL, PYTHON, PROSE = _collect()


def _tokens(snippet: Snippet) -> list[str]:
    try:
        tokens = shlex.split(snippet.text, comments=True)
    except ValueError as exc:  # unbalanced quotes
        pytest.fail(f"{snippet.where}: cannot split `{snippet.text}` as a shell line: {exc}")
    while tokens and _ENV.match(tokens[0]):  # RAY_ADDRESS=... rmt-deploy serve ...
        tokens.pop(0)
    return tokens


def _classify(tokens: list[str]) -> tuple[str, list[str]] | None:
    """('cli', args) | ('script', [path, *args]) | ('make', targets) | ('ray', args) | ('pip', args)."""
    if not tokens:
        return None
    head = tokens[0]
    if head == "rmt-deploy":
        return "cli", tokens[1:]
    if head in ("torchrun", "python", "python3") or head.endswith("/python"):
        if "-m" in tokens:
            at = tokens.index("-m")
            if at + 1 < len(tokens) and tokens[at + 1] == "rmt_deploy.cli":
                return "cli", tokens[at + 2:]
            return None
        scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
        return ("script", tokens[scripts[0]:]) if scripts else None
    if head == "make":
        return "make", [t for t in tokens[1:] if not t.startswith("-") and "=" not in t]
    if head == "serve" and tokens[1:2] == ["run"]:
        return "ray", tokens[2:]
    if head == "pip" and tokens[1:2] == ["install"]:
        return "pip", tokens[2:]
    return None


def _commands(kind: str) -> list[tuple[Snippet, list[str]]]:
    found = []
    for snippet in SHELL:
        tokens = _tokens(snippet)
        classified = _classify(tokens)
        if classified and classified[0] == kind:
            found.append((snippet, classified[1]))
    return found


def _ids(items):
    return [snippet.where for snippet, _ in items]


CLI_COMMANDS = _commands("cli")
SCRIPTS = _commands("script")
MAKE_LINES = _commands("make")
RAY_LINES = _commands("ray")
PIP_LINES = _commands("pip")


def _check_placeholders(snippet: Snippet, args: list[str]) -> None:
    # `...` or `[--option]` would parse as arguments (or hide missing ones): docs write commands in full
    bad = [a for a in args if "..." in a or a.startswith("[-")]
    if bad:
        pytest.fail(f"{snippet.where}: `{snippet.text}` has placeholders {bad}: write the command out in full")


def _missing_example_path(exc: click.BadParameter) -> bool:
    """A click.Path(exists=True) refusing a path only the doc's example would create (e.g. `bundle`).
    No command declares exists=True today (see test_no_command_needs_existing_paths), so this
    is the one BadParameter accepted should one ever do; every other one fails the test."""
    param_type = getattr(exc.param, "type", None)
    return isinstance(param_type, click.Path) and param_type.exists and "does not exist" in exc.format_message()


def _parse_cli(args: list[str]) -> None:
    """Resolve `rmt-deploy ARGS` to its (sub)command and parse its options, without running it."""
    if not args:
        raise click.UsageError("no command given")
    ctx = click.Context(cli, info_name="rmt-deploy")
    name, command, rest = cli.resolve_command(ctx, args)
    while isinstance(command, click.Group):  # `bundle add|remove`
        if not rest:
            raise click.UsageError(f"`{name}` needs a subcommand: {', '.join(command.list_commands(ctx))}")
        ctx = click.Context(command, info_name=name, parent=ctx)
        name, command, rest = command.resolve_command(ctx, rest)
    sub = command.make_context(name, list(rest), parent=ctx, resilient_parsing=False)
    sub.close()


@pytest.mark.parametrize("snippet,args", CLI_COMMANDS, ids=_ids(CLI_COMMANDS))
def test_doc_command_parses(snippet: Snippet, args: list[str]):
    _check_placeholders(snippet, args)
    try:
        _parse_cli(args)
    except click.BadParameter as exc:
        if not _missing_example_path(exc):
            pytest.fail(f"{snippet.where}: `{snippet.text}`: {exc.format_message()}")
    except click.UsageError as exc:
        pytest.fail(f"{snippet.where}: `{snippet.text}`: {exc.format_message()}")


def test_docs_show_every_command():
    shown = {args[0] for _, args in CLI_COMMANDS if args}
    ctx = click.Context(cli)
    missing = sorted(set(cli.list_commands(ctx)) - shown)
    assert not missing, f"no example in README.md or docs/ runs: rmt-deploy {', '.join(missing)}"
    subcommands = {args[1] for _, args in CLI_COMMANDS if len(args) > 1 and args[0] == "bundle"}
    assert {"add", "remove"} <= subcommands


def test_no_command_needs_existing_paths():
    """Doc examples name paths (DATA, bundle, img1.jpg) that do not exist here; parsing them
    relies on no option declaring click.Path(exists=True). If one does, _missing_example_path
    accepts only that error, and this test says where to look."""
    ctx = click.Context(cli)
    strict = []
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        commands = list(command.commands.values()) if isinstance(command, click.Group) else [command]
        for cmd in commands:
            strict += [f"{name} {p.name}" for p in cmd.params if isinstance(p.type, click.Path) and p.type.exists]
    assert strict == [], f"options with click.Path(exists=True): {strict}"


@pytest.mark.parametrize("snippet,args", SCRIPTS, ids=_ids(SCRIPTS))
def test_doc_script_exists(snippet: Snippet, args: list[str]):
    script, *options = args
    path = REPO / script
    assert path.is_file(), f"{snippet.where}: `{snippet.text}`: no script {script}"
    _check_placeholders(snippet, options)
    # the scripts build their argparse parsers inside main(): check each option is declared in the
    # script or a module beside it, rather than importing (and running) the script
    sources = "\n".join(p.read_text() for p in path.parent.glob("*.py"))
    for option in options:
        if option.startswith("--"):
            flag = option.split("=", 1)[0]
            assert f'"{flag}"' in sources, f"{snippet.where}: `{snippet.text}`: {script} declares no {flag}"


def _make_targets() -> set[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        match = re.match(r"^([^\s:=#][^:=]*?)\s*::?(?!=)", line)
        if match and not line.startswith("\t"):
            targets.update(match.group(1).split())
    return targets


@pytest.mark.parametrize("snippet,targets", MAKE_LINES, ids=_ids(MAKE_LINES))
def test_doc_make_target_exists(snippet: Snippet, targets: list[str]):
    assert targets, f"{snippet.where}: `{snippet.text}` names no target"
    missing = [t for t in targets if t not in _make_targets()]
    assert not missing, f"{snippet.where}: `{snippet.text}`: no Makefile target {missing}"


@pytest.mark.parametrize("snippet,args", RAY_LINES, ids=_ids(RAY_LINES))
def test_doc_serve_run_arguments(snippet: Snippet, args: list[str]):
    """`serve run MODULE:APP key=value ...`: the application exists and takes every key."""
    from rmt_deploy.errors import InputError
    from rmt_deploy.serving.ray_config import RayServeConfig

    _check_placeholders(snippet, args)
    positional, i = [], 0
    while i < len(args):
        if args[i].startswith("-"):  # Ray's own options, e.g. --address HEAD:6379
            i += 1 if "=" in args[i] else 2
            continue
        positional.append(args[i])
        i += 1
    target, *pairs = positional
    module, _, attribute = target.partition(":")
    assert hasattr(importlib.import_module(module), attribute), f"{snippet.where}: no {target}"
    values = dict(pair.split("=", 1) for pair in pairs)
    try:
        config = RayServeConfig.from_dict(values)
    except InputError as exc:
        pytest.fail(f"{snippet.where}: `{snippet.text}`: {exc}")
    assert not config.extra, f"{snippet.where}: `{snippet.text}`: unknown keys {sorted(config.extra)}"


def _extras() -> set[str]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    with open(REPO / "pyproject.toml", "rb") as handle:
        return set(tomllib.load(handle)["project"]["optional-dependencies"])


@pytest.mark.parametrize("snippet,args", PIP_LINES, ids=_ids(PIP_LINES))
def test_doc_pip_extras_exist(snippet: Snippet, args: list[str]):
    for arg in args:
        match = re.fullmatch(r"(?:rmt-deploy|\.)\[([\w,-]+)\]", arg)
        if match:
            missing = set(match.group(1).split(",")) - _extras()
            assert not missing, f"{snippet.where}: `{snippet.text}`: no extra {sorted(missing)} in pyproject.toml"


@pytest.mark.parametrize("snippet", PYTHON, ids=[s.where for s in PYTHON])
def test_doc_python_block_compiles(snippet: Snippet):
    try:
        ast.parse(snippet.text)
    except SyntaxError as exc:
        pytest.fail(f"{snippet.where}: python block does not parse: {exc}")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = _CODE_SPAN.sub(lambda m: m.group(0).strip("`"), heading.strip().lstrip("#").strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings (outside fenced blocks)."""
    prose = PROSE[path] if path in PROSE else _read_blocks(path)[2]
    return {_slug(line) for _, line in prose if re.match(r"^#{1,6}\s", line)}


def _links() -> list[tuple[str, Path, str]]:
    links = []
    for path, lines in PROSE.items():
        for number, line in lines:
            for target in _LINK.findall(_CODE_SPAN.sub("", line)):
                if "://" in target or target.startswith("mailto:"):
                    continue
                links.append((f"{path.relative_to(REPO)}:{number}", path, target))
    return links


LINKS = _links()


@pytest.mark.parametrize("where,path,target", LINKS, ids=[f"{w}:{t}" for w, _, t in LINKS])
def test_doc_link_resolves(where: str, path: Path, target: str):
    file_part, _, fragment = target.partition("#")
    resolved = (path.parent / file_part).resolve() if file_part else path
    assert resolved == REPO or REPO in resolved.parents, f"{where}: link {target} leaves the repository"
    assert resolved.exists(), f"{where}: link {target}: no {resolved.relative_to(REPO)}"
    if fragment and resolved.suffix == ".md":
        assert fragment in _anchors(resolved), f"{where}: link {target}: no heading #{fragment} in {resolved.name}"


def test_readme_stays_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_docs_hold_commands():
    """The extraction itself works: a change to the fence parsing must not silently find nothing."""
    assert len(CLI_COMMANDS) >= 20 and SCRIPTS and MAKE_LINES and RAY_LINES and PYTHON and LINKS
