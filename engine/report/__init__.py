"""What a run reports: test scoring, report.md and its plots, the summary, generated samples, lm-eval."""
