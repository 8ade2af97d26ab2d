"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s bench`, `nox -s bench-features`."""

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
    """The benchmark table at real dimensions (efficient vs plain, fused kernel vs step loop,
    validation split, peak memory, loader), printed and written to benchmarks/results.json."""
    session.install(TORCH, "-e", ".")
    session.run("python", "benchmarks/bench.py", *session.posargs)


@nox.session(name="bench-features")
def bench_features(session: nox.Session) -> None:
    """Feature extraction speed: backbones, decoding, `sfr features` vs the published route."""
    session.install(TORCH, "-e", ".[video]")
    session.run("python", "benchmarks/bench_features.py", *session.posargs)
