"""Code that two or more method scripts use unchanged: the ViT (vit.py), data (data.py), the training engine
(engine.py), checkpoints (checkpoints.py) and evaluation (eval.py)."""
