"""CLI subcommands: argument wiring only."""
