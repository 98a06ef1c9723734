"""The training command: ``python -m rwp_kernels.train`` (also installed as ``rwp-train``)."""
