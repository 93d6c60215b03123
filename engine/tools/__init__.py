"""Around the method: the `minidisc` command, dry run, built-in example, report, samples, lm-eval, model cards,
memory plan."""
