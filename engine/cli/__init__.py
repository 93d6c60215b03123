"""The `minidisc` command: its subcommands, the dry run, the built-in example, the memory plan, the options table."""
