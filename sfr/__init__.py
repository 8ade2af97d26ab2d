"""sfr: Slow-Fast Rolling-Unrolling LSTMs for egocentric action anticipation."""

__version__ = "0.1.0"
