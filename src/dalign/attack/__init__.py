"""Adaptive attacks: PAIR (Chao et al. 2024) against the student without and with the Best-of-N guard.

`dalign attack pair` runs, for every behaviour (goal + target string), `streams` attack conversations of up to
`depth` iterations against each target (base = adapter off, aligned, guarded = aligned behind `BestOfN`):

    attacker proposes a prompt (JSON {improvement, prompt}) -> target answers -> judge rates 1-10 -> feedback

A stream stops at its first rating >= `success_threshold` or after `depth` iterations. Every iteration is a row of
`attacks.parquet`, committed as soon as it is judged, so a killed run resumes at the next iteration. The report
turns the rows into the paper's Table 4 (`dalign.report.attack`).

Modules: `prompts` (the attacker and judge prompts), `parse` (reading the attacker's reply), `chat` (attacker and
LLM-judge models behind one interface), `rate` (judges on the 1-10 scale), `targets`, `loop` (one PAIR iteration),
`artifact` (the parquet store), `stage` (the resumable stage).
"""
