"""Run directories: one folder per stage of one model, named from its config.

    RUNS/<dataset>/<branch slug>/<stage>/    e.g. runs/ek55/rgb-a0.5-enc6-ant4/pretrain/
        config.json        resolved config of the run
        status.json        {"state": "running" | "interrupted" | "finished", "epoch": ..., ...}
        metrics.jsonl      one line per finished epoch

Epochs in status.json and metrics.jsonl are numbered from 1, as on screen (`"epoch": 3` is the
third epoch; 0 before the first has ended, `best_epoch` null until there is a best); the code
counts from 0 and `RunDir` translates at the file boundary.
        best.safetensors   weights of the best epoch (+ config and metrics in its metadata)
        last.safetensors   weights, optimiser and RNG state after the last epoch (for --resume)

Later stages find earlier ones by this convention.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:  # POSIX; elsewhere a run folder is not held (two runs must not share one)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

from sfr.checkpoint import read_metadata
from sfr.errors import RunError, counted
from sfr.files import (
    atomic_write_text,
    check_folder_path,
    existing_output,
    finite_or_none,
    remove_owned,
    remove_stale_temp_files,
)

# The states of a run that stopped, or is training, before its last epoch: --resume continues it.
# "interrupted" is recorded when training stops (a kill, an error); a run killed too hard to record
# it (SIGKILL, power loss) still says "running".
UNFINISHED = ("running", "interrupted")

# Settings that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = (
    "optim.epochs",
    "fusion_optim.epochs",
    "run.device",
    "run.precision",
    "data.num_workers",
    "data.preload",
)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _used_modalities(tree: dict[str, Any]) -> set[str] | None:
    """The modalities a config's model reads (a branch's one, a fusion's list); None if unknown."""
    branch, model = tree.get("branch"), tree.get("model")
    if isinstance(branch, dict) and isinstance(branch.get("modality"), str):
        return {branch["modality"]}
    if isinstance(model, dict) and isinstance(model.get("modalities"), list):
        return set(model["modalities"])
    return None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted fields whose values differ between two config trees.

    Resumable fields are excluded, and so are the feature sizes of modalities the model does
    not read (an rgb branch does not depend on `data.feature_dims.flow`).
    """
    a, b = _flatten(saved), _flatten(current)
    used = _used_modalities(current)

    def concerns_model(key: str) -> bool:
        if key in RESUMABLE_CHANGES:
            return False
        if used is not None and key.startswith("data.feature_dims."):
            return key.removeprefix("data.feature_dims.") in used
        return True

    return sorted(
        key for key in set(a) | set(b) if a.get(key) != b.get(key) and concerns_model(key)
    )


# The advisory lock (flock) by which the process training in a run folder holds it; it records
# that process's id. The kernel releases it when the process dies, so a file left by a killed
# process holds nothing; sfr deletes it when it releases the folder.
LOCK_FILE = ".sfr-run.lock"

# Every file sfr writes in a run folder: `--force` deletes these and nothing else.
RUN_FILES = (
    "config.json",
    "status.json",
    "metrics.jsonl",
    "best.safetensors",
    "last.safetensors",
)


_EPOCH_FIELDS = ("epoch", "best_epoch")


def _numbered(record: dict[str, Any]) -> dict[str, Any]:
    """0-based epoch indexes -> the 1-based numbers of the files (no best epoch yet: null)."""
    out = dict(record)
    for key in _EPOCH_FIELDS:
        if isinstance(out.get(key), int):
            out[key] = out[key] + 1 if out[key] >= 0 or key == "epoch" else None
    return out


def _indexed(record: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `_numbered`: the files' epoch numbers -> 0-based indexes."""
    out = dict(record)
    for key in _EPOCH_FIELDS:
        if isinstance(out.get(key), int):
            out[key] -= 1
        elif key in out and out[key] is None:
            out[key] = -1
    return out


