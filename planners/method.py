"""How a planner chooses, as a typed value parsed once: `Method.parse("static:ring+full")`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["METHODS", "Method", "option_group", "parse_option_label"]

METHODS = ("exact", "paradyse", "static:<strategy>[+<recompute>]")
"""exact: the optimum (default); paradyse: the published heuristic; static:NAME: one option on
every layer (static:ring picks ring's fastest recompute mode that fits; static:ring+full
fixes it; static:usp2x2 fixes usp's split; static:g1:local runs every micro-batch on sub-groups of
one rank)."""

_LABEL = re.compile(
    r"^(?:g(\d+):)?([a-z_]+?)(\d+x\d+)?(?:\+(none|selective|full|projections))?$"
)  # projections: METP's own backward, priced for comparison with the paper only


def _match(label: str) -> re.Match:
    match = _LABEL.match(label)
    if not match:
        raise ValueError(
            f"bad option name {label!r}: write [gN:]STRATEGY[+RECOMPUTE], e.g. ring+full, usp2x4 "
            "or g1:local (on sub-groups of one rank)"
        )
    return match


def parse_option_label(label: str) -> tuple[str, str | None, str]:
    """'usp2x4+full' -> ('usp', '2x4', 'full'); 'tp_sp' -> ('tp_sp', None, 'none'); the
    sub-group size of 'g2:tp_sp' is `option_group`'s."""
    match = _match(label)
    return match.group(2), match.group(3), match.group(4) or "none"


def option_group(label: str) -> int | None:
    """'g2:tp_sp' -> 2 (sub-groups of two ranks); None for an option on the whole group."""
    found = _match(label).group(1)
    return None if found is None else int(found)


@dataclass(frozen=True)
class Method:
    """A planning method: `exact`, `paradyse`, or `static` with the option label it fixes."""

    kind: str
    """exact, paradyse or static."""
    label: str = ""
    """static: STRATEGY[SPLIT][+RECOMPUTE], e.g. ring, ring+full, usp2x2+none."""

    def __post_init__(self) -> None:
        if self.kind not in ("exact", "paradyse", "static"):
            raise ValueError(
                f"unknown planner method {self.kind!r}; choose from {', '.join(METHODS)}"
            )
        if (self.kind == "static") != bool(self.label):
            raise ValueError("a static method names one option label, the others none")
        if self.label:
            parse_option_label(self.label)

    @classmethod
    def parse(cls, method: str | Method) -> Method:
        """'exact', 'paradyse' or 'static:LABEL' (a Method passes through); ValueError, one line,
        for anything else."""
        if isinstance(method, Method):
            return method
        if method in ("exact", "paradyse"):
            return cls(method)
        if isinstance(method, str) and method.startswith("static:") and method != "static:":
            return cls("static", method.removeprefix("static:"))
        raise ValueError(f"unknown planner method {method!r}; choose from {', '.join(METHODS)}")

    @classmethod
    def for_run(cls, strategy: str, planner: str = "exact", recompute: str | None = None) -> Method:
        """A run's flags: --strategy adaptive -> the --planner method; a strategy name ->
        static:NAME[+RECOMPUTE]."""
        if strategy == "adaptive":
            return cls.parse(planner)
        return cls("static", strategy + (f"+{recompute}" if recompute else ""))

    @property
    def static(self) -> bool:
        return self.kind == "static"

    @property
    def strategy(self) -> str | None:
        """The strategy a static method fixes."""
        return parse_option_label(self.label)[0] if self.static else None

    @property
    def recompute(self) -> str | None:
        """The recompute mode a static method fixes, or None when the planner picks it."""
        return parse_option_label(self.label)[2] if "+" in self.label else None

    def columns(self, labels: Sequence[str]) -> list[int]:
        """The option columns a static method may use: its strategy (and split, and recompute
        mode when given); ValueError, one line, when there is none."""
        strategy, factors, recompute = parse_option_label(self.label)
        group = option_group(self.label)
        columns = []
        for j, label in enumerate(labels):
            s, f, r = parse_option_label(label)
            if (
                s == strategy
                and factors in (None, f)
                and (self.recompute is None or r == recompute)
                and option_group(label) == group
            ):
                columns.append(j)
        if not columns:
            raise ValueError(f"{self}: no such option; the options are {', '.join(labels)}")
        return columns

    def __str__(self) -> str:
        return f"static:{self.label}" if self.static else self.kind
