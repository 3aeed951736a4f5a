"""Scoring features: kNN, linear probe, few-shot episodes, clustering quality, and `--mode=eval`.

`protocol` (reference/query sets, the fixed seed), `knn`, `linear_probe`, `fewshot`,
`clustering_quality` (the metrics, on arrays), `driver` (a checkpoint in, eval/results.json out).
"""
