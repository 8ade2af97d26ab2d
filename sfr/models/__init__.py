"""Models: the RU-LSTM branch (efficient and reference formulations) and its building blocks."""
