"""Infrastructure that two or more method scripts use unchanged: the ViT (vit.py), the command-line dialect
(config.py), the training loop helper (trainer.py), processes (distributed.py), optimisation (optim.py), checkpoints
(checkpoints.py), data (data.py), evaluation (features.py, protocols.py, eval.py) and pictures (plots.py)."""
