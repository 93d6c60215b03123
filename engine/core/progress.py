"""Console output: rich progress bars and logging, on stderr so stdout stays for results; plain progress lines
off a terminal and the trackers (`Monitor`)."""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from engine.core.widths import format_sparsity

console = Console(stderr=True)
log = logging.getLogger("engine.core.progress")


def setup_logging(level: str = "INFO") -> None:
    """Rich, wrapped to the window, in a terminal; elsewhere (a batch log) one plain line per record, which grep
    and tail read whole."""
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False, log_time_format="[%X]")
        logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    else:
        logging.basicConfig(level=level, format="[%(asctime)s] %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                            stream=sys.stderr, force=True)


def _columns(info: bool = False):
    return [TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), *([TextColumn("{task.fields[info]}")] if info else [])]


def progress(iterable, description: str, total: int | None = None):
    """Iterate with a rich progress bar on a terminal; elsewhere (a batch log) a line about once a minute."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not console.is_terminal:
        yield from _logged(iterable, description, total)
        return
    with Progress(*_columns(), console=console, transient=False) as bar:
        yield from bar.track(iterable, total=total, description=description)


def _logged(iterable, description: str, total: int | None):
    started = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done, now = done + 1, time.perf_counter()
        if now - last >= Monitor.EVERY_S:
            eta = f", ETA {_duration((now - started) / done * (total - done))}" if total else ""
            log.info("%s %d/%s | %s%s", description, done, total or "?", _duration(now - started), eta)
            last = now


class Monitor:
    """What a run tells while it trains. In a terminal, a rich bar per stage and one per evaluation; off a terminal
    (a batch log, nohup) a line every `log_every` steps (0: about once a minute, and after a stage's first step)
    with the step, losses, learning rate, gradient norm, tokens/s and the elapsed time and ETA of the stage and of
    the run; and every step and evaluation to the trackers (--report-to). The run's ETA adds the training FLOPs of
    the stages still ahead (`plan_stages`: stage -> planned training FLOPs, in run order) at the current stage's
    speed.
    Only rank 0 speaks: other ranks get `Monitor(enabled=False)`."""

    EVERY_S = 60.0

    def __init__(self, log_every: int = 0, tokens_per_step: int = 0, trackers=None, enabled: bool = True,
                 terminal: bool | None = None):
        self.log_every, self.tokens_per_step, self.trackers = log_every, tokens_per_step, trackers
        self.enabled = enabled
        self.terminal = console.is_terminal if terminal is None else terminal
        self.stage_flops: dict[str, float] = {}
        self.started = time.perf_counter()
        self._stage = None
        self._bar = None

    def plan_stages(self, stage_flops: dict[str, float]) -> None:
        """The run's stages in order, each with its planned training FLOPs: what the run's ETA adds up."""
        self.stage_flops = dict(stage_flops)

    @contextmanager
    def stage(self, name: str, first_step: int, total_steps: int):
        """While a stage trains from `first_step` (0, or the checkpoint it resumed) to `total_steps`."""
        now = time.perf_counter()
        self._stage = {"name": name, "first": first_step, "total": total_steps, "started": now,
                       "step_at": now, "line_at": now, "line_step": first_step}
        if self.enabled and self.trackers:
            self.trackers.start_stage(name, first_step)
        self._bar = Progress(*_columns(info=True), console=console) if self.enabled and self.terminal else None
        if self._bar:
            self._task = self._bar.add_task(name, total=total_steps, completed=first_step, info="")
            self._bar.start()
        try:
            yield
        finally:
            if self._bar:
                self._bar.stop()
                self._bar = None

    def dev_batches(self, batches: list):
        """Iterate an evaluation's batches, with a bar under the stage's in a terminal."""
        if not self._bar:
            yield from batches
            return
        task = self._bar.add_task(f"{self._stage['name']} dev", total=len(batches), info="")
        for batch in batches:
            yield batch
            self._bar.advance(task)
        self._bar.remove_task(task)

    def step(self, step: int, losses: dict[int, dict[str, float]], lr: float, grad_norm: float | None) -> None:
        """After optimiser step `step` (1-based): `losses` per width (permille) {"loss", "logit", "hidden", "ce"}."""
        if not self.enabled:
            return
        stage, now = self._stage, time.perf_counter()
        if self.trackers:
            tokens_per_s = self.tokens_per_step / max(now - stage["step_at"], 1e-9)
            values = {f"train/{part}/s={format_sparsity(w)}": value for w, parts in losses.items()
                      for part, value in parts.items()}
            values.update({"train/lr": lr, "train/tokens_per_s": tokens_per_s,
                           **({"train/grad_norm": grad_norm} if grad_norm is not None else {})})
            self.trackers.log(step, values)
        stage["step_at"] = now
        if self._bar:
            self._bar.update(self._task, completed=step, info="loss " + " ".join(
                f"{format_sparsity(w)}:{parts['loss']:.3f}" for w, parts in losses.items()))
        if not self.terminal and self._line_due(step, now):
            tokens_per_s = (step - stage["line_step"]) * self.tokens_per_step / max(now - stage["line_at"], 1e-9)
            log.info("%s", self._line(step, losses, lr, grad_norm, tokens_per_s, now))
            stage["line_at"], stage["line_step"] = now, step

    def evaluated(self, step: int, stats: dict, p: dict[int, float], tradeoffs: dict[int, float]) -> None:
        """An evaluation: per width (permille) its dev stats, p(s) and trade-off, and the teacher's dev stats."""
        if not (self.enabled and self.trackers):
            return
        values = {f"eval/{key}/teacher": stats["teacher"][key] for key in ("accuracy", "loss")}
        for w in p:
            s = format_sparsity(w)
            values.update({f"eval/accuracy/s={s}": stats[w]["accuracy"], f"eval/loss/s={s}": stats[w]["loss"],
                           f"eval/p/s={s}": p[w], f"eval/tradeoff/s={s}": tradeoffs[w]})
        self.trackers.log(step, values)

    def finish(self, values: dict[str, float]) -> None:
        if self.enabled and self.trackers:
            self.trackers.summary(values)
            self.trackers.close()

    def _line_due(self, step: int, now: float) -> bool:
        stage = self._stage
        if step == stage["total"] or step == stage["first"] + 1:
            return True
        if self.log_every:
            return step % self.log_every == 0
        return now - stage["line_at"] >= self.EVERY_S

    def _line(self, step, losses, lr, grad_norm, tokens_per_s, now) -> str:
        stage = self._stage
        done = step - stage["first"]
        stage_s = now - stage["started"]
        stage_eta = stage_s / done * (stage["total"] - step)
        widths = " ".join(f"s={format_sparsity(w)} {parts['loss']:.4f}" for w, parts in losses.items())
        grad = f" grad {grad_norm:.3g}" if grad_norm is not None else ""
        line = (f"{stage['name']} {step}/{stage['total']} ({100 * step / stage['total']:.0f}%) | loss {widths} | "
                f"lr {lr:.2e}{grad} | {tokens_per_s:,.0f} tok/s | stage {_duration(stage_s)}, ETA "
                f"{_duration(stage_eta)} | run {_duration(now - self.started)}")
        later = self._later_flops()
        if later is not None:
            seconds_per_flop = stage_s / done * stage["total"] / self.stage_flops[stage["name"]]
            line += f", ETA ~{_duration(stage_eta + later * seconds_per_flop)}"
        return line

    def _later_flops(self) -> float | None:
        """Planned training FLOPs of the stages after the current one (None when the current one is not planned)."""
        names = list(self.stage_flops)
        if self._stage["name"] not in names or not self.stage_flops[self._stage["name"]]:
            return None
        return sum(self.stage_flops[n] for n in names[names.index(self._stage["name"]) + 1:])


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
