"""Evaluation parts: AUP, benchmarks and their scoring, the code sandbox, fidelity metrics, likelihood estimators,
resumable evaluation points, the lm-eval model, result tables and plots, the prompts compare and bench share.

The jobs built from them (`eval`, `ppl`, `report`, `lm-eval`) are recipes (`ar2dlm/recipes/`).
"""
