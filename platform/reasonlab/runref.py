"""`RunRef`: the model of a finished run, named in a job (`method.teacher: RUN`). Imports nothing of the
package, so methods (core) and the config both use it; the driver resolves references against MLflow
before Ray starts (tracking.resolve_ref) and the workers load them (runs.load_run_dir)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from reasonlab.errors import ConfigError

_FORM = re.compile(r"(?P<run>[A-Za-z0-9][A-Za-z0-9._-]*)(@(?P<step>\d+))?")


@dataclass(frozen=True)
class RunRef:
    """`RUN` or `RUN@STEP`: a run id or run name (in a staged job, or the name of one of its stages), and
    optionally the step of a snapshot instead of the final model."""
    run: str
    step: int | None = None

    @classmethod
    def parse(cls, text: str, key: str) -> "RunRef":
        match = _FORM.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ConfigError(f"{key}: expected a run id or name, optionally @STEP (e.g. teacher-run@2000), "
                              f"got {text!r}")
        step = match.group("step")
        return cls(match.group("run"), int(step) if step is not None else None)

    def __str__(self) -> str:
        return self.run if self.step is None else f"{self.run}@{self.step}"
