"""The `fedfleet` command line: a thin Typer app, one module per command."""
