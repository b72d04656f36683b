"""The configuration and metrics references in ``docs/``, generated from the code.

``python -m fusionrec.apps.docs`` (from the repository root) rewrites ``docs/configuration.md``
(every :class:`Settings` field: variable, default, meaning, by component) and ``docs/metrics.md``
(every metric a component registers: name, type, labels, meaning). ``tests/unit/test_docs.py``
fails when a committed file differs from what this module generates, so the references cannot
drift from the code.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any

from fusionrec.core.metrics import MetricSet, MetricSpec
from fusionrec.core.settings import DAY_S, GROUPS, PREFIX

# Every module that declares a MetricSet; importing them registers their sets as subclasses.
METRIC_MODULES = (
    "fusionrec.streams.metrics", "fusionrec.streams.positions", "fusionrec.streams.user_state",
    "fusionrec.core.redis_memory",
    "fusionrec.streams.trending",
    "fusionrec.models.embedder", "fusionrec.online.learning.learner", "fusionrec.online.learning.checkpoints",
    "fusionrec.online.ranking.writer", "fusionrec.online.ranking.scheduler",
    "fusionrec.online.ranking.process", "fusionrec.online.serving.api",
)


def metric_sets() -> list[type[MetricSet]]:
    """Every component's metric set, in the order the stages run."""
    for name in METRIC_MODULES:
        importlib.import_module(name)
    found: list[type[MetricSet]] = []
    todo = list(MetricSet.__subclasses__())
    while todo:
        kind = todo.pop(0)
        found.append(kind)
        todo.extend(kind.__subclasses__())
    order = {name: i for i, name in enumerate(METRIC_MODULES)}
    return sorted((k for k in found if k.__module__ in order), key=lambda k: order[k.__module__])


def _default(field: dataclasses.Field[Any]) -> str:
    if field.default_factory is not dataclasses.MISSING:
        return "`{}`" if field.metadata["env"] == "KAFKA_OPTIONS" else "see meaning"
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float) and value >= DAY_S and value % DAY_S == 0 and field.name.endswith("_s"):
        return f"`{int(value)}` ({int(value) // DAY_S} d)"
    return f"`{value}`"


def configuration() -> str:
    lines = ["# Configuration reference", "",
             "Generated from `fusionrec/core/settings.py` by `python -m fusionrec.apps.docs`; do not edit.", "",
             "Every process reads its settings once, from `FUSIONREC_*` environment variables. In code they are",
             "grouped by component: `settings.<group>.<field>`. Overrides in code (`Settings.from_env(**overrides)`,",
             "`settings.replace(**changes)`) use the variable's name without the prefix, in lower case.", ""]
    for group, cls in GROUPS.items():
        lines += [f"## {cls.title} (`settings.{group}`)", "", (cls.__doc__ or "").strip(), "",
                  "| variable | field | default | meaning |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            doc = field.metadata["doc"].replace("|", "\\|")
            lines.append(f"| `{PREFIX}{field.metadata['env']}` | `{field.name}` | {_default(field)} | {doc} |")
        lines.append("")
    return "\n".join(lines)


def _labels(spec: MetricSpec) -> str:
    return ", ".join(f"`{label}`" for label in spec.labels) or "—"


def metrics() -> str:
    lines = ["# Metrics reference", "",
             "Generated from the components' metric sets by `python -m fusionrec.apps.docs`; do not edit.", "",
             "Each component declares its metrics in one `MetricSet` beside its code and registers it on its",
             "process's registry. Labels are low-cardinality; never user or item ids.", "",
             "The ranking processes' metrics (the recommendation writer's, the served model's) are relayed",
             "through the consumer's registry; with `FUSIONREC_REC_PROCESSES` above 1 each of their samples",
             "also carries `ranker`, the child's index.", ""]
    for kind in metric_sets():
        lines += [f"## {kind.component}", "", f"`{kind.__module__}.{kind.__qualname__}`", "",
                  "| metric | type | labels | meaning |", "|---|---|---|---|"]
        for spec in kind.specs().values():
            lines.append(f"| `{spec.exported_name}` | {spec.kind} | {_labels(spec)} | {spec.doc} |")
        lines.append("")
    return "\n".join(lines)


def generated() -> dict[str, str]:
    """File name in ``docs/`` -> its generated text."""
    return {"configuration.md": configuration(), "metrics.md": metrics()}


def main(argv: list[str] | None = None) -> None:
    """Write the references into the folder given (default: ``docs`` under the working directory)."""
    out = Path((argv if argv is not None else sys.argv[1:] or ["docs"])[0])
    out.mkdir(exist_ok=True)
    for name, text in generated().items():
        (out / name).write_text(text)
        sys.stdout.write(f"wrote {out / name}\n")


if __name__ == "__main__":
    main()
