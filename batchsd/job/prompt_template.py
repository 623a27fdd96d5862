"""Prompt templates: alternatives `{a|b|c}` and wildcard files `__name__`, drawn per row from its id.

The syntax (A1111 Dynamic Prompts' convention, the part of it batchsd reads):
- `{a|b|c}`: one of the alternatives, each equally likely. Alternatives may be empty (`{red |}`)
  and may hold templates themselves (`{a {big|small} cat|a dog}`).
- `__name__`: one line of the wildcard file `name.txt` in the `--wildcards` folder (`__colors/warm__`
  reads `colors/warm.txt`). Blank lines and lines starting with `#` are not options; an option may
  hold templates itself. A name is letters, digits, `_`, `-`, `.` and `/`, not leaving the folder.
- A brace pair without a `|` at its own level is text, kept as written (`{red}` stays `{red}`), so
  prompts that use braces for other things are unchanged. A1111's attention syntax `(word:1.2)`,
  `[word]` and alternation `[cat|dog]` use no braces and are left alone, as is a `|` outside braces.
  Inside a group too, a `|` within square brackets is A1111's alternation, not a separator
  (`{[cat|dog]|owl}` has two alternatives, as in Dynamic Prompts); `\\[` and `\\]` (A1111's literal
  brackets) open and close nothing.
- `\\{`, `\\}`, `\\|` and `\\_` are the literal characters (`\\_\\_init__` is the text `__init__`);
  any other backslash stays as written (`\\(` keeps A1111's meaning).
- A `{` that is never closed or a `}` that closes nothing is a problem (write `\\{`); so are Dynamic
  Prompts' features batchsd does not read: `{2$$a|b|c}` (several at once), `{0.5::a|b}` (weights)
  and globs `__colors*__`.

The draws: the j-th choice made while reading a row's template from left to right (only the chosen
branches are read) takes sha256("batchsd-prompt-v1\\0" + id + "\\0" + j), its first 8 bytes as a
big-endian integer, modulo the number of options. So a row's prompt depends on its id and template
(and the wildcard files) only: never on its position, its shard, the run or Python's hash seed.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

SYNTAX_PATTERN = r"[{}]|__|\\[|_]"    # what a template may hold (also an RE2 pattern for Arrow)
_SYNTAX_RE = re.compile(SYNTAX_PATTERN)
_WILDCARD_RE = re.compile(r"__([A-Za-z0-9][\w\-./*]*?)__")
_ESCAPES = "{}|_"
_COMBINATIONS_RE = re.compile(r"\s*\d*\s*-?\s*\d*\s*\$\$")
_WEIGHT_RE = re.compile(r"\s*[0-9.]+\s*::")
MAX_WILDCARD_DEPTH = 20


class TemplateError(ValueError):
    """A template that cannot be read: the reason and the fix."""


@dataclass(frozen=True, slots=True)
class _Choice:
    options: tuple[tuple, ...]     # each option: a sequence of nodes (str | _Choice)


def has_syntax(text: str) -> bool:
    """Whether `text` holds anything a template reads (else it is its own prompt)."""
    return _SYNTAX_RE.search(text) is not None


class PromptTemplates:
    """Templates parsed once per distinct text; wildcard files read once per name."""

    def __init__(self, wildcards: Path | None = None):
        self.wildcards = None if wildcards is None else Path(wildcards)
        self._templates: dict[str, tuple | TemplateError] = {}
        self._files: dict[str, _Choice] = {}

    def compile(self, text: str) -> tuple:
        """The parsed template (nodes); TemplateError for a bad one."""
        nodes = self._templates.get(text)
        if nodes is None:
            try:
                nodes = self._parse(text, ())
            except TemplateError as e:
                nodes = e
            self._templates[text] = nodes
        if isinstance(nodes, TemplateError):
            raise nodes
        return nodes

    def render(self, nodes: tuple, row_id: str) -> str:
        """The prompt the row `row_id` draws from a compiled template."""
        key = b"batchsd-prompt-v1\0" + row_id.encode() + b"\0"
        out: list[str] = []
        count = 0
        stack = [iter(nodes)]
        while stack:
            node = next(stack[-1], None)
            if node is None:
                stack.pop()
            elif isinstance(node, str):
                out.append(node)
            else:
                digest = hashlib.sha256(key + str(count).encode()).digest()
                count += 1
                stack.append(iter(node.options[int.from_bytes(digest[:8], "big") % len(node.options)]))
        return "".join(out)

    # ------------------------------------------------------------------------- parsing

    def _parse(self, text: str, chain: tuple[str, ...]) -> tuple:
        nodes, end, _ = self._sequence(text, 0, chain, inside=False)
        assert end == len(text)
        return nodes

    def _sequence(self, text: str, i: int, chain: tuple[str, ...], inside: bool) -> tuple[tuple, int, bool]:
        """Nodes from text[i:] up to a top-level '|' or '}' (inside a group) or the end: (nodes, where it
        stopped, whether it stopped at '|')."""
        nodes: list = []
        buf: list[str] = []
        brackets = 0                    # open A1111 '[' at this level: a '|' inside them is text
        n = len(text)
        while i < n:
            c = text[i]
            if c == "\\" and i + 1 < n and text[i + 1] in _ESCAPES:
                buf.append(text[i + 1])
                i += 2
            elif c == "\\" and i + 1 < n and text[i + 1] in "[]":
                buf.append(text[i:i + 2])     # A1111's literal bracket, kept with its backslash
                i += 2
            elif c in "[]":
                brackets = brackets + 1 if c == "[" else max(brackets - 1, 0)
                buf.append(c)
                i += 1
            elif c == "|" and inside and brackets:
                buf.append(c)
                i += 1
            elif c == "{":
                group, i = self._group(text, i, chain)
                if buf:
                    nodes.append("".join(buf))
                    buf = []
                nodes.extend(group)
            elif c == "}" or (c == "|" and inside):
                if not inside:
                    raise TemplateError(f"'}}' at character {i + 1} closes no '{{'; write '\\}}' for a literal brace")
                break
            elif c == "_" and text.startswith("__", i) and (m := _WILDCARD_RE.match(text, i)):
                if buf:
                    nodes.append("".join(buf))
                    buf = []
                nodes.append(self._wildcard(m.group(1), chain))
                i = m.end()
            else:
                buf.append(c)
                i += 1
        if buf:
            nodes.append("".join(buf))
        return _merged(nodes), i, i < n and text[i] == "|"

    def _group(self, text: str, start: int, chain: tuple[str, ...]) -> tuple[list, int]:
        """The group opening at text[start] == '{' as nodes: one _Choice, or (no top-level '|') its
        contents between the braces, kept as text; and the index after its '}'."""
        options = []
        i = start + 1
        while True:
            nodes, i, more = self._sequence(text, i, chain, inside=True)
            options.append(nodes)
            if i >= len(text):
                raise TemplateError(f"'{{' at character {start + 1} is never closed; close it with '}}' or write "
                                    "'\\{' for a literal brace")
            i += 1                      # past '|' or '}'
            if not more:
                break
        if len(options) == 1:           # braces without alternatives: text, kept as written
            return ["{", *options[0], "}"], i
        if _COMBINATIONS_RE.match(text, start + 1):
            raise TemplateError(f"'{{N$$...}}' at character {start + 1} (several alternatives at once) is Dynamic "
                                "Prompts syntax batchsd does not read; write one {a|b|c} per choice")
        if any(_weighted(option) for option in options):
            raise TemplateError(f"weighted alternatives ('0.5::a') at character {start + 1} are Dynamic Prompts "
                                "syntax batchsd does not read; alternatives are equally likely: repeat one to "
                                "weight it ({a|a|b})")
        return [_Choice(tuple(options))], i

    def _wildcard(self, name: str, chain: tuple[str, ...]) -> _Choice:
        if "*" in name:
            raise TemplateError(f"__{name}__: wildcard globs are Dynamic Prompts syntax batchsd does not read; "
                                "name one file (__colors__ reads colors.txt)")
        if self.wildcards is None:
            raise TemplateError(f"uses the wildcard __{name}__ but no --wildcards DIR was given; pass the folder "
                                f"holding {name}.txt (one option a line), or write \\_\\_{name}__ for the text")
        if name in chain:
            raise TemplateError(f"wildcard __{name}__ uses itself ({' -> '.join([*chain, name])}); remove the loop")
        if len(chain) >= MAX_WILDCARD_DEPTH:
            raise TemplateError(f"wildcards nest more than {MAX_WILDCARD_DEPTH} deep ({' -> '.join(chain)}); "
                                "flatten them")
        cached = self._files.get(name)
        if cached is not None:
            return cached
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise TemplateError(f"wildcard __{name}__ is not a plain name inside the --wildcards folder; use names "
                                "like __colors__ or __colors/warm__")
        path = self.wildcards.joinpath(*parts[:-1], parts[-1] + ".txt")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except FileNotFoundError:
            raise TemplateError(f"wildcard __{name}__: there is no file {path}; create it (one option a line) or "
                                "fix the name") from None
        except (OSError, UnicodeDecodeError) as e:
            raise TemplateError(f"wildcard __{name}__: cannot read {path} as UTF-8 text ({e}); fix the file") from None
        options = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not options:
            raise TemplateError(f"wildcard __{name}__: {path} has no options; write one option a line")
        inner = chain + (name,)
        try:
            choice = _Choice(tuple(self._parse(option, inner) for option in options))
        except TemplateError as e:
            if str(e).startswith("wildcard"):
                raise
            raise TemplateError(f"wildcard __{name}__ ({path}): {e}") from None
        self._files[name] = choice
        return choice


def _weighted(option: tuple) -> bool:
    return bool(option) and isinstance(option[0], str) and _WEIGHT_RE.match(option[0]) is not None


def _merged(nodes: list) -> tuple:
    """Adjacent strings joined (fewer nodes to walk per row)."""
    out: list = []
    for node in nodes:
        if isinstance(node, str) and out and isinstance(out[-1], str):
            out[-1] += node
        elif not (isinstance(node, str) and not node):
            out.append(node)
    return tuple(out)
