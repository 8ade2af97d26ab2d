"""`python -m sfr` (and `torchrun ... -m sfr`): the `sfr` command line."""

from sfr.cli.app import app

if __name__ == "__main__":
    app(prog_name="sfr")