def _read_json(path: Path, what: str) -> Any:
    """A JSON file of a run folder, or a RunError saying it is damaged and what to do."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:  # not damage: a folder in its place, no permission
        raise RunError(
            f"The {what} {path} cannot be read: {error.strerror or error}.",
            f"Check {path} (it must be a file you can read).",
        ) from None
    except (UnicodeDecodeError, ValueError) as error:
        raise RunError(
            f"The {what} {path} cannot be read: {error}.",
            f"The run folder {path.parent} is damaged: pass --force to delete what sfr wrote "
            "there and train from scratch.",
        ) from None


def _recorded_holder(handle: int) -> str:
    """The process id that the holder of an open `LOCK_FILE` recorded in it ("" if none)."""
    return os.read(handle, 64).decode(errors="replace").strip()


def holding_process(holder: str) -> str:
    """`RunDir.holder`'s record as words: "process 1234", or "another process"."""
    return f"process {holder}" if holder.isdigit() else "another process"


# How a command that trains into --runs trains another copy of a run at the same time.
RUNS_ELSEWHERE = "another --runs folder or run.name"


class RunInUseError(RunError):
    """Another process holds the run folder (`RunDir.hold`). The hint ends by naming where a
    second copy could train instead (`elsewhere`: `RUNS_ELSEWHERE`, or what the command at hand
    takes, through `elsewhere`)."""

    def __init__(self, message: str, wait: str, elsewhere: str = RUNS_ELSEWHERE) -> None:
        super().__init__(
            message,
            f"{wait}; to train another copy at the same time, give it {elsewhere}.",
        )
        self.wait = wait

    def elsewhere(self, options: str) -> RunInUseError:
        """The same refusal, its hint naming `options` (e.g. "another --out folder")."""
        return RunInUseError(self.message, self.wait, options)


