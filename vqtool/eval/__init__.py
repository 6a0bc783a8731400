"""Evaluation: FID/KID/PRDC on torch-fidelity features, VQ reconstruction, prior NLL, LPIPS nearest neighbours."""
