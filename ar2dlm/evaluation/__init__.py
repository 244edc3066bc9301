"""Model-independent evaluation parts: AUP, benchmarks and their scoring, the code sandbox, fidelity metrics.

Nothing here generates text; a decoder produces completions, these modules turn them into numbers.
"""
