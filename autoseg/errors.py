"""User-facing errors: each says which file, which field, what was found and how to fix it."""

from __future__ import annotations


class AutosegError(Exception):
    """An error caused by the user's input or environment, printed without a traceback by the CLI."""


class DatasetError(AutosegError):
    """One or more problems found in a raw dataset; all problems are collected, then raised together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(self.problems)  # args stay (problems,) so the error survives a trip between processes

    def __str__(self) -> str:
        head = f"{len(self.problems)} problem(s) found in the dataset:"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])
