"""Render the configuration table of the README from the settings classes' field descriptions."""

from __future__ import annotations

from kflow.config import EngineConfig, KafkaConfig, WorkerConfig


def config_table() -> str:
    rows = ["| variable | process | default | meaning |", "|---|---|---|---|"]
    seen: set[str] = set()
    for cls, who in ((KafkaConfig, "all"), (EngineConfig, "engine"), (WorkerConfig, "worker")):
        for name, f in cls.model_fields.items():
            if name in seen:
                continue
            seen.add(name)
            default = "" if f.default is None else repr(f.default) if not isinstance(f.default, str) else f"`{f.default}`" if f.default else '""'
            rows.append(f"| `KFLOW_{name.upper()}` | {who} | {default} | {f.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(config_table())
