"""report stage: paper-style tables and figures from a run's artifacts.

- `dalign.report.stage.run_report(run, force=False) -> dict`: the stage (report.md, report.html, results.json,
  figures/*.png in the run directory).
- `dalign.report.document.main_table_text(results) -> str` / `main_table_for_run(run_dir) -> str`: the main
  tables as Markdown, for the console.
- `dalign.report.stats`: ASR/accuracy with bootstrap CIs, relative drops, Cohen's kappa, AUROC, Figure 5 counts.

Nothing is imported here, so `import dalign.report` stays cheap (matplotlib loads only with the stage).
"""
