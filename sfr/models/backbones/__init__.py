"""Video backbones that turn frames into the feature vectors of a store (`sfr features`).

Each backbone is a keyword-only `create_*` builder in pure PyTorch whose state dict is key for key
that of the public implementation, so the published weights load unchanged.
"""
