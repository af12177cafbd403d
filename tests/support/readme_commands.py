"""What a Markdown file tells people to type: its fenced blocks and inline code spans.

    blocks = fenced_blocks(text)          # [Block(lang="sh", text="scripts/run ..."), ...]
    shell_commands(block.text)            # one entry per command a user would paste
    inline_spans(text)                    # every `code` span outside fenced blocks

A shell block is split into the commands a user pastes one at a time: a line
continued with ``\\`` is one command (the continuations joined with one space,
which the shell reads the same way), a ``for``/``while``/``if`` compound is one
command up to its ``done``/``fi`` (its lines joined with newlines), comment lines
and trailing ``# comments`` are dropped (the shell ignores them too).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

FENCE_RE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
INLINE_RE = re.compile(r"`([^`\n]+)`")
TRAILING_COMMENT_RE = re.compile(r"\s+#\s.*$")
CONTINUATION_RE = re.compile(r"[ \t]*\\\n[ \t]*")
COMPOUND_OPENERS = {"for": "done", "while": "done", "until": "done", "if": "fi"}


@dataclass(frozen=True)
class Block:
    lang: str  # the info string after the fence ("sh", "toml", ...; "" for none)
    text: str  # the body, dedented as the fence is, ending with a newline


def fenced_blocks(markdown: str) -> list[Block]:
    return [Block(m["lang"], textwrap.dedent(m["body"])) for m in FENCE_RE.finditer(markdown)]


def without_fenced_blocks(markdown: str) -> str:
    return FENCE_RE.sub("", markdown)


def inline_spans(markdown: str) -> list[str]:
    """Every inline code span outside fenced blocks, first occurrence first, no repeats."""
    return list(dict.fromkeys(INLINE_RE.findall(without_fenced_blocks(markdown))))


def shell_commands(script: str) -> list[str]:
    """The commands of a shell block, as described in the module docstring."""
    lines = [TRAILING_COMMENT_RE.sub("", line).rstrip() for line in CONTINUATION_RE.sub(" ", script).splitlines()]
    commands: list[str] = []
    group: list[str] = []
    closers: list[str] = []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        first_word = line.split()[0]
        if first_word in COMPOUND_OPENERS:
            closers.append(COMPOUND_OPENERS[first_word])
        elif closers and first_word == closers[-1]:
            closers.pop()
        group.append(line)
        if not closers:
            commands.append("\n".join(group))
            group = []
    if group:
        raise ValueError(f"unterminated compound command in shell block: {group[0]!r}")
    return commands
