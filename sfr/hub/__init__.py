"""Published artefacts: safe reading and conversion of the public RU-LSTM checkpoints."""
