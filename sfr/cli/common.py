"""What every subcommand shares: the error helper, the console and the training progress view."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, Literal, TypeVar

import typer
import typer.core
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from sfr import distributed
from sfr.config import DEVICE_NAMES, PRECISION_NAMES, device_problem, precision_problem, shown
from sfr.data.dataset import binary_size
from sfr.data.loader import resolve_precision
from sfr.data.observation import position_header, position_label
from sfr.errors import DistributedError, SfrError, counted
from sfr.models.matmul import cpu_matmul
from sfr.train.loop import BatchDone, EpochDone, FitResult, ProgressEvent, StageStarted
from sfr.train.pipeline import PipelineResult, StepStarted

USER_ERROR_EXIT = 2


class _Console(Console):
    """rich's Console, except that a closed output raises BrokenPipeError, after the console
    goes quiet, for `handles_user_errors` to stop the command and say how to continue (rich
    would exit 1 at once, past it)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the reader of the output closed it")


console = _Console()
err_console = _Console(stderr=True)

CommandT = TypeVar("CommandT", bound=Callable[..., Any])


def fail(message: str, hint: str | None = None) -> typer.Exit:
    """Print a user error (message and hint) and return the exit to raise (code 2)."""
    # emoji=False: a value such as `cuda:x:` is shown as typed, not as an emoji code
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, emoji=False)
    if hint:
        err_console.print(f"[yellow]Hint:[/] {escape(hint)}", highlight=False, emoji=False)
    return typer.Exit(USER_ERROR_EXIT)


class Terminated(KeyboardInterrupt):
    """SIGTERM received by the command's process: stop as Ctrl-C would."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` in this process while the block runs.

    Job schedulers (SLURM preemption, `kill`) and torchrun (which stops every process of a run
    when one fails) send SIGTERM; the command then stops with its resume advice instead of
    dying silently. Processes forked meanwhile (DataLoader workers) die of it as before.
    """
    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Exit status of a command whose output was closed by its reader: a process killed by SIGPIPE
# (128 + 13), what a shell reports for `yes | head`.
OUTPUT_CLOSED_EXIT = 128 + getattr(signal, "SIGPIPE", 13)


def _output_closed(resume_advice: str) -> None:
    """The reader of stdout is gone (`sfr ... | head`): point stdout at os.devnull so that nothing
    written later fails again (the interpreter's last flush included), as Python's documentation
    advises for BrokenPipeError ("Note on SIGPIPE", module `signal`), and say on stderr, when it
    is still open, that the command stopped and how to continue."""
    for stream in (sys.stdout, sys.__stdout__):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (AttributeError, OSError, ValueError):  # no file descriptor (a test's capture)
            pass
    if not distributed.is_main():
        return
    with contextlib.suppress(OSError):  # stderr went to the same closed pipe (`2>&1 | head`)
        err_console.print(f"[yellow]Output closed (broken pipe): stopped.[/] {resume_advice}")


def handles_user_errors(
    resume_advice: str, *, multiprocess: bool = False, output_advice: str | None = None
) -> Callable[[CommandT], CommandT]:
    """Decorator: `SfrError` becomes a one-paragraph message and exit 2, never a traceback;
    Ctrl-C says how to continue (`resume_advice`) and exits 130, SIGTERM 143. A closed stdout
    (`| head`) stops the command like a signal would, quietly: no traceback, a run stopped so is
    recorded as interrupted (it resumes), `output_advice` (by default `resume_advice`; for a
    command whose work does not continue, `CUT_OFF_ADVICE`) goes to stderr, exit 141.

    Before the command runs, torchrun's environment is checked (`distributed.check_environment`)
    and, unless `multiprocess` (a command that runs as several processes under torchrun), a
    command started as one of several processes is refused (`single_process`)."""

    def decorate(command: CommandT) -> CommandT:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:  # around the messages too: stderr may be the same closed pipe
                return _rendering_errors(command, resume_advice, multiprocess, *args, **kwargs)
            except BrokenPipeError:
                _output_closed(output_advice or resume_advice)
                raise typer.Exit(OUTPUT_CLOSED_EXIT) from None

        return wrapper  # type: ignore[return-value]

    return decorate


