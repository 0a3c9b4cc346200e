"""Transferability: penultimate features of candidate checkpoints (Ray Data batch inference),
LogME / LEEP / NCE / H-score / k-NN / linear-probe scores, ranking, robustness."""
