"""rwp_kernels.optim: drop-in torch.optim optimizers for RWP, m-RWP and adaptive RWP (ARWP)."""
