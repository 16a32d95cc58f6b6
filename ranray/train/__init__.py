"""Training: the per-worker loops (fine-tuning, pretraining), checkpoints, metrics and plots.

Kept free of imports so `import ranray.train.checkpoint` does not pull in the loops.
"""
