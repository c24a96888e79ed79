"""Every ``align`` command of the READMEs that this machine can run, run as written.

The commands are read from the READMEs' code blocks (``bash`` blocks; ``$ `` lines of console
blocks, whose following lines are the output they must print), so a command that stops working,
or a new one, is caught here. They run in a workspace holding the files they name: tiny
``.nemo`` models (``model.nemo``, ``sft.nemo``, ``teacher.nemo``, ...), ``train.jsonl`` and
``val.jsonl`` of the kind the command reads (preference, unpaired or SFT data, 512 prompts),
``prompts.jsonl``, NeMo-Aligner KD JSONL ``topk.jsonl``, and a run directory for ``--resume``
and ``align plot`` (a stand-in: its config and a few metrics rows). To stay cheap, training
commands (``align run``) run with ``--dry-run``: configuration, model, every data record and
the step plan are checked, nothing is trained. ``align generate`` and ``align kd teacher`` run
for real. Each runs in this process through Typer's test runner (the same code as the
``align`` executable, without its ~10 s of imports per command). Left out, with the reason:
installation lines, templates (``...``), and commands that start more processes than a CPU
test can (``--nproc-per-node 8`` without ``--dry-run``).
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align_cli.main import app

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "packages/align-cli/README.md")
PROMPTS = 512
NEMOS = ("model", "sft", "teacher", "student", "M", "T", "S")
RUN_DIR = "runs/{command}-20261122-101500"  # the name `align plot` is shown with


@dataclass(frozen=True)
class Command:
    """One command of a README.

    Attributes:
        readme: The README (relative to the repository root).
        line: Its line number there.
        argv: The command's words (``align`` first).
        output: The lines a console example shows after it (empty: only exit status 0).
    """

    readme: str
    line: int
    argv: tuple[str, ...]
    output: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.readme}:{self.line}"


def readme_commands(readme: str) -> list[Command]:
    """The commands of ``readme``'s code blocks (continuation lines joined, comments dropped)."""
    lines = (ROOT / readme).read_text().splitlines()
    commands: list[Command] = []
    fence: str | None = None
    pending = ""
    start = 0
    for number, text in enumerate(lines, start=1):
        if text.startswith("```"):
            fence = None if fence is not None else (text[3:].strip() or "console")
            continue
        if fence is None:
            continue
        if fence == "console":
            if text.startswith("$ "):
                argv = tuple(shlex.split(text[2:], comments=True))
                commands.append(Command(readme, number, argv))
            elif commands and commands[-1].readme == readme and commands[-1].line < number:
                last = commands[-1]
                if last.line + len(last.output) + 1 == number and text.strip():
                    commands[-1] = Command(readme, last.line, last.argv, (*last.output, text))
            continue
        if fence != "bash":
            continue
        if not pending:
            start = number
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + text, comments=True)
        pending = ""
        if words:
            commands.append(Command(readme, start, tuple(words)))
    return commands


def skip_reason(argv: tuple[str, ...]) -> str | None:
    """Why a command is not run here, or None."""
    if argv[0] != "align":
        return "installation or test-suite line"
    if any("..." in word or word == "|" for word in argv):
        return "a template (...)"
    if argv[1] != "run" and "--nproc-per-node" in argv:  # `align run` is a dry run here
        procs = int(argv[argv.index("--nproc-per-node") + 1])
        if procs > 2:
            return f"{procs} processes"
    return None


ALL = [command for readme in READMES for command in readme_commands(readme)]


def test_the_readmes_have_commands_to_run() -> None:
    runnable = [c for c in ALL if skip_reason(c.argv) is None]
    assert len(runnable) >= 15, [c.id for c in runnable]
    assert any(c.output for c in runnable)  # the console examples and their error lines


def _data_kind(argv: tuple[str, ...]) -> str:
    if argv[1] == "run" and argv[2] in ("dpo", "ipo", "rpo"):
        return "preference"
    if argv[1] == "run" and argv[2] == "kto":
        return "unpaired"
    return "sft"


