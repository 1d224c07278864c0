"""Everything that consumes flows: capture, reassembly, summaries, replay, the TUI and the CLI."""
