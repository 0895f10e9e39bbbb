"""A small Dockerfile reader for the deploy tests: stages, instructions and the comments above them."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field


@dataclass
class Instruction:
    keyword: str
    args: str
    comments: list[str]  # the comment lines right above it (for hadolint pragmas' justifications)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name}: expected one {keyword}, found {len(found)}"
        return found[0]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for pair in shlex.split(instruction.args):
                name, _, value = pair.partition("=")
                values[name] = value
        return values

    def text(self) -> str:
        return "\n".join(f"{i.keyword} {i.args}" for i in self.instructions)


@dataclass
class Dockerfile:
    args: dict[str, str]  # global ARG defaults (before the first FROM)
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m[1] or m[2], m[0]), text)


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions per stage: continuation lines joined, comments kept with the next instruction."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    comments: list[str] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            if not logical:
                comments.append(line)
            continue
        if not line and not logical:
            comments = []
            continue
        logical += " " + line[:-1] if line.endswith("\\") else " " + line
        if line.endswith("\\"):
            continue
        keyword, _, rest = logical.strip().partition(" ")
        instruction = Instruction(keyword.upper(), " ".join(rest.split()), comments)
        logical, comments = "", []
        if instruction.keyword == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", instruction.args, re.I)
            assert match, f"FROM {instruction.args}"
            stages.append(Stage(name=match[2] or str(len(stages)), base=match[1]))
        elif instruction.keyword == "ARG" and not stages:
            name, _, default = instruction.args.partition("=")
            args[name] = default
        elif stages:
            stages[-1].instructions.append(instruction)
    return Dockerfile(args, stages)


def healthcheck_command(stage: Stage) -> list[str]:
    _, _, command = stage.one("HEALTHCHECK").args.partition(" CMD ")
    return list(json.loads(command))


def healthcheck_options(stage: Stage) -> dict[str, str]:
    options, _, _ = stage.one("HEALTHCHECK").args.partition(" CMD ")
    return dict(option.removeprefix("--").split("=", 1) for option in options.split())


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", text)
    assert match, f"unsupported duration {text!r}"
    return float(match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match[2]]


def copy_sources(instruction: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY."""
    words = shlex.split(instruction.args)
    flags = dict(w.removeprefix("--").split("=", 1) for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]
