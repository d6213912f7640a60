"""The export's steps on the terminal, with rich; silent (warnings go to logging) when disabled."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

log = logging.getLogger("onnxserve.export")


class Steps:
    """One progress line per step, each with its spinner and elapsed time."""

    def __init__(self, show: bool) -> None:
        columns = (
            SpinnerColumn(finished_text="[green]✓[/green]"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
        )
        self._progress = Progress(*columns, console=Console(stderr=True)) if show else None

    def __enter__(self) -> Steps:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        if self._progress is None:
            yield
            return
        task = self._progress.add_task(description, total=1)
        try:
            yield
        except BaseException:
            self._progress.update(task, description=f"[red]{description}: failed[/red]")
            raise
        self._progress.update(task, completed=1)

    def warn(self, message: str) -> None:
        if self._progress is None:
            log.warning(message)
        else:
            self._progress.console.print(f"[yellow]warning:[/yellow] {message}")


@contextmanager
def quiet() -> Iterator[None]:
    """Silences what torch's tracer, transformers and optimum print while exporting (tracer
    warnings, deprecation notes): the validation against PyTorch is what tells a good export."""
    import transformers

    noisy = [logging.getLogger(name) for name in ("optimum", "transformers", "torch.onnx")]
    levels = [logger.level for logger in noisy]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for logger in noisy:
                logger.setLevel(logging.ERROR)
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        for logger, level in zip(noisy, levels, strict=True):
            logger.setLevel(level)