class RunDir:
    """The files of one stage run and the rules for starting, resuming or overwriting it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock: int | None = None  # the descriptor of LOCK_FILE while this process holds it
        self._made: list[Path] = []  # the folders `hold` created, deepest first

    config_path = property(lambda self: self.root / "config.json")
    status_path = property(lambda self: self.root / "status.json")
    metrics_path = property(lambda self: self.root / "metrics.jsonl")
    best_path = property(lambda self: self.root / "best.safetensors")
    last_path = property(lambda self: self.root / "last.safetensors")

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE

    def hold(self) -> None:
        """Hold the folder for this process until `release` (or its exit): an exclusive flock on
        `LOCK_FILE`, which records the process id. Call it before anything is written there; the
        folder (and its parents) are created for it.

        Raises RunError naming the folder and the process id when another process holds it (a
        second command training into it; under torchrun only rank 0 holds it). A lock file left
        by a process that died holds nothing (the kernel drops its lock) and is taken over.
        """
        if self._lock is not None or fcntl is None:
            return
        check_folder_path(self.root, "run")
        missing = [p for p in (self.root, *self.root.parents) if not p.exists()]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            while True:
                handle = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _recorded_holder(handle)
                    os.close(handle)
                    raise self._held_error(holder) from None
                try:  # the holder before may have released it (deleting the file) meanwhile
                    same = os.fstat(handle).st_ino == os.stat(self.lock_path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(handle)
            os.ftruncate(handle, 0)
            os.write(handle, f"{os.getpid()}\n".encode())
        except OSError as error:
            raise RunError(
                f"The run folder {self.root} cannot be written: {error.strerror or error}.",
                "Choose a --runs folder you can write to.",
            ) from None
        self._lock, self._made = handle, missing

    def check_free(self) -> None:
        """RunError (as `hold`'s) when another process holds the folder now; nothing is written.
        For a refusal before long work (loading data), ahead of `hold`."""
        holder = self.holder()
        if holder is not None:
            raise self._held_error(holder)

    def holder(self) -> str | None:
        """The process id recorded by the process that holds the folder now ("" when it is not
        readable), or None when no other process holds it (this one may). Nothing is written."""
        if fcntl is None or self._lock is not None:
            return None
        try:
            handle = os.open(self.lock_path, os.O_RDONLY)
        except OSError:  # no lock file: nobody holds it
            return None
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _recorded_holder(handle)
        finally:
            os.close(handle)
        return None

    def _held_error(self, holder: str) -> RunInUseError:
        process = holding_process(holder)
        return RunInUseError(
            f"The run folder {self.root} is in use: {process} is training there now "
            "(two processes must not train into one folder).",
            f"Wait for {process} to finish (or stop it), then run the command again",
        )

    def release(self) -> None:
        """Give up the folder `hold` took: delete the lock file, then drop the lock, and remove
        the folders `hold` created when nothing else was written there. Idempotent."""
        if self._lock is None:
            return
        handle, self._lock = self._lock, None
        with contextlib.suppress(OSError):
            self.lock_path.unlink()
        os.close(handle)
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote there
                break
        self._made = []

    @contextlib.contextmanager
    def held(self) -> Iterator[RunDir]:
        """`release` when the block ends, whatever happens: for a `hold` taken inside it (by
        `prepare`, on rank 0 only)."""
        try:
            yield self
        finally:
            self.release()

    def status(self) -> dict[str, Any]:
        """`{"state": "empty" | "running" | "interrupted" | "finished", ...}` as recorded in
        status.json (see `UNFINISHED`)."""
        if not self.status_path.is_file():
            return {"state": "empty"}
        status = _read_json(self.status_path, "run status")
        if not isinstance(status, dict) or status.get("state") not in (*UNFINISHED, "finished"):
            raise RunError(
                f"The run status {self.status_path} is not one sfr writes: {status!r}.",
                f"Pass --force to delete what sfr wrote in {self.root} and train from scratch.",
            )
        return status

    @property
    def finished(self) -> bool:
        return self.status()["state"] == "finished"

    def trained_to(self, epochs: int) -> bool:
        """Whether status.json records a finished run of at least `epochs` epochs (then
        `--resume` has nothing to train); False for anything else, unreadable included."""
        try:
            status = self.status()
        except RunError:
            return False
        epoch = status.get("epoch")
        return status["state"] == "finished" and isinstance(epoch, int) and epoch >= epochs

    def saved_config(self) -> dict[str, Any] | None:
        if not self.config_path.is_file():
            return None
        saved = _read_json(self.config_path, "saved config")
        if not isinstance(saved, dict):
            raise RunError(
                f"The saved config {self.config_path} is not a JSON object.",
                f"Pass --force to delete what sfr wrote in {self.root} and train from scratch.",
            )
        return saved

    def clear(self) -> None:
        """Delete the files sfr wrote here (`RUN_FILES` and temp files), and the folder if empty.

        Anything else in the folder is left alone (sfr's one overwrite rule).
        """
        remove_owned(self.root, lambda relative: relative.as_posix() in RUN_FILES)

    def prepare(
        self,
        config: dict[str, Any],
        *,
        force: bool,
        resume: bool,
        differences: Callable[[dict[str, Any], dict[str, Any]], list[str]] = config_differences,
        epochs_key: str = "optim.epochs",
    ) -> bool:
        """Make the folder ready for training; True if a saved state should be resumed.

        The folder is held by this process from here on (`hold`; RunError naming the process
        that holds it otherwise, whatever `force` and `resume` say) until `release`, which a
        refusal calls itself. A finished or interrupted run is refused unless `force` (start
        over) or `resume`
        (continue it; its saved config must match in every field `differences` compares: by
        default all but `RESUMABLE_CHANGES`, and its `epochs_key` must ask for at least the
        epochs it holds, see `check_epochs`). A run that stopped before its first checkpoint holds
        nothing to keep: it is simply started again. Temp files of checkpoint writes killed midway
        are deleted. Nothing is written before every check has passed.
        """
        check_folder_path(self.root, "run")  # --runs naming a file is refused, not a traceback
        self.hold()  # no other process trains here now: a "running" run was killed
        try:
            return self._prepare_held(config, force, resume, differences, epochs_key)
        except BaseException:
            self.release()  # refused: the folder is as it was
            raise

    def _prepare_held(
        self,
        config: dict[str, Any],
        force: bool,
        resume: bool,
        differences: Callable[[dict[str, Any], dict[str, Any]], list[str]],
        epochs_key: str,
    ) -> bool:
        """`prepare` once this process holds the folder."""
        if force:
            self.clear()
        state = self.status()["state"]
        if state in UNFINISHED and not self.last_path.is_file():
            self.clear()  # failed before its first epoch ended: nothing to resume or protect
            state = "empty"
        if state != "empty" and not resume:
            what = {
                "finished": "a finished run",
                "interrupted": "an interrupted run",
                "running": "an unfinished run, whose process was killed before it could record "
                "that it stopped",
            }[state]
            raise existing_output(
                self.root,
                "run folder",
                what,
                "Pass --resume to continue it (for example with more --epochs) or --force to "
                "delete what sfr wrote there and train from scratch.",
            )
        saved = self.saved_config()
        if resume and saved is not None:
            changed = differences(saved, config)
            if changed:
                raise RunError(
                    f"Cannot resume {self.root}: its saved config differs in {', '.join(changed)}.",
                    "Resume with the same settings, or pass --force to start over.",
                )
        if resume and not force:
            section, field = epochs_key.split(".")
            self.check_epochs(config[section][field], epochs_key)
        remove_stale_temp_files(self.root)
        atomic_write_text(self.config_path, json.dumps(config, indent=2, sort_keys=True))
        return resume and self.last_path.is_file()

    def trained_epochs(self) -> int | None:
        """The number of epochs last.safetensors holds; None without a readable one (resuming
        from a damaged one reports it)."""
        if not self.last_path.is_file():
            return None
        try:
            epoch = read_metadata(self.last_path).get("epoch")
        except RunError:
            return None
        return epoch if isinstance(epoch, int) else None

    def check_epochs(self, epochs: int, key: str) -> None:
        """Refuse to resume towards fewer epochs than the run already holds (RunError naming
        both and `key`, the config field of the epochs): training cannot take epochs back."""
        done = self.trained_epochs()
        if done is not None and epochs < done:
            raise RunError(
                f"Cannot resume {self.root} with {counted(epochs, 'epoch')} ({key}): the run "
                f"already has {counted(done, 'epoch')}.",
                f"Pass --epochs {done} or more to extend it, or --force to start over.",
            )

    def mark_interrupted(self) -> None:
        """Record that training stopped before finishing: a "running" status.json becomes
        "interrupted", its other fields kept. Best effort (called while a failure propagates): a
        status that cannot be read or written is left as it is; resuming works the same."""
        try:
            status = self.status()
            if status["state"] == "running":
                record = {**status, "state": "interrupted"}
                atomic_write_text(self.status_path, json.dumps(record, sort_keys=True))
        except RunError:
            pass

    def set_status(self, state: str, **fields: Any) -> None:
        """Write status.json; `epoch` and `best_epoch` are 0-based here, 1-based in the file."""
        record = finite_or_none({"state": state, **_numbered(fields)})  # null, not -Infinity
        atomic_write_text(self.status_path, json.dumps(record, sort_keys=True))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        records = []
        try:
            lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
            for line in lines:
                if line.strip():
                    records.append(json.loads(line))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise RunError(
                f"The metrics log {self.metrics_path} cannot be read: {error}.",
                f"Pass --force to delete what sfr wrote in {self.root} and train from scratch.",
            ) from None
        if not all(isinstance(r, dict) and isinstance(r.get("epoch"), int) for r in records):
            raise RunError(
                f"The metrics log {self.metrics_path} holds lines sfr did not write.",
                f"Pass --force to delete what sfr wrote in {self.root} and train from scratch.",
            )
        return [_indexed(record) for record in records]

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl atomically with exactly `records` (used to drop redone epochs).

        Records count epochs from 0 like the code; the file numbers them from 1.
        """
        lines = (json.dumps(finite_or_none(_numbered(r))) + "\n" for r in records)
        atomic_write_text(self.metrics_path, "".join(lines))