def _rendering_errors(
    command: Callable[..., Any],
    resume_advice: str,
    multiprocess: bool,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Run `command`; user errors, Ctrl-C and SIGTERM become messages and exit codes
    (`handles_user_errors`)."""
    try:
        launch = distributed.check_environment()
    except SfrError as error:  # which process is which is unknown: every one says it
        raise fail(error.message, error.hint) from None
    try:
        with sigterm_as_interrupt():
            if launch.world_size > 1 and not multiprocess:
                single_process(launch.world_size)
            cpu_matmul()  # SFR_CPU_MATMUL, before anything is written
            return command(*args, **kwargs)
    except SfrError as error:
        raise _reported(error) from None
    except KeyboardInterrupt as interrupt:
        raise _interrupted(interrupt, resume_advice, launch.world_size > 1) from None
    except Exception as error:  # a process lost outside the core's own guards
        chain = distributed.exception_chain(error)
        interrupt = next((e for e in chain if isinstance(e, KeyboardInterrupt)), None)
        if interrupt is not None and distributed.is_process_failure(error):
            # a signal stops the command and its DataLoader workers: the workers' death is
            # noticed while the interruption is on its way out
            raise _interrupted(interrupt, resume_advice, launch.world_size > 1) from None
        failure = distributed.process_failure(error, "The command stopped", resume_advice)
        if failure is None:
            raise
        raise _reported(failure) from None


def _interrupted(interrupt: KeyboardInterrupt, resume_advice: str, launched: bool) -> typer.Exit:
    """Say on rank 0 that the command stopped (Ctrl-C: exit 130; SIGTERM: 143) and how to
    continue; the exit to raise."""
    if isinstance(interrupt, Terminated):
        if distributed.is_main():
            cause = (
                " torchrun stops every process of a run when one fails or is killed: "
                "look for its message above."
                if launched
                else ""
            )
            err_console.print(f"[yellow]Stopped by SIGTERM.[/]{cause} {resume_advice}")
        return typer.Exit(128 + signal.SIGTERM)
    if distributed.is_main():  # torchrun interrupts every process: one message
        err_console.print(f"[yellow]Interrupted.[/] {resume_advice}")
    return typer.Exit(130)


def _reported(error: SfrError) -> typer.Exit:
    """Print `error` where this process reports it (`distributed.reports`: rank 0, or another
    rank for its own errors, labelled with its rank once); the exit to raise (code 2)."""
    if not distributed.reports(error):
        return typer.Exit(USER_ERROR_EXIT)  # rank 0 prints the message
    rank = distributed.rank()
    named = distributed.is_main() or f"rank {rank} " in error.message.lower()
    return fail(error.message if named else f"rank {rank}: {error.message}", error.hint)


MULTIPROCESS_COMMANDS = "train-branch, finetune, fuse, pipeline and validate"


def single_process(world_size: int) -> None:
    """Refuse a command that runs as one process when torchrun started `world_size` (> 1)
    copies of it: every copy would do the same work and write the same files. Raises a
    DistributedError that rank 0 reports, before anything is done."""
    raise DistributedError(
        f"This sfr command runs as one process, but torchrun started {world_size} copies of it "
        f"(WORLD_SIZE={world_size}): each would do the same work and write the same files.",
        f"Run it without torchrun: sfr COMMAND ... Under torchrun only {MULTIPROCESS_COMMANDS} "
        "run as several processes.",
    )


RERUN_ADVICE = "Checkpoints are written atomically: run the same command again to continue."
RESTART_ADVICE = "Nothing half-written is left behind: run the same command again."
"""What Ctrl-C or SIGTERM says for a command that trains nothing (no checkpoint to continue)."""
CUT_OFF_ADVICE = (
    "Its output was cut off: run the same command again without the pipe, or with its output "
    "into a file (> FILE)."
)
"""What a closed stdout says for a command that trains nothing (nothing to continue)."""
user_errors = handles_user_errors(RESTART_ADVICE, output_advice=CUT_OFF_ADVICE)
"""For the commands that run as one process and train nothing (`demo` trains:
`training_errors`)."""
training_errors = handles_user_errors(RERUN_ADVICE)
multiprocess_errors = handles_user_errors(RERUN_ADVICE, multiprocess=True)
"""For the commands that train as several processes under torchrun (`fuse`, `pipeline`;
`train-branch` and `finetune` have their own advice; `validate`: `validate_errors`)."""
validate_errors = handles_user_errors(
    RESTART_ADVICE, multiprocess=True, output_advice=CUT_OFF_ADVICE
)


@contextmanager
def distributed_run(device: str, precision: str = "fp32") -> Iterator[None]:
    """Run a command as one process of a torchrun run (or alone): join the process group, and
    print only on rank 0. Checks `--precision` against the device before any work."""
    with distributed.session(device) as target:
        resolve_precision(precision, target)
        quiet = console.quiet
        console.quiet = quiet or not distributed.is_main()
        try:
            yield
        finally:
            console.quiet = quiet


def _checked(flag: str, problem: Callable[[object], str | None]) -> Callable[[Any], Any]:
    """A Typer callback refusing a value of `flag` that `problem` rejects: the message
    `--device banana: use auto, cpu, cuda, cuda:N or mps.`, exit 2, before the command runs."""

    def check(value: Any) -> Any:
        if value is not None:
            why = problem(value)
            if why:
                raise fail(f"{flag} {shown(value)}: {why}.")
        return value

    return check


def device_option(**extra: Any) -> Any:
    """The `--device` option of every command: one accepted set (`sfr.config.device_problem`,
    which run.device also follows), one message for the others."""
    return typer.Option(
        "--device",
        help=f"{DEVICE_NAMES}.",
        callback=_checked("--device", device_problem),
        **extra,
    )


def precision_option(help: str, **extra: Any) -> Any:
    """The `--precision` option of every command: fp32, bf16 or fp16, other values refused with
    one message (`sfr.config.precision_problem`)."""
    return typer.Option(
        "--precision",
        help=help,
        metavar="|".join(PRECISION_NAMES),
        callback=_checked("--precision", precision_problem),
        **extra,
    )


def force_option(effect: str, folder: bool = True) -> Any:
    """The `--force` flag in one wording for every command (sfr's overwrite rule, README
    "Existing outputs and --force"): `effect`, and for a folder output that only the files sfr
    wrote there are deleted (a file the user named is simply replaced)."""
    rule = " (only files sfr wrote are deleted)" if folder else ""
    return typer.Option("--force", help=f"{effect}{rule}.")


# Help placeholders, one convention for every command: upper-case words, none for flags.
_PLACEHOLDERS = {"path": "PATH", "int": "INTEGER", "float": "FLOAT", "str": "TEXT", "Path": "PATH"}


# Older spellings of options, still accepted but not shown: one name per thing in the help.
HIDDEN_ALIASES = frozenset({"--num-workers"})


class SfrGroup(typer.core.TyperGroup):
    """The root command group: gives every option and argument of every subcommand the same
    kind of help placeholder (`--force` no `<bool>`, `--data PATH`, `MODEL`) and usage names
    (`MODEL`, `[OUT]`, `SHARDS...`, not Typer's `{MODEL}`), and hides `HIDDEN_ALIASES` from the
    help while still accepting them, once, when Typer builds the command tree."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _tidy_placeholders(self)


def _tidy_placeholders(command: Any) -> None:
    made_help = command.get_help_option

    def get_help_option(ctx: Any) -> Any:  # --help is a flag too: no placeholder
        option = made_help(ctx)
        if option is not None:
            option.display_type_rich = lambda ctx: None
        return option

    command.get_help_option = get_help_option
    for param in getattr(command, "params", []):
        if isinstance(param, (typer.core.TyperOption, typer.core.TyperArgument)):
            label = _placeholder(param)
            param.display_type_rich = lambda ctx, label=label: label
            if isinstance(param, typer.core.TyperArgument):
                if param.metavar is None:
                    param.metavar = param.name.upper()
                param.get_usage_pieces = lambda ctx, param=param: _usage_pieces(param)
            elif any(name in HIDDEN_ALIASES for name in param.opts):
                _hide_aliases(param)
    for sub in getattr(command, "commands", {}).values():
        _tidy_placeholders(sub)


def _usage_pieces(argument: Any) -> list[str]:
    """An argument in the usage line as click writes it: `OUT`, `[OUT]`, `SHARDS...`; nothing
    for a hidden one."""
    if argument.hidden:
        return []
    name = argument.metavar if argument.required else f"[{argument.metavar}]"
    return [f"{name}..." if argument.nargs != 1 else name]


def _hide_aliases(option: Any) -> None:
    """Show only the option's current names; the parser still accepts the hidden ones."""
    every = list(option.opts)
    option.opts = [name for name in every if name not in HIDDEN_ALIASES]
    add_to_parser = option.add_to_parser

    def add_every_name(parser: Any, ctx: Any) -> None:
        shown, option.opts = option.opts, every
        try:
            add_to_parser(parser, ctx)
        finally:
            option.opts = shown

    option.add_to_parser = add_every_name


def _placeholder(param: Any) -> str | None:
    """`None` for a flag, else the upper-case name of the value (`PATH`, `INTEGER`, `a|b`)."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    if isinstance(param, typer.core.TyperOption) and param.metavar is not None:
        return param.metavar
    try:
        label = param.display_type(None).strip("<>")
    except Exception:
        return None
    multiple = label.startswith("list[")
    label = label.removeprefix("list[").removesuffix("]").removesuffix(" range")
    label = _PLACEHOLDERS.get(label, label if "|" in label else label.upper())
    return f"{label}..." if multiple and isinstance(param, typer.core.TyperArgument) else label


def sample_bars() -> Progress:
    """A transient progress display for inference over the segments of a split."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def info_bars() -> Progress:
    """Transient bars with counts, an `info` text field, elapsed time and ETA."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


# What forces preloading, as each command takes it (`data_line`): the branch commands have
# --preload, fuse and pipeline only --set, the demo neither.
PRELOAD_OPTION = "--preload or --set data.preload=true"
PRELOAD_SET = "--set data.preload=true"


class TrainingView:
    """Rich rendering of training progress events: epoch and batch bars, one line per epoch,
    and at the start of every stage that trains how its batches are read (`data_line`)."""

    def __init__(
        self, title: str = "", measure: str = "selection", forcing: str | None = PRELOAD_OPTION
    ) -> None:
        """`measure` names the selection measure, e.g. `top5@1s` (top-5 accuracy at τ = 1 s);
        `forcing` what of the command forces preloading (None: nothing, as in `sfr demo`)."""
        self.title = title
        self.measure = measure
        self.forcing = forcing
        self.bars = info_bars()
        self.epoch_task: TaskID | None = None
        self.batch_task: TaskID | None = None

    def __enter__(self) -> TrainingView:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def __call__(self, event: ProgressEvent) -> None:
        if isinstance(event, StageStarted):
            self._reset()
            self.epoch_task = self.bars.add_task(
                f"{self.title} epochs", total=event.epochs, completed=event.start_epoch, info=""
            )
            self.batch_task = self.bars.add_task(
                "  batches", total=event.batches_per_epoch, info=""
            )
            if event.start_epoch >= event.epochs:
                self.bars.console.print(
                    f"  {event.run_dir} is already finished: it has {'its' if event.epochs == 1 else 'all'} "
                    f"{counted(event.epochs, 'epoch')}, "
                    "nothing to train (pass more --epochs to extend it)"
                )
            else:
                if event.start_epoch:
                    self.bars.console.print(
                        f"  resuming {event.run_dir} at epoch {event.start_epoch + 1}"
                    )
                line = data_line(event, self.forcing)
                if line:
                    self.bars.console.print(line, highlight=False)
        elif isinstance(event, BatchDone) and self.batch_task is not None:
            self.bars.update(
                self.batch_task,
                description=f"  {event.phase} batches",
                completed=event.done,
                total=event.total,
                info=f"loss {event.loss:.3f} · top-5 {event.top5:5.1f}% · "
                f"{event.samples_per_s:,.0f} samples/s",
            )
        elif isinstance(event, EpochDone) and self.epoch_task is not None:
            self.bars.update(
                self.epoch_task,
                completed=event.epoch + 1,
                info=f"best {self.measure} {event.best:.2f} (epoch {event.best_epoch + 1})",
            )
            marker = " [green]★ best[/]" if event.is_best else ""
            self.bars.console.print(
                f"  epoch {event.epoch + 1:>3}/{event.epochs}  loss {event.train_loss:.4f} "
                f"(val {event.val_loss:.4f})  {self.measure} {event.selection:6.2f}{marker}  "
                f"{event.seconds:.1f} s",
                highlight=False,
            )

    def _reset(self) -> None:
        for task in (self.epoch_task, self.batch_task):
            if task is not None:
                self.bars.remove_task(task)
        self.epoch_task = self.batch_task = None


def data_line(event: StageStarted, forcing: str | None = PRELOAD_OPTION) -> str | None:
    """How a stage reads its training batches, one line: a preloaded table gathered in the
    training process (where --workers is not used), or LMDB reads by the loader's processes and,
    where data.preload = "auto" chose that, why, and `forcing` (what of the command forces
    preloading; None: nothing is named). Under torchrun every process has its own table or
    worker processes: the line says "in each process". None where the training set records no
    preloading (a dataset other than `AnticipationDataset`)."""
    preloading = event.preloading
    if preloading is None:
        return None
    several = preloading.copies > 1 or distributed.world_size() > 1
    if preloading.preloaded:
        each = " in each process" if several else ""
        return (
            f"  data: preloaded table in memory ({binary_size(preloading.table_bytes)}{each}, "
            f"data.preload = {_toml(preloading.mode)}), batches gathered in the training "
            "process (--workers is not used for it)"
        )
    readers = (
        f"by {counted(event.workers, 'worker process', 'worker processes')}"
        f"{' in each process' if several else ''} (--workers)"
        if event.workers
        else "in the training process (--workers 0)"
    )
    line = f"  data: read from the LMDB stores as training goes, {readers}"
    if preloading.mode != "auto":
        return line
    if preloading.available is None:
        why = "the memory available here is unknown (no MemAvailable in /proc/meminfo)"
    else:
        each = f" in each of the {preloading.copies} processes" if preloading.copies > 1 else ""
        why = (
            f"preloading needs {binary_size(preloading.table_bytes)}{each}, "
            f"{'together ' if each else ''}more than half of the "
            f"{binary_size(preloading.available)} available"
        )
    forced = f" ({forcing} forces it)" if forcing else ""
    return f'{line}: {why}, so data.preload = "auto" does not preload{forced}'


def _toml(value: object) -> str:
    """A config value as a TOML file writes it (`true`, `"auto"`)."""
    return json.dumps(value)


def stage_table(
    result: FitResult, times: tuple[float, ...], title: str, task: str = "anticipation"
) -> Table:
    """Validation measures of a stage's best epoch, one row per anticipation time (or ratio)."""
    table = Table(title=title, title_justify="left")
    table.add_column(position_header(task), justify="right")
    table.add_column("action top-1 %", justify="right")
    table.add_column("action top-5 %", justify="right")
    for seconds in times:
        table.add_row(
            position_label(seconds, task, unit=False),
            f"{result.metrics[f'top1@{seconds:g}']:.2f}",
            f"{result.metrics[f'top5@{seconds:g}']:.2f}",
        )
    return table


def results_table(
    rows: Sequence[tuple[str, FitResult]],
    times: Sequence[float],
    title: str,
    caption: str | None = None,
    task: str = "anticipation",
) -> Table:
    """Models side by side: one row per model, one `top-1/top-5` column per anticipation time."""
    table = Table(
        title=title,
        title_justify="left",
        caption=caption,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("model (L = fusion level)", no_wrap=True)
    for seconds in times:
        label = position_label(seconds, task) if task != "anticipation" else f"τ={seconds:g}s"
        table.add_column(label, justify="right", no_wrap=True)
    for name, fit in rows:
        table.add_row(
            name,
            *(
                f"{_percent(fit.metrics, 'top1', t)}/{_percent(fit.metrics, 'top5', t)}"
                for t in times
            ),
        )
    return table


def _percent(metrics: dict[str, float], measure: str, seconds: float) -> str:
    """A measure at a time with one decimal, `–` when the run did not record it."""
    value = metrics.get(f"{measure}@{seconds:g}")
    return "–" if value is None else f"{value:.1f}"


def pipeline_rows(result: PipelineResult) -> list[tuple[str, FitResult]]:
    """Rows of a pipeline's results table: fine-tuned branches, then fusion units bottom-up."""
    rows = []
    for step in result.steps:
        if step.stage in ("finetune", "fusion"):
            name = step.label if step.level == 0 else f"L{step.level} {step.label}"
            rows.append((name, result.results[(step.label, step.stage)]))
    return rows


def step_line(event: StepStarted) -> str:
    """Header line of a pipeline step."""
    step = event.step
    what = f"{step.stage} {step.label}" if step.level == 0 else f"fusion L{step.level} {step.label}"
    action = {"train": "", "resume": " (resuming)", "skip": " [dim](finished, skipped)[/]"}
    return f"[bold][{event.index}/{event.total}] {what}[/]{action[event.action]}"


SamplingOpt = Annotated[
    Literal["grid", "published"] | None,
    typer.Option(
        "--sampling",
        help="grid: every rate reads its own time grid; published: the slower rates' frames are "
        "taken from the fast rate's sequence, as the published Slow-Fast loader does "
        "(default: the model's data.sampling).",
    ),
]
