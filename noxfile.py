"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s bench`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = "torch==2.13.0"  # the CPU build; an unpinned torch pulls gigabytes of CUDA packages


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (the same command as the README and .ci/run)."""
    session.install(TORCH, "-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """Speed benchmarks at real dimensions, printed as side-by-side ratios."""
    session.install(TORCH, "-e", ".[video]")
    session.run("python", "benchmarks/bench_branch.py", *session.posargs)
    session.run("python", "benchmarks/bench_fusion.py", *session.posargs)
    session.run("python", "benchmarks/bench_features.py", *session.posargs)