def invoke(*args: str) -> tuple[int, str]:
    """``align ARGS`` in this process: exit status and everything it printed."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory per data kind, each with the files the READMEs' commands name."""
    from align_data import write_synthetic_dataset

    root = tmp_path_factory.mktemp("readme")
    nemo = root / "tiny.nemo"
    status, output = invoke("init-model", str(nemo), "--num-layers", "1", "--seq-length", "64")
    assert status == 0, output
    files = write_synthetic_dataset(root / "synthetic", seed=0, num_train=PROMPTS, num_eval=16)
    for kind in ("preference", "unpaired", "sft"):
        cwd = root / kind
        cwd.mkdir()
        for name in NEMOS:
            (cwd / f"{name}.nemo").symlink_to(nemo)
        shutil.copy(getattr(files, f"{kind}_train"), cwd / "train.jsonl")
        shutil.copy(getattr(files, f"{kind}_eval"), cwd / "val.jsonl")
        prompts = [json.loads(line)["prompt"] for line in files.sft_eval.read_text().splitlines()]
        (cwd / "prompts.jsonl").write_text(
            "".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:4])
        )
    # NeMo-Aligner KD JSONL: labels are the tokens shifted by one, the answer's positions last.
    line = {"tokens": [5, 6, 7, 8], "labels": [6, 7, 8, 9], "loss_mask": [0, 1, 1, 1]}
    (root / "sft" / "topk.jsonl").write_text(
        "".join(json.dumps({**line, "index": i}) + "\n" for i in range(64))
    )
    return root


def _started_run(cwd: Path, command: str) -> Path:
    """A stand-in run directory of ``align run COMMAND`` (as a started run leaves it)."""
    from align_cli.commands.run import RunOptions, prepare, write_run_dir

    run_dir = cwd / RUN_DIR.format(command=command)
    if run_dir.exists():
        return run_dir
    options = RunOptions(command, overrides=(f"exp_manager.explicit_log_dir={run_dir}",))
    prepared = prepare(options)
    write_run_dir(run_dir, prepared.composed, command, ("align", "run", command))
    rows = [
        {"split": "train", "step": s, "time": 0.0, "loss": 0.7 - 0.1 * s, "acc": 0.5, "lr": 1e-3}
        for s in (1, 2, 3)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


TEACHER = ("kd", "teacher", "--restore", "teacher.nemo", "model.data.data_prefix=train.jsonl",
           "top_k=100", "output=topk/")  # fmt: skip


def _prepare(cwd: Path, argv: tuple[str, ...]) -> list[str]:
    """The arguments to run: training commands get ``--dry-run``; files they need exist."""
    args = list(argv[1:])
    if args[0] == "run":
        if "--resume" in args:
            _started_run(cwd, args[1])
        if "--dry-run" not in args and "--show-config" not in args:
            args.insert(2, "--dry-run")
    if args[0] == "plot":
        _started_run(cwd, Path(args[1]).name.split("-")[0])
    offline = any(a.startswith("model.knowledge_distillation.teacher.directory=") for a in args)
    if offline and not (cwd / "topk" / "train").is_dir():  # made by a README command before
        status, output = invoke(*TEACHER)
        assert status == 0, output
    return args


@pytest.mark.parametrize(
    "command", [c for c in ALL if skip_reason(c.argv) is None], ids=lambda c: c.id
)
def test_readme_command_runs(
    command: Command, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = workspace / _data_kind(command.argv)
    monkeypatch.chdir(cwd)
    args = _prepare(cwd, command.argv)
    status, shown = invoke(*args)
    if command.output:
        assert status == 2, shown
        for line in command.output:
            assert line in shown.splitlines(), f"README: {line!r}; printed:\n{shown}"
        return
    assert status == 0, f"align {shlex.join(args)} (in {cwd.name}/):\n{shown}"
